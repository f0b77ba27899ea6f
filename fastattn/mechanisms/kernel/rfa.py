"""Random Feature Attention (Peng et al., 2021, arXiv:2103.02143).

Queries and keys are scaled to unit norm, so ``exp(q . k / sigma^2)`` is proportional to the Gaussian
kernel ``exp(-|q - k|^2 / (2 sigma^2))``, which random Fourier features estimate without bias (eq. 3)::

    phi(x) = D^(-1/2) [sin(w_i . x / sigma), cos(w_i . x / sigma)]_{i=1..D},   w_i ~ N(0, I_d),
    E[phi(x) . phi(y)] = exp(-|x - y|^2 / (2 sigma^2));

``kernel="arccos"`` uses ``phi(x) = D^(-1/2) relu(W x)`` (the arc-cosine kernel, section 3.1).
``RFA(q_t) = phi(q_t) S_t / phi(q_t) z_t`` with ``S = sum phi(k) v^T``, ``z = sum phi(k)`` (eq. 4-5).

Gated RFA (eq. 7), ``gate=True``: a learned per-token gate ``g_t = sigmoid(w_h . k_t + b_h)`` decays the
recurrent state, ``S_t = g_t S_{t-1} + (1 - g_t) phi(k_t) v_t^T`` (same for ``z``) -- a recency bias
for the causal form. The paper computes ``g_t`` from the token's input ``x_t``; an attention operator
over given ``q, k, v`` computes it from the key head ``k_t`` instead. The gate is learned (parameters
``gate_weight``, ``gate_bias``), so the gated form exists only as a layer, and only causally.

O(n D d) time; the random matrix is a buffer drawn from ``generator``, redrawn by :meth:`RFA.redraw`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastattn.core.base import repeat_kv
from fastattn.core.masks import Mask
from fastattn.registry import register
from fastattn.ops.linear.engine import dense_kernel_attention, linear_attention
from fastattn.ops.linear.state import LinearState
from .random_features import RandomFeatureMechanism

__all__ = ["RFA"]


@register("rfa", complexity="O(n D d)", causal=True, decoding=True, padding=True, randomized=True, time_growth=1.0, memory_growth=1.0)
class RFA(RandomFeatureMechanism):
    """Random Fourier (or arc-cosine) features on unit-norm q, k; optional learned gate."""

    test_options = {"num_features": 16, "chunk": 16}
    deviations = (
        (
            "The gate of gated RFA is computed from the key head k_t, not from the token's input x_t "
            "(an attention operator sees only q, k, v)."
        ),
        "The kernel width sigma is a fixed option; the paper learns it.",
    )
    tokenwise = True

    @dataclass(frozen=True)
    class Options:
        num_features: int = 128  # D random vectors (2D features for the Gaussian kernel)
        kernel: str = "gaussian"  # "gaussian" (random Fourier features) or "arccos"
        sigma: float = 1.0  # Gaussian kernel width (the paper learns it; here a fixed option)
        gate: bool = False  # gated RFA: learned per-token gates decay the causal state (layer only)
        gate_init: float = 0.9  # initial value of the gate (its bias), in (0, 1)
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

    def __init__(self, options=None, *, head_dim: int, num_heads: int, num_kv_heads: int | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(options, head_dim=head_dim, num_heads=num_heads, num_kv_heads=num_kv_heads,
                         generator=generator)
        if self.options.gate:
            self.gate_weight = nn.Parameter(torch.zeros(num_heads, head_dim))
            p = self.options.gate_init
            self.gate_bias = nn.Parameter(torch.full((num_heads,), math.log(p / (1 - p))))

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

    def gate_logits(self, k: Tensor) -> Tensor | None:
        """Per-token gate logits ``w_h . k_t + b_h`` ``(B, H, Lk)`` (``g_t = sigmoid``), or ``None``."""
        if not self.options.gate:
            return None
        dt = k.dtype
        # a matmul, not an einsum: under torch.compile the einsum's traced strides differ from eager's
        logits = torch.matmul(k.to(dt), self.gate_weight.to(dt).unsqueeze(-1)).squeeze(-1)  # (B, H, Lk)
        return logits + self.gate_bias.to(dt)[:, None]

    def _parts(self, q: Tensor, k: Tensor, mask: Mask) -> tuple[Tensor, Tensor, Tensor | None]:
        """Features and the log-gates ``log g = logsigmoid(logits)`` (exact where ``g`` underflows to 0);
        the keys are scaled by ``1 - g = sigmoid(-logits)``."""
        fq = self.features(q, is_query=True, scale=1.0, mask=mask)
        fk = self.features(k, is_query=False, scale=1.0, mask=mask)
        logits = self.gate_logits(k)
        if logits is None:
            return fq, fk, None
        if not mask.causal:
            raise ValueError("gated rfa is a causal (recurrent) form; use is_causal=True or gate=False")
        return fq, fk * torch.sigmoid(-logits).unsqueeze(-1), F.logsigmoid(logits)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, dropout_p: float = 0.0) -> Tensor:
        fq, fk, g = self._parts(q, k, mask)
        return linear_attention(fq, fk, v, mask, log_decay=g, chunk=self.chunk)

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
        fq, fk, g = self._parts(q, k, mask)
        return dense_kernel_attention(fq, fk, v, mask, log_decay=g).to(v.dtype)

    def step(
        self, q: Tensor, k: Tensor, v: Tensor, state: Any, scale: float, key_padding_mask: Tensor | None = None
    ) -> tuple[Tensor, LinearState]:
        dtype = q.dtype
        q, k, v = self.upcast(q, k, v)
        groups = q.shape[1] // k.shape[1]
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        mask = Mask(lq=q.shape[2], lk=k.shape[2], key_padding=key_padding_mask, causal=True)  # padded gates: 1
        fq, fk, g = self._parts(q, k, mask)
        out, state = linear_attention(fq, fk, v, mask, log_decay=g, chunk=self.chunk, state=state, return_state=True)
        return out.to(dtype), state
