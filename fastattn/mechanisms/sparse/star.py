"""Star-Transformer (Guo et al., 2019, arXiv:1902.09113).

Satellite nodes (the tokens) on a ring and one relay node linked to all. One update cycle:
the relay reads every satellite, ``s = softmax(q_s K^T * scale) V`` (its query ``q_s`` learned), then
each satellite attends to its ring neighbours ``i - r .. i + r`` (cyclic: the first and last token are
neighbours), itself, and the relay (whose key is learned), one softmax over all of them:
``out_i = softmax([q_i K_ring(i)^T, q_i k_s] * scale) [V_ring(i); s]``. The paper's short-range
ring plus long-range relay; O(n (r + 1) d). Layer-only (learned relay). Non-causal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fastattn.core.masks import Mask
from fastattn.registry import register
from .base import PatternMechanism, check_positive
from fastattn.ops.sparse.nodes import MemoryNodes, Nodes
from fastattn.ops.sparse.patterns import Pattern, RingWindow


@register("star", complexity="O(n r d)", causal=False, decoding=False, padding=True, functional=False)
class StarAttention(PatternMechanism):
    """Ring of satellites (radius ``radius``) plus one learned relay node."""

    test_options = {"radius": 2, "block": 8}

    @dataclass(frozen=True)
    class Options:
        radius: int = 1  # ring neighbours on each side (the paper: 1)
        block: int = 64  # engine block size (speed only)

        def __post_init__(self) -> None:
            check_positive(radius=self.radius, block=self.block)

    def __init__(self, options=None, **kw) -> None:
        super().__init__(options, **kw)
        self.relay = MemoryNodes(self.num_heads, 1, self.head_dim)

    def pattern(self, lq: int, lk: int, device: torch.device) -> Pattern:
        return Pattern(self.options.block, (RingWindow(self.options.radius, lk),))

    def nodes(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask) -> Nodes | None:
        return self.relay.read(k, v, mask, q.shape[-1] ** -0.5)
