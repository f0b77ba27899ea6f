"""Random Feature Attention (Peng et al., 2021, arXiv:2103.02143).

Queries and keys are scaled to unit norm, so ``exp(q . k / sigma^2)`` is proportional to the Gaussian
kernel ``exp(-|q - k|^2 / (2 sigma^2))``, which random Fourier features estimate without bias (eq. 3)::

    phi(x) = D^(-1/2) [sin(w_i . x / sigma), cos(w_i . x / sigma)]_{i=1..D},   w_i ~ N(0, I_d),
    E[phi(x) . phi(y)] = exp(-|x - y|^2 / (2 sigma^2));

``kernel="arccos"`` uses ``phi(x) = D^(-1/2) relu(W x)`` (the arc-cosine kernel, section 3.1).
``RFA(q_t) = phi(q_t) S_t / phi(q_t) z_t`` with ``S = sum phi(k) v^T``, ``z = sum phi(k)`` (eq. 4-5).

Gated RFA (eq. 7), ``gate=True``: a learned per-token gate decays the recurrent state,
``S_t = g_t S_{t-1} + (1 - g_t) phi(k_t) v_t^T`` (same for ``z``) -- a recency bias for the causal form --
with ``g_t = sigmoid(w_g . x_t + b_g)`` computed from the token's layer input ``x_t`` (one gate per head).
The gate is a layer part: ``MultiheadAttention(d, h, "rfa", gate=True)`` builds :class:`RFALayer`, which
owns ``gate_proj`` (``w_g, b_g`` of every head) and hands the gate logits to the operator
(:meth:`RFA.run_gated`, :meth:`RFA.step_gated`). ``fastattn.attention(q, k, v, method="rfa")`` stays the
ungated operator; with ``gate=True`` it is a ``ValueError`` (an operator over ``q, k, v`` does not see
``x_t``). Gated RFA is causal only (the paper's recurrent form); a non-causal call is a ``ValueError``.

O(n D d) time; the random matrix is a buffer drawn from ``generator``, redrawn by :meth:`RFA.redraw`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastattn.core.checks import build_mask, check_inputs, repeat_kv
from fastattn.core.layer import LayerConfig, ProjectedAttention
from fastattn.core.masks import Mask
from fastattn.registry import register
from fastattn.ops.linear.engine import dense_kernel_attention, linear_attention
from fastattn.ops.linear.state import LinearState
from .random_features import RandomFeatureMechanism

__all__ = ["RFA", "RFALayer"]


@register("rfa", complexity="O(n D d)", causal=True, decoding=True, padding=True, randomized=True, time_growth=1.0, memory_growth=1.0)
class RFA(RandomFeatureMechanism):
    """Random Fourier (or arc-cosine) features on unit-norm q, k; optional learned gate (layer only)."""

    test_options = {"num_features": 16, "chunk": 16}
    deviations = ("The kernel width sigma is a fixed option; the paper learns it.",)
    tokenwise = True
    kernel_form = True  # forward: the base form (features ignore the scale); gated: token_gates

    @dataclass(frozen=True)
    class Options:
        num_features: int = 128  # D random vectors (2D features for the Gaussian kernel)
        kernel: str = "gaussian"  # "gaussian" (random Fourier features) or "arccos"
        sigma: float = 1.0  # Gaussian kernel width (the paper learns it; here a fixed option)
        gate: bool = False  # gated RFA: g_t = sigmoid(w_g . x_t + b_g) decays the causal state (layer only)
        gate_init: float = 0.9  # initial value of the gate (its bias b_g; w_g starts at 0), in (0, 1)
        chunk: int = 128  # chunk length of the causal scan

        def __post_init__(self) -> None:
            if self.num_features < 1:
                raise ValueError(f"num_features must be >= 1, got {self.num_features}")
            if self.kernel not in ("gaussian", "arccos"):
                raise ValueError(f"kernel must be 'gaussian' or 'arccos', got {self.kernel!r}")
            if not self.sigma > 0:
                raise ValueError(f"sigma must be > 0, got {self.sigma}")
            if not 0.0 < self.gate_init < 1.0:
                raise ValueError(f"gate_init must be in (0, 1), got {self.gate_init}")
            if self.chunk < 1:
                raise ValueError(f"chunk must be >= 1, got {self.chunk}")

    def feature_map(self, x: Tensor) -> Tensor:
        """``phi(x)`` of already-normalised ``x``: its dot products estimate the kernel."""
        wx = torch.matmul(x, self.projection.to(x.dtype).t())
        d = self.options.num_features
        if self.options.kernel == "arccos":
            return F.relu(wx) * d ** -0.5
        wx = wx / self.options.sigma
        return torch.cat([torch.sin(wx), torch.cos(wx)], dim=-1) * d ** -0.5

    def features(self, x: Tensor, *, is_query: bool, scale: float, mask: Mask) -> Tensor:
        return self.feature_map(x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6))

    def _ungated(self) -> None:
        if self.options.gate:
            raise ValueError(
                "gated rfa computes its gate from the layer input x_t, which an operator over q, k, v does not "
                "see: use fastattn.MultiheadAttention(..., method='rfa', gate=True) (or RFA.run_gated with the "
                "gate logits)"
            )

    def _parts(self, q: Tensor, k: Tensor, mask: Mask, logits: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """Features and the log-gates ``log g = logsigmoid(logits)`` (exact where ``g`` underflows to 0);
        the keys are scaled by ``1 - g = sigmoid(-logits)``."""
        fq = self.features(q, is_query=True, scale=1.0, mask=mask)
        fk = self.features(k, is_query=False, scale=1.0, mask=mask)
        if logits is None:
            return fq, fk, None
        if not mask.causal:
            raise ValueError("gated rfa is a causal (recurrent) form; use is_causal=True or gate=False")
        return (fq, *self.token_gates(fk, logits))

    @property
    def gated(self) -> bool:
        return self.options.gate

    def token_gates(self, fk: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
        """Keys scaled by ``1 - g = sigmoid(-logits)``, log-gates ``log g = logsigmoid(logits)``."""
        logits = logits.to(fk.dtype)
        return fk * torch.sigmoid(-logits).unsqueeze(-1), F.logsigmoid(logits)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, logits: Tensor | None, reference: bool) -> Tensor:
        fq, fk, g = self._parts(q, k, mask, logits)
        if reference:
            return dense_kernel_attention(fq, fk, v, mask, log_decay=g).to(v.dtype)
        return linear_attention(fq, fk, v, mask, log_decay=g, chunk=self.chunk)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, dropout_p: float = 0.0) -> Tensor:
        self._ungated()
        return self._attend(q, k, v, mask, None, reference=False)

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
        self._ungated()
        return self._attend(q, k, v, mask, None, reference=True)

    def _check_logits(self, logits: Tensor, q: Tensor, k: Tensor) -> None:
        if not self.options.gate:
            raise ValueError("gate logits given to an ungated rfa (gate=False)")
        want = (q.shape[0], q.shape[1], k.shape[2])
        if tuple(logits.shape) != want:
            raise ValueError(f"gate logits must be (batch, heads, key length) = {want}, got {tuple(logits.shape)}")

    def run_gated(
        self, q: Tensor, k: Tensor, v: Tensor, logits: Tensor, *, key_padding_mask: Tensor | None = None,
        reference: bool = False,
    ) -> Tensor:
        """Gated RFA (causal) with the gate logits ``w_g . x_t + b_g`` ``(B, H, Lk)`` of every key token,
        computed by the caller from the layer input (:class:`RFALayer`). The checks of :meth:`run`."""
        check_inputs(self.spec, q, k, v, key_padding_mask=key_padding_mask, attn_mask=None, is_causal=True,
                     dropout_p=0.0)
        self._check_logits(logits, q, k)
        dtype = q.dtype
        q, k, v = self.upcast(q, k, v)
        groups = q.shape[1] // k.shape[1]
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        mask = build_mask(q, k, key_padding_mask, None, True)
        return self._attend(q, k, v, mask, logits, reference).to(dtype)

    def step(
        self, q: Tensor, k: Tensor, v: Tensor, state: Any, scale: float, key_padding_mask: Tensor | None = None
    ) -> tuple[Tensor, LinearState]:
        self._ungated()
        return self._step(q, k, v, None, state, key_padding_mask)

    def step_gated(
        self, q: Tensor, k: Tensor, v: Tensor, logits: Tensor, state: Any, key_padding_mask: Tensor | None = None
    ) -> tuple[Tensor, LinearState]:
        """Decode with the gate logits ``(B, H, T)`` of the new tokens (see :meth:`run_gated`)."""
        self._check_logits(logits, q, k)
        return self._step(q, k, v, logits, state, key_padding_mask)

    def _step(
        self, q: Tensor, k: Tensor, v: Tensor, logits: Tensor | None, state: Any, key_padding_mask: Tensor | None
    ) -> tuple[Tensor, LinearState]:
        dtype = q.dtype
        q, k, v = self.upcast(q, k, v)
        groups = q.shape[1] // k.shape[1]
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        mask = Mask(lq=q.shape[2], lk=k.shape[2], key_padding=key_padding_mask, causal=True)  # padded gates: 1
        fq, fk, g = self._parts(q, k, mask, logits)
        out, state = linear_attention(fq, fk, v, mask, log_decay=g, chunk=self.chunk, state=state, return_state=True)
        return out.to(dtype), state


class RFALayer(ProjectedAttention):
    """The layer of ``MultiheadAttention(method="rfa")``: the standard layer, plus, with ``gate=True``,
    the gate projection ``gate_proj`` (``w_g . x_t + b_g`` per head, from the key-side input: ``x`` in
    self-attention, ``context`` in cross-attention) whose logits gate the causal state."""

    returns_core_weights: ClassVar[bool] = False
    sequence_parallel = True  # the gate is per token; its logits reach the core through attend

    def __init__(self, options: Any, config: LayerConfig, *, generator: torch.Generator | None = None) -> None:
        super().__init__(options, config, generator=generator)
        self.gate_proj: nn.Linear | None = None
        if self.core.options.gate:
            p = self.core.options.gate_init
            self.gate_proj = nn.Linear(config.kdim, config.num_heads, device=config.device, dtype=config.dtype)
            with torch.no_grad():  # every gate starts at gate_init, whatever the input
                self.gate_proj.weight.zero_()
                self.gate_proj.bias.fill_(math.log(p / (1 - p)))

    @property
    def requires_causal(self) -> bool:
        return self.gate_proj is not None

    def gate_logits(self, source: Tensor) -> Tensor:
        """``w_g . x_t + b_g`` ``(B, H, L)`` of the key-side input ``source (B, L, kdim)``."""
        return self.gate_proj(source).transpose(1, 2)

    def _gated_heads(
        self, x: Tensor, context: Tensor | None, value: Tensor | None, key_padding_mask: Tensor | None,
        attn_mask: Tensor | None, is_causal: bool, reference: bool,
    ) -> Tensor:
        if attn_mask is not None:
            raise ValueError("method 'rfa' does not take an attn_mask")
        if not is_causal:
            raise ValueError("gated rfa is a causal (recurrent) form; use is_causal=True or gate=False")
        q, k, v = self.project(x, context, value)
        logits = self.gate_logits(x if context is None else context)
        return self.attend(q, k, v, reference=reference, key_padding_mask=key_padding_mask, is_causal=True,
                           gate_logits=logits)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, reference: bool = False, **masks: Any) -> Tensor:
        """The core; with ``gate_logits`` (gated), :meth:`RFA.run_gated` over them."""
        logits = masks.pop("gate_logits", None)
        if logits is None:
            return super().attend(q, k, v, reference=reference, **masks)
        reference = reference or self.config.backend == "reference"
        return self.core.run_gated(q, k, v, logits, key_padding_mask=masks.get("key_padding_mask"),
                                   reference=reference)

    def forward(
        self, x: Tensor, context: Tensor | None = None, value: Tensor | None = None, *,
        key_padding_mask: Tensor | None = None, attn_mask: Tensor | None = None, is_causal: bool = False,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if self.gate_proj is None:
            return super().forward(
                x, context, value, key_padding_mask=key_padding_mask, attn_mask=attn_mask, is_causal=is_causal,
                need_weights=need_weights,
            )
        heads = self._gated_heads(x, context, value, key_padding_mask, attn_mask, is_causal, reference=False)
        self.aux_loss = self.core.aux_loss
        return self.out_proj(self.merge(heads)), None

    def reference(
        self, x: Tensor, context: Tensor | None = None, value: Tensor | None = None, *,
        key_padding_mask: Tensor | None = None, attn_mask: Tensor | None = None, is_causal: bool = False,
    ) -> Tensor:
        """Projections; ``g_t = sigmoid(w_g . x_t + b_g)``; the dense gated recurrence (the core's
        reference, with ``prod g`` as the decay of every (t, s) pair); the output projection."""
        if self.gate_proj is None:
            return super().reference(
                x, context, value, key_padding_mask=key_padding_mask, attn_mask=attn_mask, is_causal=is_causal
            )
        heads = self._gated_heads(x, context, value, key_padding_mask, attn_mask, is_causal, reference=True)
        return self.out_proj(self.merge(heads))

    def step(self, x: Tensor, state: Any, *, key_padding_mask: Tensor | None = None) -> tuple[Tensor, Any]:
        if self.gate_proj is None:
            return super().step(x, state, key_padding_mask=key_padding_mask)
        q, k, v = self.project(x, None, None)
        heads, state = self.core.step_gated(q, k, v, self.gate_logits(x), state, key_padding_mask)
        self.aux_loss = self.core.aux_loss
        return self.out_proj(self.merge(heads)), state


RFA.layer_form = RFALayer
RFA.layer_test_options = {**RFA.test_options, "gate": True}
