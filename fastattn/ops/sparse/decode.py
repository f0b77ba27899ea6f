"""One decoding query over the cache positions a pattern keeps for it: gather those keys and values
(views where they are one range, else one concatenation of slices) and attend with one softmax.

The work is O(kept keys) per token, with a handful of PyTorch ops and no plan: what the decoding
steps of the sparse patterns that keep every key use (the ranges come from
:meth:`~fastattn.ops.sparse.patterns.Pattern.key_ranges`). :class:`ExtendedCache` carries, beside the
key/value cache, tables derived from it once (pooled spans, a first hop's outputs) that later steps
gather from in the same way, so no step recomputes them.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fastattn.core.checks import repeat_kv
from fastattn.core.state import DecodingState, KVCache

__all__ = [
    "ExtendedCache", "gather_ranges", "left_padding", "one_token_unpadded", "range_attention", "sources_attention",
]


class ExtendedCache(DecodingState):
    """A :class:`KVCache` of every key (``cache``) plus ``tables``: key/value tables derived from it
    (each a :class:`KVCache`, growing in place), e.g. span means or the outputs of a first attention hop,
    filled as the positions they depend on arrive. ``length``, :meth:`select` and :meth:`to` follow the
    cache; the tables are selected and moved with it."""

    def __init__(self, cache: KVCache, tables: Sequence[KVCache]) -> None:
        self.cache, self.tables = cache, tuple(tables)

    @property
    def length(self) -> int:  # type: ignore[override]
        return self.cache.length

    @property
    def batch_size(self) -> int:
        return self.cache.k.shape[0]

    def select(self, index) -> "ExtendedCache":  # type: ignore[override]
        return ExtendedCache(self.cache.select(index), [t.select(index) for t in self.tables])

    def to(self, device: torch.device | str) -> "ExtendedCache":
        return ExtendedCache(self.cache.to(device), [t.to(device) for t in self.tables])


def left_padding(cache: KVCache) -> list[int] | None:
    """Each row's count of padding keys in ``cache`` where every row's padding keys precede its real ones
    (left padding: a row's position ``p`` is then at cache index ``p + count``); None where some padding
    key follows a real one."""
    pad = cache.key_padding
    if pad is None:
        return [0] * cache.k.shape[0]
    if pad.shape[1] > 1 and bool((pad[:, 1:] & ~pad[:, :-1]).any()):
        return None
    return pad.sum(1).tolist()


def one_token_unpadded(q: Tensor, state: object, key_padding_mask: Tensor | None) -> KVCache | None:
    """The :class:`KVCache` of ``state`` (itself, or an :class:`ExtendedCache`'s) where this step is one
    token and neither it nor any cached key is padding (cache index = position); else None."""
    cache = state.cache if isinstance(state, ExtendedCache) else state
    if q.shape[2] != 1 or not isinstance(cache, KVCache) or cache.key_padding is not None:
        return None
    if key_padding_mask is not None and bool(key_padding_mask.any()):
        return None
    return cache


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
    return sources_attention(q, [(k, v, ranges)], scale, first, per)


def sources_attention(
    q: Tensor, sources: Sequence[tuple[Tensor, Tensor, Sequence[range]]], scale: float, first: int = 0,
    per: int | None = None,
) -> Tensor:
    """:func:`range_attention` over several key/value sources in one softmax: ``(k, v, ranges)`` each
    (e.g. the cached tokens and a table of span means)."""
    ev = sources[0][1].shape[3]
    sources = [(k, v, [r for r in rs if len(r)]) for k, v, rs in sources]
    sources = [s for s in sources if s[2]]
    if not sources:
        return q.new_zeros(*q.shape[:3], ev)
    per = q.shape[1] // sources[0][0].shape[1] if per is None else per
    ks = [gather_ranges(k, rs) for k, _, rs in sources]
    vs = [gather_ranges(v, rs) for _, v, rs in sources]
    kg, vg = (xs[0] if len(xs) == 1 else torch.cat(xs, 2) for xs in (ks, vs))
    if kg.dtype != q.dtype or vg.dtype != q.dtype:
        kg, vg = kg.to(q.dtype), vg.to(q.dtype)
    kg, vg = repeat_kv(kg, per), repeat_kv(vg, per)
    if kg.shape[1] != q.shape[1]:
        kg, vg = kg[:, first:first + q.shape[1]], vg[:, first:first + q.shape[1]]
    return F.scaled_dot_product_attention(q, kg, vg, scale=scale)
