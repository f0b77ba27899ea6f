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

**LRPE** (``lrpe=True``): LRPE-d is the decay times a rotation, ``a_ts = Re[q_t^T k_s e^(i theta (t - s))]
lambda^(t-s)`` (section 3.1.1), i.e. with real features

    a_ts = sum_d phi(q_t)_d phi(k_s)_d cos(theta_d (t - s)) lambda^(t - s),

``theta`` learned per head and channel (initialised, as in the authors' code, to ``10000^(-2 i / (H E))``
over the ``H E`` channels of all heads). The fast path doubles the features, ``[phi(x_t) cos(theta t),
phi(x_t) sin(theta t)]`` at absolute positions (decoding continues from the state's length), whose dot
products are those cosines; :meth:`TransNormer.reference` writes the cosine sum. With ``theta`` learned the
operator owns parameters: ``lrpe=True`` is a layer option (``MultiheadAttention``); the default is off, as
in the authors' code, which switches it per model (``linear_use_lrpe``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from fastattn.core.layer import LayerConfig, ProjectedAttention
from fastattn.core.masks import Mask
from fastattn.ops.linear.engine import dense_kernel_attention
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
    layer_test_options = {"chunk": 16, "lrpe": True}  # the layer contract suite runs the full GLA + LRPE-d
    deviations = (
        (
            "Decay rates and output norm follow the authors' released code (ALiBi slopes, SRMSNorm over the "
            "concatenated heads), not the paper's text; decay='paper', norm='srms' give the text's form."
        ),
        (
            "LRPE's rotation is off by default (lrpe=False: only LRPE-d's decay), as in the authors' code; the "
            "output gate X W_u is the layer's (MultiheadAttention), not the operator's (fastattn.attention)."
        ),
    )

    @dataclass(frozen=True)
    class Options(DecayedOptions):
        activation: str = "silu"  # feature map on q and k: none | silu | elu1 | relu
        lrpe: bool = False  # LRPE's learned rotation cos(theta (t - s)) on top of the decay (layer only)

    def __init__(self, options: Any = None, **kw: Any) -> None:
        super().__init__(options, **kw)
        if self.options.lrpe:
            h, e = self.num_heads, self.head_dim
            theta = 10000.0 ** (-2.0 / (h * e) * torch.arange(h * e, dtype=torch.float64))
            self.theta = nn.Parameter(theta.view(h, e).to(torch.get_default_dtype()))

    def _angles(self, pos: Tensor, dtype: torch.dtype) -> Tensor:
        """``theta_hd * pos`` ``(B|1, H, L, E)`` from positions ``(B|1, H|1, L)``."""
        return self.theta.to(dtype)[None, :, None, :] * pos.to(dtype)[..., None]

    def features(self, x: Tensor, *, is_query: bool, scale: float, mask: Mask) -> Tensor:
        x = super().features(x, is_query=is_query, scale=scale, mask=mask)
        if not self.options.lrpe:
            return x
        ang = self._angles((mask.q_pos if is_query else mask.k_pos)(x.device), x.dtype)
        return torch.cat([x * torch.cos(ang), x * torch.sin(ang)], dim=-1)

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
        """With LRPE: ``a_ts = sum_d phi(q_t)_d phi(k_s)_d cos(theta_d (t - s))``, decayed and masked as
        without it (:func:`~fastattn.ops.linear.engine.dense_kernel_attention` given the scores)."""
        if not self.options.lrpe:
            return super().reference(q, k, v, mask, scale)
        fq = DecayedLinear.features(self, q, is_query=True, scale=scale, mask=mask)
        fk = DecayedLinear.features(self, k, is_query=False, scale=scale, mask=mask)
        dist = mask.q_pos(q.device)[..., :, None] - mask.k_pos(q.device)[..., None, :]  # (1, 1, Lq, Lk)
        cos = torch.cos(self.theta.to(q.dtype)[None, :, None, None, :] * dist.to(q.dtype)[..., None])
        scores = torch.einsum("bhtd,bhsd,bhtsd->bhts", fq, fk, cos)
        out = dense_kernel_attention(fq, fk, v, mask, normalize=False, scores=scores,
                                     **self._decay(self.decay() if mask.causal else None))
        return self._norm(out)
