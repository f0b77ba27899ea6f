"""Efficient Attention (Shen et al., 2018/2021, arXiv:1812.01243): attention with linear complexities.

``E(Q, K, V) = rho_q(Q) (rho_k(K)^T V)`` -- the two normalisations of dot-product attention are moved
onto the factors so that the ``d x d`` context ``rho_k(K)^T V`` is formed first (O(n d^2), O(d^2) extra
memory). The paper gives two choices of ``rho``:

* ``normalization="softmax"`` (the default): ``rho_q`` = softmax over each query's *features*,
  ``rho_k`` = softmax over *positions* for each key feature (padding keys excluded from that softmax).
  Each context column ``rho_k(K)^T V`` is then a convex combination of values ("global context
  vectors") and each query mixes them with its own softmax weights;
* ``normalization="scaling"``: ``rho_q(Y) = rho_k(Y) = Y / sqrt(n)``, which makes efficient attention
  *exactly* equal to dot-product attention with scaling normalisation, ``(Q K^T / n) V`` (``n`` = real keys).

There is no denominator and no temperature: the paper uses none, so ``scale`` has no effect here (as in
``linear``). Non-causal only: the key softmax runs over all positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fastattn.core.masks import Mask, masked_softmax
from fastattn.registry import register
from .base import KernelMechanism
from fastattn.ops.features import padding_bias, real_key_count

_NORMALIZATIONS = ("softmax", "scaling")


@register("efficient", complexity="O(n d^2)", causal=False, decoding=False, padding=True, time_growth=1.0, memory_growth=1.0)
class EfficientAttention(KernelMechanism):
    """``rho_q(Q) (rho_k(K)^T V)`` with softmax or scaling normalisation (see module docstring)."""

    normalize = False

    @dataclass(frozen=True)
    class Options:
        normalization: str = "softmax"  # "softmax" | "scaling"

        def __post_init__(self) -> None:
            if self.normalization not in _NORMALIZATIONS:
                raise ValueError(
                    f"normalization must be one of {_NORMALIZATIONS}, got {self.normalization!r}"
                )

    def features(self, x: Tensor, *, is_query: bool, scale: float, mask: Mask) -> Tensor:
        if self.options.normalization == "scaling":
            n = real_key_count(mask, x.shape[0], mask.lk, x.dtype, x.device)
            return x / torch.sqrt(n.clamp_min(1.0))
        if is_query:
            return torch.softmax(x, dim=-1)
        bias = padding_bias(mask, x.dtype, x.device, dim=-2)  # padding keys take no share
        return masked_softmax(x, bias, dim=-2)
