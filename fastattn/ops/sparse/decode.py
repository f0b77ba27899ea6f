"""One decoding query over the cache positions a pattern keeps for it: gather those keys and values
(views where they are one range, else one concatenation of slices) and attend with one softmax.

The work is O(kept keys) per token, with a handful of PyTorch ops and no plan: what the decoding
steps of the sparse patterns that keep every key use (the ranges come from
:meth:`~fastattn.ops.sparse.patterns.Pattern.key_ranges`).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fastattn.core.checks import repeat_kv

__all__ = ["gather_ranges", "range_attention"]


def gather_ranges(x: Tensor, ranges: Sequence[range], dim: int = 2) -> Tensor:
    """``x`` at the positions ``ranges`` (disjoint, each ``range`` with a positive step) along ``dim``,
    in order: a view of ``x`` for one range, one concatenation of strided slices for several."""
    pieces = [x.narrow(dim, r.start, r.stop - r.start) if r.step == 1 else
              x.narrow(dim, r.start, r[-1] + 1 - r.start)[(slice(None),) * dim + (slice(None, None, r.step),)]
              for r in ranges]
    if len(pieces) == 1:
        return pieces[0]
    if not pieces:
        return x.narrow(dim, 0, 0)
    return torch.cat(pieces, dim)


def range_attention(
    q: Tensor, k: Tensor, v: Tensor, ranges: Sequence[range], scale: float, first: int = 0, per: int | None = None
) -> Tensor:
    """Softmax attention of queries ``q (B, Hq, T, E)`` over the cached keys/values ``k, v (B, Hkv, L, E)``
    at positions ``ranges`` only (every query sees the same keys). ``q`` holds query heads
    ``first .. first + Hq - 1`` of a layer where ``per`` query heads share a key head (default: ``q`` is
    every head, ``per = Hq / Hkv``). The gathered keys and values take ``q``'s dtype. No key: zeros."""
    if not any(len(r) for r in ranges):
        return q.new_zeros(*q.shape[:3], v.shape[3])
    per = q.shape[1] // k.shape[1] if per is None else per
    kg = repeat_kv(gather_ranges(k, ranges).to(q.dtype), per)
    vg = repeat_kv(gather_ranges(v, ranges).to(q.dtype), per)
    if kg.shape[1] != q.shape[1]:
        kg, vg = kg[:, first:first + q.shape[1]], vg[:, first:first + q.shape[1]]
    return F.scaled_dot_product_attention(q, kg, vg, scale=scale)
