"""Jukebox's factorised attention (Dhariwal et al., 2020, arXiv:2005.00341).

The sequence is viewed as rows of ``width`` positions; Jukebox's transformer cycles through three
sparse attentions, each a pattern on that view:

* ``row``: the positions of the same row (causal: the earlier ones);
* ``column``: the positions of the same column (causal: the rows above);
* ``previous_row``: every position of the previous row.

``kinds`` chooses the patterns; with several, the heads are split into consecutive groups, one
per pattern, as even as the head count allows (the layers of the paper's cycle become head groups of one layer). O(n (w + n / w) d).

A query whose pattern reaches no key (``previous_row`` in the first row, e.g. every query of a sequence
no longer than ``width``, or the first decoding steps) gets zeros, as in the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fastattn.core.masks import Mask
from fastattn.registry import register
from .base import PatternMechanism, check_positive
from fastattn.ops.sparse.engine import block_sparse_attention
from fastattn.ops.sparse.plan import cached_plan
from fastattn.ops.sparse.reference import pattern_reference
from fastattn.ops.sparse.patterns import Pattern, PrevBlock, SameBlock, Strided

_KINDS = ("row", "column", "previous_row")


@register("jukebox", complexity="O(n (w + n / w) d)", causal=True, decoding=True, padding=True, time_growth=2.0, memory_growth=2.0)
class JukeboxAttention(PatternMechanism):
    """Row, column and previous-row attention on a 2-D view, one pattern per head group."""

    test_options = {"width": 8, "kinds": ("row", "column", "previous_row")}

    @dataclass(frozen=True)
    class Options:
        width: int = 128  # row length of the 2-D view
        kinds: tuple[str, ...] = ("row", "column", "previous_row")

        def __post_init__(self) -> None:
            check_positive(width=self.width)
            kinds = tuple(self.kinds)
            if not kinds or any(k not in _KINDS for k in kinds) or len(set(kinds)) != len(kinds):
                raise ValueError(f"kinds must be distinct names among {_KINDS}, got {self.kinds!r}")
            object.__setattr__(self, "kinds", kinds)

    def __init__(self, options=None, **kw) -> None:
        super().__init__(options, **kw)
        if self.num_heads < len(self.options.kinds):
            raise ValueError(
                f"jukebox: num_heads ({self.num_heads}) must be >= len(kinds) = {len(self.options.kinds)}"
            )

    @property
    def heads_independent(self) -> bool:  # type: ignore[override]
        """With several kinds, each head group has its own pattern."""
        return len(self.options.kinds) == 1

    def kind_pattern(self, kind: str) -> Pattern:
        w = self.options.width
        if kind == "row":
            return Pattern(w, (SameBlock(w),))
        if kind == "column":
            return Pattern(w, column=Strided(w))
        return Pattern(w, (PrevBlock(w),))

    def head_groups(self, h: int) -> list[tuple[int, int, str]]:
        """``(first, end, kind)``: the consecutive query heads of each kind, as even as ``h`` allows."""
        kinds = self.options.kinds
        cut = [round(i * h / len(kinds)) for i in range(len(kinds) + 1)]
        return list(zip(cut, cut[1:], kinds))

    def decode_patterns(self, heads: int) -> list[tuple[int, int, Pattern]]:
        return [(a, b, self.kind_pattern(kind)) for a, b, kind in self.head_groups(heads)]

    def _per_group(self, fn, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
        outs = [fn(q[:, a:b], k[:, a:b], v[:, a:b], mask, scale, self.kind_pattern(kind))
                for a, b, kind in self.head_groups(q.shape[1])]
        return torch.cat(outs, dim=1)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, dropout_p: float = 0.0) -> Tensor:
        return self._per_group(_sparse_or_zeros, q, k, v, mask, scale)

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
        return self._per_group(pattern_reference, q, k, v, mask, scale)

    def pattern(self, lq: int, lk: int, device: torch.device) -> Pattern:
        """The union over head groups (the keys the layer reaches)."""
        pats = [self.kind_pattern(k) for k in self.options.kinds]
        out = pats[0]
        for p in pats[1:]:
            out = out + p
        return out


def _sparse_or_zeros(q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, pattern: Pattern) -> Tensor:
    """The engine's output, or zeros when the pattern reaches no key at these lengths (the engine
    refuses such a call; the reference gives zero rows)."""
    plan = cached_plan(pattern, mask.lq, mask.lk, mask.causal, q.device)
    if plan.idx.shape[1] == 0 and plan.column_allowed is None and plan.gk is None and plan.gq is None:
        return (q[..., :1] * 0).expand(*q.shape[:3], v.shape[3]).to(v.dtype).contiguous()
    return block_sparse_attention(q, k, v, mask, scale, pattern, plan=plan)
