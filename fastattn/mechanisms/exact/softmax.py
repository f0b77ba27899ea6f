"""Scaled dot-product attention (Vaswani et al., 2017, arXiv:1706.03762).

``Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V`` -- O(n^2 d) time, O(n^2) memory for the weights.
The exact reference every approximation in fastattn is measured against. The fast path is
``torch.nn.functional.scaled_dot_product_attention`` under any mask
(:func:`~fastattn.ops.softmax.fused.fused_attention`); decoding keeps a KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from fastattn.core.base import Mechanism
from fastattn.ops.softmax.dense import dense_attention, dense_weights
from fastattn.ops.softmax.fused import fused_attention
from fastattn.core.masks import Mask
from fastattn.registry import register


@register(
    "softmax", complexity="O(n^2 d)", causal=True, decoding=True, padding=True, exact=True,
    attn_mask=True, dropout=True, weights=True,
    time_growth=2.0, memory_growth=2.0,
)
class SoftmaxAttention(Mechanism):
    """Exact multi-head softmax attention (SDPA fast path, dense reference, KV-cache decoding)."""

    half_precision = "native"  # its softmax ops accumulate half inputs in float32 themselves

    @dataclass(frozen=True)
    class Options:
        pass

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, dropout_p: float = 0.0) -> Tensor:
        return fused_attention(q, k, v, mask, scale, dropout_p)

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
        return dense_attention(q, k, v, mask, scale)

    def weights(self, q: Tensor, k: Tensor, mask: Mask, scale: float) -> Tensor:
        return dense_weights(q, k, mask, scale)
