"""Query-chunked evaluation with checkpointing, shared by every O(Lq * Lk) mechanism that promises
O(n) memory (``memory_efficient``, ``doubly_normalized``, ``fourierformer``), and the one-hidden-layer
perceptron score ``v^T tanh(a_i + b_j)`` evaluated in bounded query chunks (the alignment scores of
the ``classic`` family)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

__all__ = ["checkpointed", "perceptron_scores", "query_chunked"]


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


def perceptron_scores(a: Tensor, b: Tensor, v: Callable[[Tensor], Tensor], *, chunk_bytes: int) -> Tensor:
    """``e_ij = v(tanh(a_i + b_j))`` for ``a (B, Lq, A)``, ``b (B, Lk, A)`` and ``v`` a map ``(..., A) ->
    (..., 1)`` (an ``nn.Linear(A, 1)``: ``v^T x``) -> ``(B, Lq, Lk)``.

    The ``(B, chunk, Lk, A)`` broadcast sum is formed for query chunks of at most ``chunk_bytes`` (at
    least one row) and recomputed in backward, so memory beyond the result stays ``O(B Lk A)``; time
    ``O(B Lq Lk A)``. ``b`` may have a broadcast batch of 1.
    """
    bsz, lk, width = max(a.shape[0], b.shape[0]), b.shape[1], b.shape[2]
    rows = max(1, chunk_bytes // max(1, bsz * lk * width * b.element_size()))

    def block(a_blk: Tensor, b_: Tensor, q0: int) -> Tensor:
        return v(torch.tanh(a_blk[:, :, :, None, :] + b_[:, :, None, :, :]))[..., 0]

    return query_chunked(block, a[:, None], b[:, None], chunk=rows)[:, 0]
