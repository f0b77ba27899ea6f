"""Self-attention does not need O(n^2) memory (Rabe & Staats, 2021, arXiv:2112.05682).

Exact softmax attention computed ``query_chunk`` queries at a time; for each query chunk the keys are
visited ``key_chunk`` at a time with a running log-sum-exp (:mod:`fastattn.ops.softmax.online`). Both levels are
checkpointed, so backward recomputes a chunk instead of storing it: peak memory is
O(n * (query_chunk + key_chunk)) rather than O(n^2). Time is the same O(n^2 d) as exact attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fastattn.core.base import Mechanism
from fastattn.ops.chunked import checkpointed, query_chunked
from fastattn.ops.softmax.dense import dense_attention
from fastattn.core.masks import Mask
from fastattn.ops.softmax.online import online_softmax
from fastattn.registry import register


@register(
    "memory_efficient", complexity="O(n^2 d) time, O(n) memory", causal=True, decoding=True, padding=True,
    exact=True, attn_mask=True, dropout=True,
    time_growth=2.0, memory_growth=1.0,
)
class MemoryEfficientAttention(Mechanism):
    """Chunked exact attention with checkpointed chunks (see module docstring)."""

    half_precision = "native"  # its softmax ops accumulate half inputs in float32 themselves

    test_options = {"query_chunk": 16, "key_chunk": 7}

    @dataclass(frozen=True)
    class Options:
        query_chunk: int = 1024
        key_chunk: int = 4096

        def __post_init__(self) -> None:
            if self.query_chunk < 1 or self.key_chunk < 1:
                raise ValueError(f"chunk sizes must be >= 1, got {self.query_chunk}, {self.key_chunk}")

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, dropout_p: float = 0.0) -> Tensor:
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        kc = self.options.key_chunk

        def query_chunk(q_blk: Tensor, k_: Tensor, v_: Tensor, q0: int) -> Tensor:
            # key chunks inside a query chunk are checkpointed too (nested), as in the paper
            wrap = checkpointed if grad else None
            return online_softmax(q_blk, k_, v_, mask, scale, q0, kc, dropout_p, wrap=wrap)[0]

        return query_chunked(query_chunk, q, k, v, chunk=self.options.query_chunk).to(q.dtype)

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
        return dense_attention(q, k, v, mask, scale)
