"""Interlaced sparse self-attention (Huang et al., 2019, arXiv:1907.12273).

The dense affinity is factorised into two sparse ones applied one after the other. With group size
``P`` on the ``(n / P, P)`` view:

1. **long-range**: positions at the same offset of every block (``i = j mod P``, an interlaced group)
   attend to each other -- a column of the view;
2. **short-range**: positions of the same block attend to each other -- a row of the view, whose
   values are the long-range outputs.

``out = A_short(Q, K) (A_long(K, K) V)``: every position reaches every other in two hops. So that the
mechanism runs on ``(Q, K, V)`` for any query length (and decodes), the long-range step of key
position ``j`` uses ``k_j`` as its query (the paper's two self-attention modules each have their own
projections; here the layer's one projection serves both). Causal: both steps keep ``j <= i``.
O(n (P + n / P) d).
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


@register("interlaced", complexity="O(n (P + n / P) d)", causal=True, decoding=True, padding=True)
class InterlacedAttention(PatternMechanism):
    """Long-range attention inside interlaced groups, then short-range attention inside blocks."""

    test_options = {"group": 8}

    @dataclass(frozen=True)
    class Options:
        group: int = 128  # P: block length; the interlaced groups have n / P members

        def __post_init__(self) -> None:
            check_positive(group=self.group)

    def long_pattern(self) -> Pattern:
        return Pattern(self.options.group, column=Strided(self.options.group))

    def short_pattern(self) -> Pattern:
        return Pattern(self.options.group, (SameBlock(self.options.group),))

    def _two_steps(self, fn, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
        self_mask = Mask(mask.lk, mask.lk, key_padding=mask.key_padding, causal=mask.causal)
        v_long = fn(k, k, v, self_mask, scale, self.long_pattern())
        return fn(q, k, v_long, mask, scale, self.short_pattern())

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, dropout_p: float = 0.0) -> Tensor:
        return self._two_steps(block_sparse_attention, q, k, v, mask, scale)

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
        return self._two_steps(pattern_reference, q, k, v, mask, scale)

    def pattern(self, lq: int, lk: int, device: torch.device) -> Pattern:
        """One hop of each step (their product reaches every position)."""
        return self.long_pattern() + self.short_pattern()
