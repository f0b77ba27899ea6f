"""Transformer on a Diet (Chen et al., 2020, arXiv:2002.06170): dilated and cascaded attention.

Instead of full attention, position ``i`` attends to

* ``dilated``: ``j = i + k * d`` for ``|k| <= w`` (``w`` keys on each side, dilation ``d``), like a WaveNet
  dilated convolution; as in the authors' setup the dilation grows with depth, ``d = 2 ** layer``, unless
  ``dilation`` is given (before, ``dilation`` defaulted to 4 and ``layer`` was ignored in this mode);
* ``cascade``: a contiguous window whose width grows with the layer, ``|i - j| <= w * 2 ** layer``
  (the cascade's layer-``layer`` window);
* ``dilated_cascade``: both at once (the union), giving the dense nearby context of the cascade and
  the long reach of the dilation in one layer.

Causal forms keep ``j <= i``. O(n w d) per layer.

Kept deviation: the cascade window ``|i - j| <= w * 2 ** layer`` has ``2 w 2^layer + 1`` keys, one key
wider than the authors' window of that layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastattn.registry import register
from .base import PatternMechanism, check_positive
from fastattn.ops.sparse.patterns import DilatedWindow, Pattern, Window


@register("diet", complexity="O(n w d)", causal=True, decoding=True, padding=True, time_growth=1.0, memory_growth=1.0)
class DietAttention(PatternMechanism):
    """Dilated / cascaded sliding windows (see module docstring)."""

    test_options = {"window": 3, "dilation": 4, "layer": 1, "mode": "dilated_cascade", "block": 8}
    windowed = True  # halo exchange where the pattern is a window (no global tokens)
    pruned_cache = True
    deviations = (
        "The cascade window |i - j| <= w 2^layer is one key wider than the authors' window of that layer.",
    )

    @dataclass(frozen=True)
    class Options:
        mode: str = "dilated"  # "dilated" | "cascade" | "dilated_cascade"
        window: int = 32  # w: keys on each side (base window of the cascade)
        dilation: int | None = None  # d (dilated modes); None: 2 ** layer (the authors' schedule)
        layer: int = 0  # depth of the layer: the dilation 2 ** layer, the cascade window w * 2 ** layer
        block: int = 128  # engine block size (speed only)

        def __post_init__(self) -> None:
            if self.mode not in ("dilated", "cascade", "dilated_cascade"):
                raise ValueError(f"mode must be 'dilated', 'cascade' or 'dilated_cascade', got {self.mode!r}")
            check_positive(window=self.window, block=self.block)
            if self.dilation is not None:
                check_positive(dilation=self.dilation)
            if not isinstance(self.layer, int) or isinstance(self.layer, bool) or self.layer < 0:
                raise ValueError(f"layer must be an integer >= 0, got {self.layer!r}")

        @property
        def effective_dilation(self) -> int:
            return 2 ** self.layer if self.dilation is None else self.dilation

    def pattern(self, lq: int, lk: int, device: torch.device) -> Pattern:
        o = self.options
        parts = []
        if "dilated" in o.mode:
            parts.append(DilatedWindow(o.window, o.effective_dilation))
        if "cascade" in o.mode:
            parts.append(Window(o.window * 2 ** o.layer))
        return Pattern(o.block, tuple(parts))
