"""Fast attention of "Real-time Semantic Segmentation with Fast Attention" (Hu et al., 2020,
arXiv:2007.03815).

The softmax of the non-local block is replaced by cosine similarity, after which the product can be
re-ordered:

``y = (1/n) * Q~ (K~^T V)``, ``Q~ = Q / ||Q||_2``, ``K~ = K / ||K||_2`` (each position's vector
l2-normalised over its channels), ``n`` = number of (real) key positions.

So each output is the mean over keys of ``cos(q, k) v`` -- the same matrix as
``(1/n) cos(Q, K) V`` computed in O(n d^2) instead of O(n^2 d). No softmax, no denominator and no
temperature (``scale`` has no effect). Non-causal, as in the paper (a segmentation module); padding
keys are removed from both the sum and ``n``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from fastattn.core.masks import Mask
from fastattn.registry import register
from .base import KernelMechanism
from fastattn.ops.features import l2_normalize, real_key_count


@register("realtime_fast", complexity="O(n d^2)", causal=False, decoding=False, padding=True, time_growth=1.0, memory_growth=1.0)
class RealtimeFastAttention(KernelMechanism):
    """``(1/n) l2(Q) (l2(K)^T V)``."""

    normalize = False

    @dataclass(frozen=True)
    class Options:
        pass

    def features(self, x: Tensor, *, is_query: bool, scale: float, mask: Mask) -> Tensor:
        x = l2_normalize(x)
        if is_query:
            return x
        n = real_key_count(mask, x.shape[0], mask.lk, x.dtype, x.device)
        return x / n.clamp_min(1.0)
