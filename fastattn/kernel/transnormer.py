"""TransNormerLLM's NormAttention (Qin et al., 2023, arXiv:2307.14995).

``O = SRMSNorm([(phi(Q) phi(K)^T) * M] V)`` with ``phi = swish`` (SiLU), no softmax denominator, the
per-head exponential decay ``M_ts = lambda_h^(t-s)`` of LRPE-d, and SRMSNorm on the output
(section 3.1-3.3), computed by the Lightning Attention block scan of :mod:`fastattn.kernel.engine`.
O(n d^2) time.

Not here (layer-level parts of the paper's block, outside an attention operator over given q, k, v):
the output gate ``O * swish(X W_u)``, and LRPE's rotation ``exp(i theta (t - s))``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..registry import register
from .decayed import DecayedLinear, validate


@register("transnormer", complexity="O(n d^2)", causal=True, decoding=True, padding=True)
class TransNormer(DecayedLinear):
    """NormAttention: SiLU features, decayed unnormalised linear attention, SRMSNorm."""

    test_options = {"chunk": 16}

    @dataclass(frozen=True)
    class Options:
        decay_base: float = 8.0  # lambda_h = exp(-(decay_base * h / H) * (1 - layer_ratio))
        layer_ratio: float = 0.0  # l / L, the layer's depth in the model
        activation: str = "silu"  # feature map on q and k: silu (paper) | none | elu1 | relu
        scale_qk: bool = False  # multiply q and k by scale ** 0.5 (the paper does not)
        norm: str = "srms"  # output norm: srms (paper) | none
        chunk: int = 128  # block length of the intra/inter-block scan

        def __post_init__(self) -> None:
            validate(self)
