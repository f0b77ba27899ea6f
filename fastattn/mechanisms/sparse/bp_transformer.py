"""BP-Transformer (Ye et al., 2019, arXiv:1911.04070): attention over a binary partition of the sequence.

The sequence is recursively halved into a binary tree of spans (leaves: blocks of ``leaf`` tokens).
Each token attends to its nearby leaves token by token and, farther away, to span nodes whose size
doubles with distance: at each level the ``k`` spans on either side that are not covered by a finer
level ("k" of the paper's fine-to-coarse context), up to the root. One softmax over tokens and span
nodes; every position is reached exactly once, at the finest level that covers it. Span nodes are the
mean of their tokens' keys and values (the paper also updates span nodes across layers, which needs
state beyond one attention call). Causal: past tokens and fully past spans only.

Kept deviation: the hierarchy is shifted one level -- the first span level has the leaves' size (the
shared retina construction of ``multiscale``), so beyond its ``k`` nearest leaves a query still sees about
``k`` more single leaves per side (their parents' alignment decides exactly how many) before spans of two
leaves begin: with ``leaf=1`` and ``k=2``, 4 or 5 single tokens per side where the paper has 2.
O(n k (leaf + log(n / leaf)) d) edges; span nodes are scored densely here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fastattn.core.masks import Mask
from fastattn.registry import register
from .base import PatternMechanism, check_positive
from fastattn.ops.sparse.nodes import Nodes
from .multiscale import retina_nodes
from fastattn.ops.sparse.patterns import BlockWindow, Pattern


@register("bp_transformer", complexity="O(n k log(n) d)", causal=True, decoding=True, padding=True, time_growth=1.1, memory_growth=1.1)
class BPTransformerAttention(PatternMechanism):
    """Fine-to-coarse attention over the binary partition tree of spans."""

    test_options = {"leaf": 2, "k": 1}
    deviations = (
        (
            "The span hierarchy starts one level low: the first span level has leaf size, so a query "
            "sees about 2k single leaves per side (the paper: k) before spans of 2 leaves."
        ),
        "Span nodes are means of their tokens' keys and values, not updated across layers.",
    )

    @dataclass(frozen=True)
    class Options:
        leaf: int = 4  # tokens per leaf span (the paper: 1)
        k: int = 4  # spans kept on each side per level

        def __post_init__(self) -> None:
            check_positive(leaf=self.leaf, k=self.k)

    def levels(self, n: int) -> int:
        return max(1, math.ceil(math.log2(max(n / self.options.leaf, 1))))

    def pattern(self, lq: int, lk: int, device: torch.device) -> Pattern:
        return Pattern(self.options.leaf, (BlockWindow(self.options.k),))

    def nodes(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float | None = None) -> Nodes | None:
        o = self.options
        return retina_nodes(k, v, mask, o.leaf, o.k, 2, self.levels(k.shape[2]))
