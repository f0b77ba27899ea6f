"""TransNormerLLM's NormAttention and Gated Linear Attention (Qin et al., 2023, arXiv:2307.14995).

``O = SRMSNorm([(phi(Q) phi(K)^T) * M] V)`` with ``phi = swish`` (SiLU), no softmax denominator, the
per-head exponential decay ``M_ts = lambda_h^(t-s)`` of LRPE-d, and SRMSNorm on the output
(section 3.1-3.3), computed by the Lightning Attention block split of the tiled kernels
(:mod:`fastattn.ops.linear.tiled`). O(n d^2) time. The decay rates and the norm follow the authors'
released code (ALiBi-style slopes, one SRMSNorm over the concatenated heads; see :mod:`.decayed`);
``decay="paper", norm="srms"`` gives the paper's text (``lambda_h = exp(-(8 h / H)(1 - l / L))``, a
norm per head).

The layer (``MultiheadAttention(d, h, "transnormer")``, :class:`TransNormerLayer`) is the paper's Gated
Linear Attention (section 3.2, and the authors' ``NormLinearAttention``)::

    Q = phi(X W_q),  K = phi(X W_k),  V = X W_v,  U = X W_u,
    O = [SRMSNorm((Q K^T * M) V) * U] W_o,

the output gate ``U`` multiplying the normalised heads elementwise before the output projection (no
activation on ``U``, as in the paper's formula and the authors' code). ``fastattn.attention(...,
"transnormer")`` is the operator inside the gate, ``SRMSNorm((Q K^T * M) V)``; a layer-level mechanism
given ``core="transnormer"`` wraps that operator too, without the gate.

Not here: LRPE's rotation. LRPE-d multiplies each score by ``cos(theta (t - s))`` as well as by the decay;
the authors' code doubles the features (``[phi(q_t) cos(theta t), phi(q_t) sin(theta t)]``, likewise for
``k``) with a learned ``theta`` per head and channel, and switches it on per model (``linear_use_lrpe``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from fastattn.core.layer import LayerConfig, ProjectedAttention
from fastattn.registry import register
from .decayed import DecayedLinear, DecayedOptions

__all__ = ["TransNormer", "TransNormerLayer"]


class TransNormerLayer(ProjectedAttention):
    """Gated Linear Attention: the standard layer whose normalised head outputs are multiplied by the
    output gate ``U = X W_u`` (``u_proj``, from the query-side input) before the output projection."""

    returns_core_weights: ClassVar[bool] = False  # the gate rescales every channel: no attention matrix

    def __init__(self, options: Any, config: LayerConfig, *, generator: torch.Generator | None = None) -> None:
        super().__init__(options, config, generator=generator)
        d = config.embed_dim
        self.u_proj = nn.Linear(d, d, bias=config.bias, device=config.device, dtype=config.dtype)
        nn.init.xavier_uniform_(self.u_proj.weight)
        if self.u_proj.bias is not None:
            nn.init.zeros_(self.u_proj.bias)

    def mix(self, x: Tensor, heads: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return heads * self.heads(self.u_proj(x), self.num_heads), None

    def reference(
        self, x: Tensor, context: Tensor | None = None, value: Tensor | None = None, *,
        key_padding_mask: Tensor | None = None, attn_mask: Tensor | None = None, is_causal: bool = False,
    ) -> Tensor:
        """``O = [SRMSNorm((Q K^T * M) V) * (X W_u)] W_o``, with the core's dense reference inside."""
        heads = self.reference_heads(
            x, context, value, key_padding_mask=key_padding_mask, attn_mask=attn_mask, is_causal=is_causal
        )
        u = x @ self.u_proj.weight.t()
        if self.u_proj.bias is not None:
            u = u + self.u_proj.bias
        return self.out_proj(self.merge(heads) * u)


@register("transnormer", complexity="O(n d^2)", causal=True, decoding=True, padding=True, time_growth=1.0, memory_growth=1.0)
class TransNormer(DecayedLinear):
    """NormAttention: SiLU features, decayed unnormalised linear attention, SRMSNorm (the output gate is
    the layer's: :class:`TransNormerLayer`)."""

    test_options = {"chunk": 16}
    layer_form = TransNormerLayer
    deviations = (
        (
            "Decay rates and output norm follow the authors' released code (ALiBi slopes, SRMSNorm over the "
            "concatenated heads), not the paper's text; decay='paper', norm='srms' give the text's form."
        ),
        (
            "LRPE's rotation cos(theta (t - s)) (a learned theta, features doubled) is not implemented; only "
            "its decay lambda^(t - s) is. The output gate X W_u is the layer's (MultiheadAttention), not the "
            "operator's (fastattn.attention)."
        ),
    )

    @dataclass(frozen=True)
    class Options(DecayedOptions):
        activation: str = "silu"  # feature map on q and k: none | silu | elu1 | relu
