"""TransNormerLLM's NormAttention (Qin et al., 2023, arXiv:2307.14995).

``O = SRMSNorm([(phi(Q) phi(K)^T) * M] V)`` with ``phi = swish`` (SiLU), no softmax denominator, the
per-head exponential decay ``M_ts = lambda_h^(t-s)`` of LRPE-d, and SRMSNorm on the output
(section 3.1-3.3), computed by the Lightning Attention block split of the tiled kernels
(:mod:`fastattn.ops.linear.tiled`). O(n d^2) time. The decay rates and the norm follow the authors'
released code (ALiBi-style slopes, one SRMSNorm over the concatenated heads; see :mod:`.decayed`);
``decay="paper", norm="srms"`` gives the paper's text (``lambda_h = exp(-(8 h / H)(1 - l / L))``, a
norm per head).

Not here (layer-level parts of the paper's block, outside an attention operator over given q, k, v):
the output gate ``O * swish(X W_u)``, and LRPE's rotation ``exp(i theta (t - s))``.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastattn.registry import register
from .decayed import DecayedLinear, DecayedOptions


@register("transnormer", complexity="O(n d^2)", causal=True, decoding=True, padding=True, time_growth=1.0, memory_growth=1.0)
class TransNormer(DecayedLinear):
    """NormAttention: SiLU features, decayed unnormalised linear attention, SRMSNorm."""

    test_options = {"chunk": 16}
    deviations = (
        (
            "Decay rates and output norm follow the authors' released code (ALiBi slopes, SRMSNorm over the "
            "concatenated heads), not the paper's text; decay='paper', norm='srms' give the text's form."
        ),
        (
            "The output gate O * swish(X W_u) and LRPE's rotation exp(i theta (t - s)) are not applied (they "
            "act on the layer input, outside an attention operator over given q, k, v)."
        ),
    )

    @dataclass(frozen=True)
    class Options(DecayedOptions):
        activation: str = "silu"  # feature map on q and k: none | silu | elu1 | relu
