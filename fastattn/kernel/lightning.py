"""Lightning Attention-2 (Qin et al., 2024, arXiv:2401.04658).

Causal linear attention with decay, ``O = [(Q K^T) * M] V``, ``M_ts = lambda^(t-s)`` (s <= t), computed
tile-wise: the masked quadratic form inside a block and a recurrent ``d x d`` state across blocks
(the intra/inter-block split that :mod:`fastattn.kernel.engine`'s chunked scan implements). There is
no softmax denominator; as in the TransNormerLLM models it was built for, the output is normalised by
SRMSNorm (``norm="none"`` gives the raw operator). Per-head decay rates follow TransNormerLLM
(see :mod:`.decayed`). O(n d^2) time, O(n chunk + d^2) memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..registry import register
from .decayed import DecayedLinear, validate


@register("lightning", complexity="O(n d^2)", causal=True, decoding=True, padding=True)
class Lightning(DecayedLinear):
    """Decayed, unnormalised linear attention (identity feature map) + SRMSNorm."""

    test_options = {"chunk": 16}

    @dataclass(frozen=True)
    class Options:
        decay_base: float = 8.0  # lambda_h = exp(-(decay_base * h / H) * (1 - layer_ratio))
        layer_ratio: float = 0.0  # l / L, the layer's depth in the model
        activation: str = "none"  # feature map on q and k: none | silu | elu1 | relu
        scale_qk: bool = False  # multiply q and k by scale ** 0.5 (the paper does not)
        norm: str = "srms"  # output norm: srms | none
        chunk: int = 128  # block length of the intra/inter-block scan

        def __post_init__(self) -> None:
            validate(self)
