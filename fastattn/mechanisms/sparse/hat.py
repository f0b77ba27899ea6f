"""Hierarchical Attention Transformers (Chalkidis et al., 2022, arXiv:2210.05529).

The document is split into segments of ``segment`` tokens. Segment-wise attention runs inside each
segment; a learned segment encoder summarises each segment into a representative (a learned query
per head attends over the segment's keys, giving the representative's key and value); the
representatives then attend to each other (cross-segment attention), and every token attends, in one
softmax, to the tokens of its own segment and to all updated representatives -- the paper's
interleaved segment-wise / cross-segment encoder within one layer. The representative queries are
learned parameters (layer-only). O(n s + (n / s)^2) per head. Non-causal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastattn.ops.softmax.dense import dense_attention
from fastattn.core.masks import Mask
from fastattn.registry import register
from .base import PatternMechanism, check_positive
from fastattn.ops.sparse.nodes import Nodes
from fastattn.ops.sparse.patterns import Pattern, SameBlock


@register(
    "hat", complexity="O(n s + (n / s)^2) d", causal=False, decoding=False, padding=True,
    time_growth=2.0, memory_growth=2.0,
)
class HATAttention(PatternMechanism):
    """Segment-wise attention plus cross-segment attention between learned segment representatives."""

    test_options = {"segment": 8}
    heads_independent = False  # per-head segment queries

    @dataclass(frozen=True)
    class Options:
        segment: int = 128  # tokens per segment

        def __post_init__(self) -> None:
            check_positive(segment=self.segment)

    def __init__(self, options=None, **kw) -> None:
        super().__init__(options, **kw)
        self.segment_query = nn.Parameter(torch.randn(self.num_heads, self.head_dim))

    def pattern(self, lq: int, lk: int, device: torch.device) -> Pattern:
        return Pattern(self.options.segment, (SameBlock(self.options.segment),))

    def nodes(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float | None = None) -> Nodes | None:
        s, dt = self.options.segment, k.dtype
        b, h, n, e = k.shape
        m = -(-n // s)
        scale = e ** -0.5 if scale is None else scale
        pad = m * s - n
        kk = F.pad(k.to(dt), (0, 0, 0, pad)).view(b, h, m, s, e)
        vv = F.pad(v.to(dt), (0, 0, 0, pad)).view(b, h, m, s, v.shape[3])
        keep = torch.ones(b, n, dtype=torch.bool, device=k.device) if mask.key_padding is None else ~mask.key_padding
        keep = F.pad(keep, (0, pad)).view(b, m, s)
        # segment encoder: a learned query pools each segment (padding excluded)
        sq = self.segment_query.to(dt)[None, :, None, None, :].expand(b, h, m, 1, e)
        pool_mask = Mask(1, s, key_padding=None)
        bias = torch.zeros(b, 1, m, 1, s, dtype=dt, device=k.device).masked_fill(~keep[:, None, :, None, :], float("-inf"))
        rep_k = dense_attention(sq, kk, kk, pool_mask, scale, extra_bias=bias).squeeze(3)  # (b, h, m, e)
        rep_v = dense_attention(sq, kk, vv, pool_mask, scale, extra_bias=bias).squeeze(3)
        alive = keep.any(-1)  # (b, m)
        # cross-segment attention between representatives
        rep_v = dense_attention(rep_k, rep_k, rep_v, Mask(m, m, key_padding=~alive), scale)
        return Nodes(rep_k, rep_v, lambda qpos: alive[(slice(None), None) + (None,) * (qpos.dim() - 1) + (slice(None),)])
