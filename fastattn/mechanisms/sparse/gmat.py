"""GMAT: Global Memory Augmentation for Transformers (Gupta & Berant, 2020, arXiv:2006.03274).

``m`` global memory tokens are added beside the sequence's sparse attention. Memory tokens attend to
every sequence token (``M' = softmax(Q_M K^T * scale) V``) and every sequence token attends to the
memory beside its sparse neighbourhood (a sliding window ``|i - j| <= w``), one softmax over both:
``out_i = softmax([q_i K_W(i)^T, q_i K_M^T] * scale) [V_W(i); M']``. The memory's query and key
embeddings are learned parameters of the layer (layer-only). O(n (w + m) d). Non-causal.

Kept deviation: in the paper the memory tokens also attend to each other; here they have a learned query
and key but no value of their own, so a memory token reads the sequence only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fastattn.core.masks import Mask
from fastattn.registry import register
from .base import PatternMechanism, check_positive
from fastattn.ops.sparse.nodes import MemoryNodes, Nodes
from fastattn.ops.sparse.patterns import Pattern, Window


@register("gmat", complexity="O(n (w + m) d)", causal=False, decoding=False, padding=True, time_growth=1.0, memory_growth=1.0)
class GMATAttention(PatternMechanism):
    """Sliding-window token attention plus ``num_memory`` learned global memory tokens."""

    test_options = {"num_memory": 3, "window": 4, "block": 8}
    heads_independent = False  # per-head memory tokens
    deviations = (
        "Memory tokens attend to the sequence only, not to each other (they have no value of their own).",
    )

    @dataclass(frozen=True)
    class Options:
        num_memory: int = 64  # m
        window: int = 128  # w: token-to-token keys on each side
        block: int = 128  # engine block size (speed only)

        def __post_init__(self) -> None:
            check_positive(num_memory=self.num_memory, window=self.window, block=self.block)

    def __init__(self, options=None, **kw) -> None:
        super().__init__(options, **kw)
        self.memory = MemoryNodes(self.num_heads, self.options.num_memory, self.head_dim)

    def pattern(self, lq: int, lk: int, device: torch.device) -> Pattern:
        return Pattern(self.options.block, (Window(self.options.window),))

    def nodes(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float | None = None) -> Nodes | None:
        return self.memory.read(k, v, mask, q.shape[-1] ** -0.5 if scale is None else scale)
