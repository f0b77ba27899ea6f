"""Learned memory / relay nodes shared by ``gmat`` and ``star``.

``read_memory`` lets learned memory queries attend to every (unpadded) sequence key, giving each
memory node a value ``(B, H, m, Ev)``; the sequence then sees the nodes through their learned keys as
extra :class:`~fastattn.ops.sparse.engine.Nodes` of the engine. O(n m d).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastattn.ops.softmax.dense import dense_attention
from fastattn.core.masks import Mask
from fastattn.ops.softmax.online import compute_dtype
from .engine import Nodes

__all__ = ["MemoryNodes"]


class MemoryNodes(nn.Module):
    """``m`` learned nodes per head: a query (to read the sequence) and a key (to be read)."""

    def __init__(self, num_heads: int, num_nodes: int, head_dim: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(num_heads, num_nodes, head_dim))
        self.key = nn.Parameter(torch.randn(num_heads, num_nodes, head_dim))

    def read(self, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Nodes:
        """Each node attends to all sequence keys (padding excluded) -> the nodes' values."""
        b = k.shape[0]
        dt = compute_dtype(k.dtype)
        mq = self.query.to(dt)[None].expand(b, -1, -1, -1)
        values = dense_attention(mq, k.to(dt), v.to(dt), Mask(mq.shape[2], k.shape[2], key_padding=mask.key_padding), scale)
        return Nodes(self.key.to(dt)[None].expand(b, -1, -1, -1), values)
