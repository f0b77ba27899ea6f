"""Axial attention (Ho et al., 2019, arXiv:1912.12180).

The sequence is viewed as a 2-D tensor of rows of ``width`` positions (raster order; the last row is
padded and masked). Attention runs along one axis at a time: the **row** attention of position
``(r, c)`` sees ``(r, c')`` and the **column** attention sees ``(r', c)``; with ``axes="both"`` the two
outputs are summed (each has its own softmax), so one layer reaches a whole row and a whole column.

Causal (raster order). ``causal_form="upper_context"`` (default, with ``axes="both"``) follows the Axial
Transformer's causal decoder: the row attention is masked (``c' <= c``), and the column part carries the
*upper context* -- an unmasked row attention over each earlier row (``u = RowAttn(k, k, v)``, every column
of the row), read by a column attention over the strictly earlier rows ``r' < r`` of the same column
(the paper's down-shift). Position ``(r, c)`` thus reaches every earlier position in one call, the
earlier rows' columns to its right included. Within one attention over given ``q, k, v`` the paper's
outer/inner decoder stack becomes the sum of the two outputs, and the upper row attention uses the keys
as its queries (as ``interlaced`` does), so that it is defined for any query length and for decoding.
``causal_form="masked"`` masks each axis instead (rows ``c' <= c``, columns ``r' <= r``; the form before):
no number of layers then reaches an earlier row to the right of the current column.
O(n (width + n / width) d).

Decoding: a one-token step gathers its row and its column from the cache; for the upper context the
state keeps the row attention ``u`` of every complete row (an
:class:`~fastattn.ops.sparse.decode.ExtendedCache` table, a row computed once, when it completes), so a
step costs O(width + n / width) keys (plus, once per row, that row's ``width x width`` attention).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fastattn.core.masks import Mask
from fastattn.core.state import KVCache
from fastattn.registry import register
from .base import PatternMechanism, check_positive
from fastattn.ops.sparse.decode import ExtendedCache, one_token_unpadded, range_attention, sources_attention
from fastattn.ops.sparse.engine import block_sparse_attention
from fastattn.ops.sparse.reference import pattern_reference
from fastattn.ops.sparse.patterns import Pattern, SameBlock, Strided


@register(
    "axial", complexity="O(n (w + n / w) d)", causal=True, decoding=True, padding=True,
    time_growth=2.0, memory_growth=2.0,
)
class AxialAttention(PatternMechanism):
    """Row and/or column attention on the ``(n / width, width)`` view (see module docstring)."""

    test_options = {"width": 8}
    deviations = (
        (
            "Causal form: the paper's outer (upper-context) and inner decoders become the sum of a masked row "
            "attention and a column attention over earlier rows' row-attention outputs, within one call."
        ),
    )

    @dataclass(frozen=True)
    class Options:
        width: int = 128  # row length of the 2-D view
        axes: str = "both"  # "row" | "column" | "both" (sum of the two)
        causal_form: str = "upper_context"  # causal axes="both": upper_context (paper) | masked

        def __post_init__(self) -> None:
            check_positive(width=self.width)
            if self.axes not in ("row", "column", "both"):
                raise ValueError(f"axes must be 'row', 'column' or 'both', got {self.axes!r}")
            if self.causal_form not in ("upper_context", "masked"):
                raise ValueError(f"causal_form must be 'upper_context' or 'masked', got {self.causal_form!r}")

    def axis_patterns(self) -> list[Pattern]:
        w, out = self.options.width, []
        if self.options.axes in ("row", "both"):
            out.append(Pattern(w, (SameBlock(w),)))
        if self.options.axes in ("column", "both"):
            out.append(Pattern(w, column=Strided(w)))
        return out

    def _axes(self, fn, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
        if mask.causal and self.options.axes == "both" and self.options.causal_form == "upper_context":
            return self._upper_context(fn, q, k, v, mask, scale)
        outs = [fn(q, k, v, mask, scale, p) for p in self.axis_patterns()]
        return outs[0] if len(outs) == 1 else outs[0] + outs[1]

    def _upper_context(self, fn, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
        """Masked row attention + column attention over the earlier rows' (unmasked) row attention."""
        w, (b, _, lk, _) = self.options.width, k.shape
        row, column = self.axis_patterns()
        u = fn(k, k, v, Mask(lk, lk, key_padding=mask.key_padding), scale, row)  # each row, every column
        # down-shift by one row: key position p holds row r - 1 of the same column (the first row: none)
        shift = lambda x: F.pad(x, (0, 0, w, 0))[:, :, :lk]  # noqa: E731
        pad = torch.zeros(b, lk, dtype=torch.bool, device=k.device) if mask.key_padding is None else mask.key_padding
        pad = torch.cat([torch.ones(b, w, dtype=torch.bool, device=k.device), pad], 1)[:, :lk]
        upper = fn(q, shift(k), shift(u), Mask(mask.lq, lk, key_padding=pad, causal=True), scale, column)
        return fn(q, k, v, mask, scale, row) + upper

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, dropout_p: float = 0.0) -> Tensor:
        return self._axes(block_sparse_attention, q, k, v, mask, scale)

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
        return self._axes(pattern_reference, q, k, v, mask, scale)

    def pattern(self, lq: int, lk: int, device: torch.device) -> Pattern:
        """The union of the axes' patterns (the keys the layer reaches; each axis is its own softmax)."""
        pats = self.axis_patterns()
        return pats[0] if len(pats) == 1 else pats[0] + pats[1]

    def step(
        self, q: Tensor, k: Tensor, v: Tensor, state: Any, scale: float, key_padding_mask: Tensor | None = None
    ) -> tuple[Tensor, Any]:
        """One unpadded token: each axis gathers its row / column from the cache; the upper context reads
        the state's table of complete rows' row attention (rows added as they complete). Else the
        general step (a plain cache; the table is rebuilt, in one call, at the next one-token step)."""
        old = one_token_unpadded(q, state, key_padding_mask)
        if old is None:
            cache = state.cache if isinstance(state, ExtendedCache) else state
            return super().step(q, k, v, cache, scale, key_padding_mask)
        w, i = self.options.width, old.length
        cache = old.append(k, v)
        (qc,), kc, vc = self.upcast(q), cache.k, cache.v
        if not (self.options.axes == "both" and self.options.causal_form == "upper_context"):
            out = sum(range_attention(qc, kc, vc, p.key_ranges(i), scale)  # type: ignore[arg-type]
                      for p in self.axis_patterns())
            return out.to(q.dtype), cache  # type: ignore[union-attr]
        table = state.tables[0] if isinstance(state, ExtendedCache) else KVCache(k[:, :, :0, :0], v[:, :, :0])
        done = i - i % w  # positions of the complete rows before this one
        if table.length < done:  # each new complete row attends to itself, unmasked (keys as queries)
            rows = kc[:, :, table.length:done].unflatten(2, (-1, w))
            (rq,) = self.upcast(rows)
            u = F.scaled_dot_product_attention(rq, rq, vc[:, :, table.length:done].unflatten(2, (-1, w)).to(rq.dtype),
                                               scale=scale).flatten(2, 3)
            table = table.append(k.new_zeros(*u.shape[:3], 0), u.to(v.dtype))
        row = range_attention(qc, kc, vc, [range(done, i + 1)], scale)
        upper = sources_attention(qc, [(kc, table.v, [range(i % w, done, w)])], scale)
        return (row + upper).to(q.dtype), ExtendedCache(cache, [table])
