"""Sliding-window (local) attention (the building block of Longformer, Beltagy et al., 2020,
arXiv:2004.05150, and of most sparse patterns).

Query ``i`` attends to keys ``j`` with ``|i - j| <= window`` (causal: ``0 <= i - j <= window``):
``softmax(q_i K_W^T * scale) V_W`` over that window ``W``. The engine gathers the
``2 * ceil(window / block) + 1`` key blocks around each query block (``ceil(window / block) + 1`` when
causal) as shifted slices: O(n * window * d) time, O(n * window) memory. Decoding keeps only the last
``window`` keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastattn.registry import register
from .base import PatternMechanism, check_positive
from fastattn.ops.sparse.patterns import Pattern, Window


@register(
    "local", complexity="O(n w d)", causal=True, decoding=True, padding=True,
    time_growth=1.0, memory_growth=1.0,
)
class LocalAttention(PatternMechanism):
    """Each query sees the ``window`` keys on either side of it (one side when causal)."""

    test_options = {"window": 9, "block": 8}
    windowed = True  # halo exchange where the pattern is a window (no global tokens)
    pruned_cache = True

    @dataclass(frozen=True)
    class Options:
        window: int = 256  # keys on each side of the query
        block: int = 128  # engine block size (a speed knob; does not change the result)

        def __post_init__(self) -> None:
            check_positive(window=self.window, block=self.block)

    def pattern(self, lq: int, lk: int, device: torch.device) -> Pattern:
        return Pattern(self.options.block, (Window(self.options.window),))
