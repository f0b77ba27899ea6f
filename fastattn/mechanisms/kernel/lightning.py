"""Lightning Attention-2 (Qin et al., 2024, arXiv:2401.04658).

Causal linear attention with decay, ``O = [(Q K^T) * M] V``, ``M_ts = lambda^(t-s)`` (s <= t), computed
tile-wise: the masked quadratic form inside a block and a recurrent ``d x d`` state across blocks
(the intra/inter-block split of the tiled kernels in :mod:`fastattn.ops.linear.tiled`). There is
no softmax denominator; as in the TransNormerLLM models it was built for, the output is normalised by
SRMSNorm (``norm="none"`` gives the raw operator). Per-head decay rates follow TransNormerLLM
(see :mod:`.decayed`). O(n d^2) time, O(n chunk + d^2) memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastattn.registry import register
from .decayed import DecayedLinear, DecayedOptions


@register("lightning", complexity="O(n d^2)", causal=True, decoding=True, padding=True)
class Lightning(DecayedLinear):
    """Decayed, unnormalised linear attention (identity feature map) + SRMSNorm."""

    test_options = {"chunk": 16}

    @dataclass(frozen=True)
    class Options(DecayedOptions):
        activation: str = "none"  # feature map on q and k: none | silu | elu1 | relu
