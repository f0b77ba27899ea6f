"""Sparse Transformer (Child et al., 2019, arXiv:1904.10509): factorised attention patterns.

With stride ``l`` (about ``sqrt(n)``), one merged head attends to the union of two sets
(the paper's "merged" integration, ``A = A(1) u A(2)``):

* ``strided``: ``A(1) = {j : |i - j| < l}`` (the previous ``l`` positions when causal) and
  ``A(2) = {j : (i - j) mod l = 0}`` -- a row and a column of the ``(n / l, l)`` view;
* ``fixed``: ``A(1) = {j : floor(j / l) = floor(i / l)}`` (the own block) and
  ``A(2) = {j : j mod l >= l - c}`` -- the last ``c`` "summary" positions of every block.

Either way every position reaches every earlier one in two hops. The engine computes ``A(1)`` from
gathered blocks and ``A(2)`` as a column part (strided) or as global keys (fixed):
O(n (l + n / l) d) time, O(n sqrt(n) d) with ``l ~ sqrt(n)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastattn.registry import register
from .base import PatternMechanism, check_positive
from fastattn.ops.sparse.patterns import Pattern, SameBlock, Strided, Window


@register(
    "sparse_transformer", complexity="O(n sqrt(n) d)", causal=True, decoding=True, padding=True,
    time_growth=1.5, memory_growth=1.5,
)
class SparseTransformerAttention(PatternMechanism):
    """Strided or fixed factorised attention, both sets in one softmax (see module docstring)."""

    test_options = {"stride": 8, "summary": 2}

    @property
    def pruned_cache(self) -> bool:  # type: ignore[override]
        """Fixed: a cache pruned to the own block and the summaries. Strided keeps every key (column
        part), in a :class:`~fastattn.core.state.KVCache` whose one-token steps gather the window and
        the column (:meth:`decode_patterns`)."""
        return self.options.mode == "fixed"

    def decode_patterns(self, heads: int) -> list[tuple[int, int, Pattern]] | None:
        return [(0, heads, self.pattern(1, 1, torch.device("cpu")))] if self.options.mode == "strided" else None

    @dataclass(frozen=True)
    class Options:
        mode: str = "strided"  # "strided" | "fixed"
        stride: int = 128  # l, the block length (about sqrt(n))
        summary: int = 8  # c, summary positions per block (fixed mode)

        def __post_init__(self) -> None:
            if self.mode not in ("strided", "fixed"):
                raise ValueError(f"mode must be 'strided' or 'fixed', got {self.mode!r}")
            check_positive(stride=self.stride, summary=self.summary)
            if self.summary > self.stride:
                raise ValueError(f"summary ({self.summary}) must be <= stride ({self.stride})")

    def pattern(self, lq: int, lk: int, device: torch.device) -> Pattern:
        l, c = self.options.stride, self.options.summary
        if self.options.mode == "strided":
            return Pattern(l, (Window(l - 1),), column=Strided(l))
        pos = torch.arange(lk, device=device)
        return Pattern(l, (SameBlock(l),), global_keys=pos[pos % l >= l - c])
