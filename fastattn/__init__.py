"""fastattn: the field of efficient attention behind one interface.

>>> import torch, fastattn
>>> q = k = v = torch.randn(1, 8, 1024, 64)
>>> out = fastattn.attention(q, k, v, method="flash", is_causal=True)
>>> [m.name for m in fastattn.methods(family="exact")]
['softmax', 'memory_efficient', 'flash']

Other kinds have their own façades: ``fastattn.Attention2d`` (feature maps ``(B, C, H, W)``) and
``fastattn.AlignmentAttention`` (a decoder's queries over an encoder's states), ``fastattn.GlimpseAttention``
(glimpses at locations chosen by a policy).
"""

from .alignment import AlignmentAttention
from .functional import attention
from .glimpse import GlimpseAttention, reinforce_loss
from .layers import MultiheadAttention
from .registry import MethodSpec, get_method, methods
from .vision import Attention2d

__all__ = [
    "attention", "MultiheadAttention", "Attention2d", "AlignmentAttention", "GlimpseAttention", "reinforce_loss",
    "MethodSpec", "get_method", "methods",
]
__version__ = "0.1.0"
