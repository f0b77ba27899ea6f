"""Transformer on a Diet (Chen et al., 2020, arXiv:2002.06170): dilated and cascaded attention.

Instead of full attention, position ``i`` attends to

* ``dilated``: ``j = i + k * d`` for ``|k| <= w`` (``w`` keys on each side, dilation ``d``), like a WaveNet
  dilated convolution;
* ``cascade``: a contiguous window whose width grows with the layer, ``|i - j| <= w * 2 ** layer``
  (the cascade's layer-``layer`` window);
* ``dilated_cascade``: both at once (the union), giving the dense nearby context of the cascade and
  the long reach of the dilation in one layer.

Causal forms keep ``j <= i``. O(n w d) per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import register
from .base import PatternMechanism, check_positive
from .patterns import DilatedWindow, Pattern, Window


@register("diet", complexity="O(n w d)", causal=True, decoding=True, padding=True, time_growth=1.0, memory_growth=1.0)
class DietAttention(PatternMechanism):
    """Dilated / cascaded sliding windows (see module docstring)."""

    test_options = {"window": 3, "dilation": 4, "layer": 1, "mode": "dilated_cascade", "block": 8}
    pruned_cache = True

    @dataclass(frozen=True)
    class Options:
        mode: str = "dilated"  # "dilated" | "cascade" | "dilated_cascade"
        window: int = 32  # w: keys on each side (base window of the cascade)
        dilation: int = 4  # d (dilated modes)
        layer: int = 0  # position in the cascade: the window is w * 2 ** layer (cascade modes)
        block: int = 128  # engine block size (speed only)

        def __post_init__(self) -> None:
            if self.mode not in ("dilated", "cascade", "dilated_cascade"):
                raise ValueError(f"mode must be 'dilated', 'cascade' or 'dilated_cascade', got {self.mode!r}")
            check_positive(window=self.window, dilation=self.dilation, block=self.block)
            if self.layer < 0:
                raise ValueError(f"layer must be >= 0, got {self.layer}")

    def pattern(self, lq: int, lk: int, device: torch.device) -> Pattern:
        o = self.options
        parts = []
        if "dilated" in o.mode:
            parts.append(DilatedWindow(o.window, o.dilation))
        if "cascade" in o.mode:
            parts.append(Window(o.window * 2 ** o.layer))
        return Pattern(o.block, tuple(parts))
