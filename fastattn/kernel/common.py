"""Small pieces shared by several kernel mechanisms (written once here).

* :func:`real_key_count` -- ``n``, the number of real (non-padding) keys, for the mechanisms whose
  formula divides by the sequence length (efficient attention's scaling normalisation, real-time fast
  attention, Primal-Attention's regulariser);
* :func:`l2_normalize` -- ``x / ||x||`` that stays finite (and differentiable) at ``x = 0``;
* :func:`query_chunked` -- run an O(Lq * Lk) computation a block of queries at a time, each block
  checkpointed under autograd, so that neither forward nor backward holds more than
  ``chunk x Lk`` (times the per-pair width) at once. Used by the honest O(n^2) kernels
  (``fourierformer``, ``doubly_normalized``).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..core.masks import NEG_INF, Mask

__all__ = ["real_key_count", "padding_bias", "l2_normalize", "query_chunked"]


def real_key_count(mask: Mask, batch: int, lk: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(B|1, 1, 1, 1)``: the number of keys that are not padding (``Lk`` without a padding mask)."""
    keep = mask.key_keep(dtype)
    if keep is None:
        return torch.full((1, 1, 1, 1), float(lk), dtype=dtype, device=device)
    return keep.sum(dim=2, keepdim=True)


def padding_bias(mask: Mask, dtype: torch.dtype, device: torch.device, dim: int = -1) -> Tensor | None:
    """Additive ``-inf`` on padding positions (``None`` without padding), laid along ``dim`` of a
    4-D tensor: ``dim=-1`` gives ``(B, 1, 1, L)`` (keys as columns), ``dim=-2`` gives ``(B, 1, L, 1)``."""
    if mask.key_padding is None:
        return None
    bias = torch.zeros(mask.key_padding.shape, dtype=dtype, device=device).masked_fill(mask.key_padding, NEG_INF)
    return bias[:, None, None, :] if dim == -1 else bias[:, None, :, None]


def l2_normalize(x: Tensor, dim: int = -1) -> Tensor:
    """``x / ||x||_2`` along ``dim``; a zero vector maps to zero (with zero gradient), never NaN."""
    sq = x.pow(2).sum(dim=dim, keepdim=True)
    zero = sq == 0
    norm = torch.sqrt(torch.where(zero, torch.ones_like(sq), sq))
    return torch.where(zero, torch.zeros_like(x), x / norm)


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
        if grad:
            outs.append(checkpoint(fn, q_blk, *others, q0, use_reentrant=False))
        else:
            outs.append(fn(q_blk, *others, q0))
    return torch.cat(outs, dim=2)
