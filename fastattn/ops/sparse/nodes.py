"""Extra key/value nodes of the block-sparse engine: keys that are not sequence positions.

:class:`Nodes` are the extra keys/values (memory, relay, summary tokens) a pattern's queries may see,
with a predicate saying which query sees which node. :class:`MemoryNodes` are learned nodes (shared by
``gmat`` and ``star``): learned memory queries attend to every (unpadded) sequence key, giving each
memory node a value ``(B, H, m, Ev)``; the sequence then sees the nodes through their learned keys.
O(n m d).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from fastattn.ops.softmax.dense import dense_attention
from fastattn.core.masks import Mask
from fastattn.ops.softmax.online import compute_dtype

__all__ = ["MemoryNodes", "Nodes"]


@dataclass
class Nodes:
    """Extra keys/values ``(B, H, m, E)`` / ``(B, H, m, Ev)`` the queries may see; ``allow(qpos)``
    (``qpos`` with a trailing singleton axis) gives the bool mask (see :meth:`mask`); None = all."""

    k: Tensor
    v: Tensor
    allow: Callable[[Tensor], Tensor] | None = None

    def mask(self, qpos: Tensor) -> Tensor:
        """Bool ``(B|1, 1, *qpos.shape[:-1], m)``; ``allow`` may return it with or without the two
        leading (batch, head) axes."""
        m = self.k.shape[2]
        if self.allow is None:
            return torch.ones(1, 1, *qpos.shape[:-1], m, dtype=torch.bool, device=qpos.device)
        out = self.allow(qpos)
        if out.dim() == qpos.dim():
            out = out[None, None]
        return out.expand(*out.shape[:2], *qpos.shape[:-1], m)


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
