"""Sparse attention patterns as data.

A :class:`Pattern` says which keys each query may see, on absolute positions (query ``i`` of a call
sits at ``Lk - Lq + i``, the bottom-right alignment of :class:`~fastattn.core.masks.Mask`). It is the
union of

* **block parts** (:class:`Window`, :class:`SameBlock`, :class:`RandomBlocks`, ...): each names, for
  every query block of ``block`` positions, a few key blocks that cover it (``cover``) and a token-level
  predicate ``allow(qpos, kpos)`` inside them (``None`` = the whole block);
* an optional **column part** (:class:`Strided`): query ``i`` sees keys ``j`` with ``i - j`` a multiple
  of the block size -- the "column" of a ``(n / block, block)`` view, computed in the transposed layout;
* **global tokens**: positions that attend to every key (``global_queries``) and positions that every
  query attends to (``global_keys``).

The engine (:mod:`fastattn.ops.sparse.engine`) gathers the covered key blocks and never forms an
``n x n`` tensor; :meth:`Pattern.dense` is the same pattern as a literal predicate on a full grid, used
only by the reference implementations. Patterns compose with ``+`` (union); a new pattern is one small
class with ``cover``, ``allow`` and, for decoding, ``needed``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Hashable

import torch
from torch import Tensor

__all__ = [
    "Part", "Window", "DilatedWindow", "RingWindow", "BlockWindow", "SameBlock", "PrevBlock", "RandomBlocks", "Strided", "Pattern",
]


def _offsets_cover(qblk: Tensor, lo: int, hi: int) -> Tensor:
    """Key blocks ``qblk + d`` for ``d`` in ``lo..hi`` as ``(nqb, hi - lo + 1)`` (may be out of range)."""
    return qblk[:, None] + torch.arange(lo, hi + 1, device=qblk.device)[None, :]


class Part:
    """One block part of a pattern. Subclasses define ``cover``, ``allow`` and ``needed``."""

    full = False  # True: every key of a covered block is allowed (no token predicate)
    # The largest |i - j| the part allows where it is a function of i - j alone (a sliding window), else
    # None (block-aligned, random, cyclic parts): what a halo exchange needs (see Pattern.reach).
    reach: int | None = None

    def cover(self, qblk: Tensor, nkb: int, block: int, causal: bool) -> Tensor:
        """``(nqb, S)`` key-block ids covering every key the part allows to query blocks ``qblk``
        (ids out of ``[0, nkb)`` are ignored)."""
        raise NotImplementedError

    def allow(self, qpos: Tensor, kpos: Tensor) -> Tensor | None:
        """Bool, broadcast of ``qpos`` and ``kpos``: True where the part lets query see key."""
        raise NotImplementedError

    def dense(self, qpos: Tensor, kpos: Tensor, block: int) -> Tensor:
        """The part as a predicate on any grid (the reference); defaults to ``allow``."""
        out = self.allow(qpos, kpos)
        assert out is not None
        return out

    def needed(self, kpos: Tensor, next_pos: int) -> Tensor:
        """Bool over cached key positions: may a query at position ``>= next_pos`` still see the key?
        Default: yes (an unbounded cache)."""
        return torch.ones_like(kpos, dtype=torch.bool)

    def keys(self, i: int, block: int) -> range | None:
        """The causal keys ``j <= i`` the part lets query position ``i`` see, as one ``range`` (the
        decoding step gathers them); None when they are not one range (then decoding takes the general
        path)."""
        return None


@dataclass(frozen=True)
class Window(Part):
    """``|i - j| <= radius`` (causal: ``0 <= i - j <= radius``): the sliding window."""

    radius: int

    @property
    def reach(self) -> int:  # type: ignore[override]
        return self.radius

    def cover(self, qblk, nkb, block, causal):
        r = -(-self.radius // block)
        return _offsets_cover(qblk, -r, 0 if causal else r)

    def allow(self, qpos, kpos):
        return (qpos - kpos).abs() <= self.radius

    def needed(self, kpos, next_pos):
        return kpos >= next_pos - self.radius

    def keys(self, i, block):
        return range(max(0, i - self.radius), i + 1)


@dataclass(frozen=True)
class DilatedWindow(Part):
    """``|i - j| <= radius * dilation`` and ``i - j`` a multiple of ``dilation`` (Longformer's dilated
    window: ``radius`` attended keys on each side, ``dilation - 1`` gaps between them)."""

    radius: int
    dilation: int

    @property
    def reach(self) -> int:  # type: ignore[override]
        return self.radius * self.dilation

    def cover(self, qblk, nkb, block, causal):
        r = -(-(self.radius * self.dilation) // block)
        return _offsets_cover(qblk, -r, 0 if causal else r)

    def allow(self, qpos, kpos):
        d = qpos - kpos
        return (d.abs() <= self.radius * self.dilation) & (d % self.dilation == 0)

    def needed(self, kpos, next_pos):
        return kpos >= next_pos - self.radius * self.dilation

    def keys(self, i, block):
        return range(i - min(self.radius, i // self.dilation) * self.dilation, i + 1, self.dilation)


@dataclass(frozen=True)
class SameBlock(Part):
    """``i // size == j // size``: attention inside fixed segments (``size`` must equal the block)."""

    size: int

    def cover(self, qblk, nkb, block, causal):
        assert block == self.size
        return qblk[:, None]

    def allow(self, qpos, kpos):
        return torch.div(qpos, self.size, rounding_mode="floor") == torch.div(kpos, self.size, rounding_mode="floor")

    def needed(self, kpos, next_pos):
        return torch.div(kpos, self.size, rounding_mode="floor") == next_pos // self.size

    def keys(self, i, block):
        return range(i - i % self.size, i + 1)


@dataclass(frozen=True)
class RingWindow(Part):
    """Cyclic neighbours on a ring of ``length`` positions: ``min(|i - j|, length - |i - j|) <= radius``
    (Star-Transformer's satellite ring). Covers the window blocks plus the blocks at both ends."""

    radius: int
    length: int

    def cover(self, qblk, nkb, block, causal):
        r = -(-self.radius // block)
        ends = torch.cat([torch.arange(0, r + 1), torch.arange(nkb - 1 - r, nkb)]).to(qblk.device)
        return torch.cat([_offsets_cover(qblk, -r, r), ends[None, :].expand(len(qblk), -1)], 1)

    def allow(self, qpos, kpos):
        d = (qpos - kpos).abs()
        return torch.minimum(d, self.length - d) <= self.radius


@dataclass(frozen=True)
class BlockWindow(Part):
    """Whole blocks ``|i // b - j // b| <= radius`` (causal: ``0 <= i // b - j // b <= radius``), where
    ``b`` is the pattern's block: BigBird's block window."""

    radius: int
    full = True

    def cover(self, qblk, nkb, block, causal):
        return _offsets_cover(qblk, -self.radius, 0 if causal else self.radius)

    def allow(self, qpos, kpos):
        return None

    def dense(self, qpos, kpos, block):
        fl = lambda x: torch.div(x, block, rounding_mode="floor")  # noqa: E731
        return (fl(qpos) - fl(kpos)).abs() <= self.radius

    def keys(self, i, block):
        return range(max(0, (i // block - self.radius) * block), i + 1)


@dataclass(frozen=True)
class PrevBlock(Part):
    """``i // size - j // size == 1``: every key of the previous segment (``size`` = the block)."""

    size: int
    full = True

    def cover(self, qblk, nkb, block, causal):
        assert block == self.size
        return qblk[:, None] - 1

    def allow(self, qpos, kpos):
        return None

    def dense(self, qpos, kpos, block):
        fl = lambda x: torch.div(x, self.size, rounding_mode="floor")  # noqa: E731
        return fl(qpos) - fl(kpos) == 1

    def needed(self, kpos, next_pos):
        return torch.div(kpos, self.size, rounding_mode="floor") >= next_pos // self.size - 1

    def keys(self, i, block):
        start = i - i % self.size
        return range(max(0, start - self.size), start)


@dataclass(frozen=True)
class RandomBlocks(Part):
    """Whole key blocks listed per query block: ``table[t]`` are the extra blocks query block ``t``
    sees (BigBird's random blocks). ``table`` is ``(num_query_blocks, r)``."""

    table: Tensor = field(compare=False)
    full = True

    def cover(self, qblk, nkb, block, causal):
        return self.table.to(qblk.device)[qblk]

    def allow(self, qpos, kpos):
        return None

    def dense(self, qpos, kpos, block):
        qb = torch.div(qpos, block, rounding_mode="floor")
        kb = torch.div(kpos, block, rounding_mode="floor")
        rows = self.table.to(qpos.device)[qb]  # (..., r)
        return (rows == kb[..., None]).any(-1)


@dataclass(frozen=True)
class Strided:
    """``i - j`` a multiple of ``stride`` (the stride equals the pattern's block): a column of the
    ``(n / stride, stride)`` view. Computed as dense attention in the transposed layout."""

    stride: int

    def allow(self, qpos, kpos):
        return (qpos - kpos) % self.stride == 0

    def needed(self, kpos, next_pos):
        return torch.ones_like(kpos, dtype=torch.bool)

    def keys(self, i: int, block: int) -> range:
        return range(i % self.stride, i + 1, self.stride)


def value_key(x: object) -> Hashable:
    """A hashable key equal for equal values: tensors by dtype, shape and contents; dataclasses (parts,
    patterns) by type and fields, tensor fields included (their ``compare=False`` does not hide them
    here); tuples item by item; anything else must be hashable itself (a plain object then counts by
    identity, which never gives a wrong match: the key keeps the object alive)."""
    if isinstance(x, Tensor):
        t = x.detach().to("cpu").contiguous().reshape(-1)
        return ("tensor", str(x.dtype), tuple(x.shape), t.view(torch.uint8).numpy().tobytes())
    if is_dataclass(x) and not isinstance(x, type):
        return (type(x), tuple(value_key(getattr(x, f.name)) for f in fields(x)))
    if isinstance(x, (tuple, list)):
        return (type(x), tuple(value_key(i) for i in x))
    try:
        hash(x)
    except TypeError:
        raise ValueError(f"a pattern's parts must be dataclasses, tensors or hashable; got {type(x).__name__}") from None
    return x


def _isin(x: Tensor, values: Tensor | None) -> Tensor:
    if values is None or values.numel() == 0:
        return torch.zeros_like(x, dtype=torch.bool)
    return torch.isin(x, values.to(x.device))


@dataclass(frozen=True)
class Pattern:
    """A union of parts on blocks of ``block`` positions (see the module docstring).

    ``global_keys`` / ``global_queries``: ``LongTensor`` of positions (possibly out of range, then
    ignored) that every query sees / that see every key.
    """

    block: int
    parts: tuple[Part, ...] = ()
    column: Strided | None = None
    global_keys: Tensor | None = field(default=None, compare=False)
    global_queries: Tensor | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.column is not None and self.column.stride != self.block:
            raise ValueError(f"a strided part needs stride == block ({self.column.stride} != {self.block})")

    def __add__(self, other: "Pattern") -> "Pattern":
        if other.block != self.block:
            raise ValueError(f"patterns with different blocks ({self.block}, {other.block}) do not compose")
        if self.column is not None and other.column is not None and self.column != other.column:
            raise ValueError("at most one strided part per pattern")
        cat = lambda a, b: a if b is None else b if a is None else torch.unique(torch.cat([a, b]))  # noqa: E731
        return Pattern(
            self.block, self.parts + other.parts, self.column or other.column,
            cat(self.global_keys, other.global_keys), cat(self.global_queries, other.global_queries),
        )

    def reach(self) -> int | None:
        """The largest ``|i - j|`` the pattern allows, where whether query ``i`` sees key ``j`` depends on
        ``i - j`` alone (sliding and dilated windows; no global tokens, no column part); else None. Such a
        pattern computed on a stretch of the sequence needs only ``reach`` keys beyond each end of it."""
        if self.column is not None or not self.parts:
            return None
        if any(g is not None and g.numel() > 0 for g in (self.global_keys, self.global_queries)):
            return None
        reaches = [p.reach for p in self.parts]
        return None if any(r is None for r in reaches) else max(reaches)  # type: ignore[type-var]

    def key(self) -> Hashable:
        """A hashable key equal for patterns of equal value (parts, parameters, tables and global
        positions): what the plan cache is keyed on."""
        return value_key(self)

    # ---- token predicates ---------------------------------------------------------------------
    def allow(self, qpos: Tensor, kpos: Tensor) -> Tensor | None:
        """Union of the token predicates of the non-full parts and the column part (None: none)."""
        out = None
        preds = [p for p in self.parts if not p.full] + ([self.column] if self.column is not None else [])
        for p in preds:
            a = p.allow(qpos, kpos)
            out = a if out is None else out | a
        return out

    def dense(self, qpos: Tensor, kpos: Tensor) -> Tensor:
        """The whole pattern, literally: True where query position ``qpos`` may see key ``kpos``."""
        out = torch.zeros(torch.broadcast_shapes(qpos.shape, kpos.shape), dtype=torch.bool, device=qpos.device)
        for p in self.parts:
            out = out | p.dense(qpos, kpos, self.block)
        if self.column is not None:
            out = out | self.column.allow(qpos, kpos)
        return out | _isin(kpos, self.global_keys) | _isin(qpos, self.global_queries)

    def needed(self, kpos: Tensor, next_pos: int) -> Tensor:
        """Keys a query at position ``>= next_pos`` may still see (bounded decoding caches)."""
        if self.global_queries is not None and bool((self.global_queries >= next_pos).any()):
            return torch.ones_like(kpos, dtype=torch.bool)
        out = _isin(kpos, self.global_keys)
        for p in self.parts + ((self.column,) if self.column is not None else ()):
            out = out | p.needed(kpos, next_pos)
        return out

    def key_ranges(self, i: int) -> list[range] | None:
        """The keys ``j <= i`` query position ``i`` may see, as disjoint ranges (each key once): what a
        decoding step gathers, O(kept) work. None where a part cannot list its keys as a range, where
        there are global tokens or more than one part with a stride (the general path then)."""
        if any(g is not None and g.numel() > 0 for g in (self.global_keys, self.global_queries)):
            return None
        parts = self.parts + ((self.column,) if self.column is not None else ())
        rs = [p.keys(i, self.block) for p in parts]
        if any(r is None for r in rs):
            return None
        dense = sorted((r.start, r.stop) for r in rs if r.step == 1 and len(r))  # type: ignore[union-attr]
        strided = [r for r in rs if r.step != 1 and len(r)]  # type: ignore[union-attr]
        if len(strided) > 1:
            return None
        spans: list[tuple[int, int]] = []
        for lo, hi in dense:  # merge the contiguous ranges
            if spans and lo <= spans[-1][1]:
                spans[-1] = (spans[-1][0], max(spans[-1][1], hi))
            else:
                spans.append((lo, hi))
        out = [range(lo, hi) for lo, hi in spans]
        for r in strided:  # its elements outside the merged spans
            start = r.start
            for lo, hi in spans:
                if hi <= start or lo >= r.stop:
                    continue
                if lo > start:
                    out.append(range(start, min(lo, r.stop), r.step))
                start += -(-(hi - start) // r.step) * r.step
            if start < r.stop:
                out.append(range(start, r.stop, r.step))
        return [r for r in out if len(r)]

    # ---- the block layout the engine gathers ---------------------------------------------------
    def layout(self, qblk: Tensor, nkb: int, causal: bool) -> tuple[Tensor, Tensor, Tensor]:
        """``idx, valid, full`` of shape ``(nqb, S)``: the key blocks each query block gathers
        (duplicates removed; ``full`` when some full part covers the block), causally future blocks
        dropped."""
        device = qblk.device
        covers, fulls = [], []
        for p in self.parts:
            c = p.cover(qblk, nkb, self.block, causal).to(device)
            covers.append(c)
            fulls.append(torch.full(c.shape, p.full, dtype=torch.bool, device=device))
        if not covers:
            e = torch.zeros(len(qblk), 0, dtype=torch.long, device=device)
            return e, e.bool(), e.bool()
        idx, full = torch.cat(covers, 1), torch.cat(fulls, 1)
        valid = (idx >= 0) & (idx < nkb)
        if causal:
            valid &= idx <= qblk[:, None]
        # remove duplicates: keep the first copy, OR-ing the full flags of its copies
        same = (idx[:, :, None] == idx[:, None, :]) & valid[:, :, None] & valid[:, None, :]
        full = (same & full[:, None, :]).any(-1)
        earlier = torch.ones(idx.shape[1], idx.shape[1], dtype=torch.bool, device=device).tril(-1)
        valid &= ~(same & earlier).any(-1)
        keep = valid.any(0)  # drop columns no query block uses
        return idx[:, keep].clamp(0, max(nkb - 1, 0)), valid[:, keep], full[:, keep]
