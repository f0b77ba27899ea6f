"""ETC: Encoding Long and Structured Inputs in Transformers (Ainslie et al., 2020, arXiv:2004.08483).

Global-local attention. The input is split into a small **global input** -- here the first
``num_global`` positions of the sequence -- and the **long input** (the rest). The four pieces of the
paper are: global-to-global and global-to-long (global tokens attend to everything), long-to-global
(every long token attends to every global token) and long-to-long restricted to a radius ``r``
(``|i - j| <= r``). O(n (r + g) d) time and memory. Non-causal (an encoder).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastattn.registry import register
from .base import PatternMechanism, check_positive
from fastattn.ops.sparse.patterns import Pattern, Window


@register("etc", complexity="O(n (r + g) d)", causal=False, decoding=False, padding=True, time_growth=1.0, memory_growth=1.0)
class ETCAttention(PatternMechanism):
    """Global-local attention with the first ``num_global`` positions as the global input."""

    test_options = {"num_global": 3, "radius": 4, "block": 8}

    @dataclass(frozen=True)
    class Options:
        num_global: int = 64  # length of the global input (the sequence's first positions)
        radius: int = 128  # long-to-long radius r
        block: int = 128  # engine block size (speed only)

        def __post_init__(self) -> None:
            check_positive(num_global=self.num_global, radius=self.radius, block=self.block)

    def pattern(self, lq: int, lk: int, device: torch.device) -> Pattern:
        o = self.options
        glob = torch.arange(min(o.num_global, lk), device=device)
        return Pattern(o.block, (Window(o.radius),), global_keys=glob, global_queries=glob)
