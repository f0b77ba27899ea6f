"""FlashAttention (Dao et al., 2022, arXiv:2205.14135), tiled in PyTorch.

Exact softmax attention in ``block_q x block_k`` tiles: an online softmax forward that saves only the
output and the row log-sum-exp, and a backward that recomputes each tile's probabilities (the paper's
Algorithm 4). No n x n tensor is ever stored: O(n) memory, O(n^2 d) time; causally empty tiles are
skipped in both passes. The op is :func:`fastattn.ops.softmax.flash.flash_attention`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from fastattn.core.base import Mechanism
from fastattn.core.masks import Mask
from fastattn.ops.softmax.dense import dense_attention
from fastattn.ops.softmax.flash import flash_attention
from fastattn.registry import register


@register(
    "flash", complexity="O(n^2 d) time, O(n) memory", causal=True, decoding=True, padding=True,
    exact=True, attn_mask=True,
    time_growth=2.0, memory_growth=1.0,
)
class FlashAttention(Mechanism):
    """Tiled exact attention with a recomputing backward (see module docstring)."""

    half_precision = "native"  # its softmax ops accumulate half inputs in float32 themselves

    test_options = {"block_q": 16, "block_k": 7}

    @dataclass(frozen=True)
    class Options:
        block_q: int = 1024  # tiles of 1024 x 1024 keep CPU matmuls efficient; 4 MiB per batch-head
        block_k: int = 1024

        def __post_init__(self) -> None:
            if self.block_q < 1 or self.block_k < 1:
                raise ValueError(f"block sizes must be >= 1, got {self.block_q}, {self.block_k}")

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, dropout_p: float = 0.0) -> Tensor:
        return flash_attention(q, k, v, mask, scale, block_q=self.options.block_q, block_k=self.options.block_k)

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
        return dense_attention(q, k, v, mask, scale)
