"""fastattn: the field of efficient attention behind one interface.

>>> import torch, fastattn
>>> q = k = v = torch.randn(1, 8, 1024, 64)
>>> out = fastattn.attention(q, k, v, method="flash", is_causal=True)
>>> [m.name for m in fastattn.methods(family="exact")]
['softmax', 'memory_efficient', 'flash']
"""

from .functional import attention
from .layers import MultiheadAttention
from .registry import MethodSpec, get_method, methods

__all__ = ["attention", "MultiheadAttention", "MethodSpec", "get_method", "methods"]
__version__ = "0.1.0"
