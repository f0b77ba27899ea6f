"""Axial attention (Ho et al., 2019, arXiv:1912.12180).

The sequence is viewed as a 2-D tensor of rows of ``width`` positions (raster order; the last row is
padded and masked). Attention runs along one axis at a time: the **row** attention of position
``(r, c)`` sees ``(r, c')`` and the **column** attention sees ``(r', c)``; with ``axes="both"`` the two
outputs are summed (each has its own softmax), so one layer reaches a whole row and a whole column.
Causal (raster order): rows see ``c' <= c``, columns ``r' <= r``. O(n (width + n / width) d).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fastattn.core.masks import Mask
from fastattn.registry import register
from .base import PatternMechanism, check_positive
from fastattn.ops.sparse.engine import block_sparse_attention
from fastattn.ops.sparse.reference import pattern_reference
from fastattn.ops.sparse.patterns import Pattern, SameBlock, Strided


@register(
    "axial", complexity="O(n (w + n / w) d)", causal=True, decoding=True, padding=True,
)
class AxialAttention(PatternMechanism):
    """Row and/or column attention on the ``(n / width, width)`` view (see module docstring)."""

    test_options = {"width": 8}

    @dataclass(frozen=True)
    class Options:
        width: int = 128  # row length of the 2-D view
        axes: str = "both"  # "row" | "column" | "both" (sum of the two)

        def __post_init__(self) -> None:
            check_positive(width=self.width)
            if self.axes not in ("row", "column", "both"):
                raise ValueError(f"axes must be 'row', 'column' or 'both', got {self.axes!r}")

    def axis_patterns(self) -> list[Pattern]:
        w, out = self.options.width, []
        if self.options.axes in ("row", "both"):
            out.append(Pattern(w, (SameBlock(w),)))
        if self.options.axes in ("column", "both"):
            out.append(Pattern(w, column=Strided(w)))
        return out

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, dropout_p: float = 0.0) -> Tensor:
        outs = [block_sparse_attention(q, k, v, mask, scale, p) for p in self.axis_patterns()]
        return outs[0] if len(outs) == 1 else outs[0] + outs[1]

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
        outs = [pattern_reference(q, k, v, mask, scale, p) for p in self.axis_patterns()]
        return outs[0] if len(outs) == 1 else outs[0] + outs[1]

    def pattern(self, lq: int, lk: int, device: torch.device) -> Pattern:
        """The union of the axes' patterns (the keys the layer reaches; each axis is its own softmax)."""
        pats = self.axis_patterns()
        return pats[0] if len(pats) == 1 else pats[0] + pats[1]
