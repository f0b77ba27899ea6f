"""Linear attention (Katharopoulos et al., 2020, arXiv:2006.16236): "Transformers are RNNs".

``V'_i = phi(Q_i)^T sum_j phi(K_j) V_j^T / phi(Q_i)^T sum_j phi(K_j)`` with ``phi(x) = elu(x) + 1``
(eq. 4-7). O(n d^2) time and O(n d) memory; the causal form is an RNN with a ``d x d`` state
(computed here by the tiled kernels of :mod:`fastattn.ops.linear.tiled`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from fastattn.core.masks import Mask
from fastattn.registry import register
from .base import KernelMechanism
from fastattn.ops.features import elu_plus_one


@register("linear", complexity="O(n d^2)", causal=True, decoding=True, padding=True, time_growth=1.0, memory_growth=1.0)
class LinearAttention(KernelMechanism):
    """``phi(x) = elu(x) + 1`` linear attention."""

    test_options = {"chunk": 16}
    tokenwise = True
    fused_features = "elu_plus_one"

    @dataclass(frozen=True)
    class Options:
        chunk: int = 64  # chunk length of the causal scan

        def __post_init__(self) -> None:
            if self.chunk < 1:
                raise ValueError(f"chunk must be >= 1, got {self.chunk}")

    def features(self, x: Tensor, *, is_query: bool, scale: float, mask: Mask) -> Tensor:
        return elu_plus_one(x)
