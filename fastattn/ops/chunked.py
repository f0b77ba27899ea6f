"""Query-chunked evaluation with checkpointing, shared by every O(Lq * Lk) mechanism that promises
O(n) memory (``memory_efficient``, ``doubly_normalized``, ``fourierformer``)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

__all__ = ["checkpointed", "query_chunked"]


def checkpointed(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` whose intermediates are recomputed in backward instead of stored."""
    return checkpoint(fn, *args, use_reentrant=False)


def query_chunked(fn: Callable[..., Tensor], q: Tensor, *others: Tensor, chunk: int) -> Tensor:
    """``cat([fn(q[:, :, i:i+chunk], *others, i) for i in ...], dim=2)``.

    ``fn(q_blk, *others, q0)`` must return ``(B, H, q_blk_len, ...)``. Under autograd each block is
    checkpointed (recomputed in backward), so the per-block ``chunk x Lk`` intermediates are never all
    alive together.
    """
    grad = torch.is_grad_enabled() and (q.requires_grad or any(t.requires_grad for t in others))
    outs = []
    for q0 in range(0, q.shape[2], chunk):
        q_blk = q[:, :, q0:q0 + chunk]
        outs.append(checkpointed(fn, q_blk, *others, q0) if grad else fn(q_blk, *others, q0))
    return torch.cat(outs, dim=2)
