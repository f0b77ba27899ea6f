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
projections; here the layer's one projection serves both).

Causal form (the paper has none; it segments images): both steps keep ``j <= i``, and by default
(``causal_form="previous_block"``) the short-range step of block ``b`` also sees every position of block
``b - 1`` (whose long-range outputs summarise their interlaced groups up to block ``b - 1``), so every
earlier position is reached in the two hops, as in the non-causal form. ``causal_form="masked"`` (the
form before) only masks the two steps: an earlier block's positions to the right of the current offset
are then never reached, at any depth. O(n (P + n / P) d).
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
from fastattn.ops.sparse.patterns import Pattern, PrevBlock, SameBlock, Strided


@register("interlaced", complexity="O(n (P + n / P) d)", causal=True, decoding=True, padding=True, time_growth=2.0, memory_growth=2.0)
class InterlacedAttention(PatternMechanism):
    """Long-range attention inside interlaced groups, then short-range attention inside blocks."""

    test_options = {"group": 8}
    deviations = (
        (
            "The long-range step uses the keys as its queries (one projection serves both of the paper's "
            "modules)."
        ),
        (
            "The causal form is this library's (the paper is non-causal): the short-range step also sees the "
            "whole previous block, so every earlier position is reached."
        ),
    )

    @dataclass(frozen=True)
    class Options:
        group: int = 128  # P: block length; the interlaced groups have n / P members
        causal_form: str = "previous_block"  # causal short-range step: previous_block | masked

        def __post_init__(self) -> None:
            check_positive(group=self.group)
            if self.causal_form not in ("previous_block", "masked"):
                raise ValueError(f"causal_form must be 'previous_block' or 'masked', got {self.causal_form!r}")

    def long_pattern(self) -> Pattern:
        return Pattern(self.options.group, column=Strided(self.options.group))

    def short_pattern(self, causal: bool = False) -> Pattern:
        p = self.options.group
        if causal and self.options.causal_form == "previous_block":
            return Pattern(p, (SameBlock(p), PrevBlock(p)))
        return Pattern(p, (SameBlock(p),))

    def _two_steps(self, fn, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
        self_mask = Mask(mask.lk, mask.lk, key_padding=mask.key_padding, causal=mask.causal)
        v_long = fn(k, k, v, self_mask, scale, self.long_pattern())
        return fn(q, k, v_long, mask, scale, self.short_pattern(mask.causal))

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, dropout_p: float = 0.0) -> Tensor:
        return self._two_steps(block_sparse_attention, q, k, v, mask, scale)

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
        return self._two_steps(pattern_reference, q, k, v, mask, scale)

    def pattern(self, lq: int, lk: int, device: torch.device) -> Pattern:
        """One hop of each step (their product reaches every position)."""
        return self.long_pattern() + self.short_pattern()
