"""Lightning Attention-2 (Qin et al., 2024, arXiv:2401.04658).

Causal linear attention with decay, ``O = [(Q K^T) * M] V``, ``M_ts = lambda^(t-s)`` (s <= t), computed
tile-wise: the masked quadratic form inside a block and a recurrent ``d x d`` state across blocks
(the intra/inter-block split of the tiled kernels in :mod:`fastattn.ops.linear.tiled`). There is
no softmax denominator; as in the TransNormerLLM models it was built for, the output is normalised by
SRMSNorm over the concatenated heads (``norm="none"`` gives the raw operator). The per-head decay rates
and the norm follow the authors' released code (ALiBi-style slopes; see :mod:`.decayed`), which differs
from the formula in the TransNormerLLM paper's text; ``decay="paper", norm="srms"`` gives that one.
O(n d^2) time, O(n chunk + d^2) memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastattn.registry import register
from .decayed import DecayedLinear, DecayedOptions


@register("lightning", complexity="O(n d^2)", causal=True, decoding=True, padding=True, time_growth=1.0, memory_growth=1.0)
class Lightning(DecayedLinear):
    """Decayed, unnormalised linear attention (identity feature map) + SRMSNorm."""

    test_options = {"chunk": 16}
    deviations = (
        (
            "Decay rates and output norm follow the authors' released code (ALiBi slopes, SRMSNorm over the "
            "concatenated heads), not the paper's text; decay='paper', norm='srms' give the text's form."
        ),
    )

    @dataclass(frozen=True)
    class Options(DecayedOptions):
        activation: str = "none"  # feature map on q and k: none | silu | elu1 | relu
