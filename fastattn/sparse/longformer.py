"""Longformer (Beltagy et al., 2020, arXiv:2004.05150): sliding window + dilation + global tokens.

Query ``i`` attends to ``j`` when ``|i - j| <= w * d`` and ``d`` divides ``i - j`` (``w`` keys on each side,
dilation ``d``; causal: only ``j <= i``), and **global tokens** (task-chosen positions such as [CLS]
or question tokens) attend to every position and are attended by every position (symmetric global
attention). The window is gathered block-wise by the engine, global keys form one small extra key
set, and the rows of global queries are computed densely: O(n (w + g) d) time and memory.
Decoding keeps the last ``w * d`` keys plus the global ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import register
from .base import PatternMechanism, check_positive
from .patterns import DilatedWindow, Pattern, Window


@register(
    "longformer", complexity="O(n (w + g) d)", causal=True, decoding=True, padding=True,
    time_growth=1.0, memory_growth=1.0,
)
class LongformerAttention(PatternMechanism):
    """Sliding (optionally dilated) window plus symmetric global tokens."""

    test_options = {"window": 5, "dilation": 2, "global_tokens": (0, 30), "block": 8}
    pruned_cache = True

    @dataclass(frozen=True)
    class Options:
        window: int = 256  # w: attended keys on each side of the query
        dilation: int = 1  # d: gap between attended keys (1 = contiguous window)
        global_tokens: tuple[int, ...] = (0,)  # positions with global attention (beyond the length: none)
        block: int = 128  # engine block size (speed only)

        def __post_init__(self) -> None:
            check_positive(window=self.window, dilation=self.dilation, block=self.block)
            if not all(isinstance(t, int) and t >= 0 for t in self.global_tokens):
                raise ValueError(f"global_tokens must be non-negative integer positions, got {self.global_tokens!r}")
            object.__setattr__(self, "global_tokens", tuple(self.global_tokens))

    def pattern(self, lq: int, lk: int, device: torch.device) -> Pattern:
        o = self.options
        part = Window(o.window) if o.dilation == 1 else DilatedWindow(o.window, o.dilation)
        g = torch.tensor(sorted(set(o.global_tokens)), dtype=torch.long, device=device)
        return Pattern(o.block, (part,), global_keys=g, global_queries=g)
