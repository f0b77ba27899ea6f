"""Graves' soft window (Graves, 2013, arXiv:1308.0850): "Generating Sequences With Recurrent Neural
Networks", section 5.1 (the handwriting synthesis network's window layer).

From the decoder state ``h_t`` (the query), ``3K`` numbers ``(α̂_t, β̂_t, κ̂_t) = W h_t + b`` give a
mixture of ``K`` Gaussians over the source positions ``u = 1 .. U`` (1-based, as the paper)::

    α_t = exp(α̂_t),  β_t = exp(β̂_t),  κ_t = κ_{t-1} + exp(κ̂_t)          (κ_0 = 0)
    φ(t, u) = Σ_k α_t,k exp(-β_t,k (κ_t,k - u)^2)
    w_t = Σ_u φ(t, u) c_u

so the means ``κ`` only move forward. ``α`` weighs each component, ``β`` sets its width. The weights
``φ`` are **not normalised** (as the paper): a row need not sum to 1 (``normalized = False``); padding
keys (and, with ``is_causal=True``, future keys) get weight 0. The keys enter only through their length
(the window is located by position, not by content); ``c_u`` are the values (default: the keys).

Query-recurrent (``recurrent = True``): ``κ_t`` is a running sum over the queries, so a forward over
``Lq`` queries equals ``Lq`` decoder :meth:`step` calls from a fresh state, which carries ``κ`` ``(B, K)``
in a :class:`GMMWindowState`. The registry's ``causal=True`` means this decoder use; ``is_causal=True``
additionally hides keys ``j > Lk - Lq + i`` (self-attention use).

``parameterization="softplus"`` replaces the three ``exp`` by softplus (the GMMv2b form of Battenberg et
al. 2019, arXiv:1910.10288, which avoids the ``exp`` overflow); the default is the paper's.

Efficient path: one cumulative sum over the queries and the ``(B, chunk, K, Lk)`` mixture evaluated in
query chunks of at most ``chunk_bytes`` (recomputed in backward): time ``O(B Lq Lk K)``, memory
``O(B Lq Lk)`` for the returned weights. The reference runs the recurrence step by step and sums the
mixture one ``(t, u, k)`` at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastattn.core.alignment import AlignmentMechanism, AlignmentState
from fastattn.core.masks import Mask
from fastattn.ops.chunked import query_chunked
from fastattn.registry import register

__all__ = ["GMMWindow", "GMMWindowState"]


@dataclass(frozen=True)
class GMMWindowState(AlignmentState):
    """:class:`AlignmentState` plus ``kappa (B, K)``, the mixture means after the steps taken."""

    kappa: Tensor | None = None


def _mixture(params: Tensor, positions: Tensor, q0: int) -> Tensor:
    """``Σ_k α_k exp(-β_k (κ_k - u)^2)`` for ``params (B, 1, c, 3, K)`` -> ``(B, 1, c, U)``."""
    alpha, beta, kappa = params.unbind(-2)  # (B, 1, c, K) each
    d = kappa[..., None] - positions  # (B, 1, c, K, U)
    return (alpha[..., None] * torch.exp(-beta[..., None] * d * d)).sum(-2)


@register(
    "gmm_window", complexity="O(Lq Lk K)", causal=True, decoding=True, padding=True, weights=True,
    time_growth=2.0, memory_growth=2.0,
)
class GMMWindow(AlignmentMechanism):
    """Graves' Gaussian-mixture soft window (see the module docstring)."""

    normalized = False
    recurrent = True
    test_options = {"components": 3, "chunk_bytes": 512}
    deviations = (
        "The window's weights are applied to the given values (default: the keys) rather than to one-hot "
        "characters; keys matter only through their length.",
    )

    @dataclass(frozen=True)
    class Options:
        components: int = 10  # K, the mixture's components (paper: 10)
        parameterization: str = "exp"  # "exp" (the paper) | "softplus" (GMMv2b-style, no overflow)
        chunk_bytes: int = 1 << 26  # memory of one query chunk's (B, chunk, K, Lk) mixture

        def __post_init__(self) -> None:
            if not isinstance(self.components, int) or self.components < 1:
                raise ValueError(f"components must be a positive integer, got {self.components!r}")
            if self.parameterization not in ("exp", "softplus"):
                raise ValueError(f"parameterization must be 'exp' or 'softplus', got {self.parameterization!r}")
            if self.chunk_bytes < 1:
                raise ValueError(f"chunk_bytes must be >= 1, got {self.chunk_bytes}")

    def __init__(self, options=None, *, query_dim: int, key_dim: int, value_dim: int) -> None:
        super().__init__(options, query_dim=query_dim, key_dim=key_dim, value_dim=value_dim)
        self.window = nn.Linear(query_dim, 3 * self.options.components)  # W, b

    def _positive(self, x: Tensor) -> Tensor:
        return torch.exp(x) if self.options.parameterization == "exp" else F.softplus(x)

    def parameters_of(self, query: Tensor, kappa0: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``α, β, κ`` each ``(B, Lq, K)`` for ``query (B, Lq, Dq)``, the means continuing from ``kappa0``."""
        alpha, beta, step = self._positive(self.window(query)).chunk(3, dim=-1)
        kappa = torch.cumsum(step, dim=1)
        return alpha, beta, kappa if kappa0 is None else kappa + kappa0[:, None]

    def _run(self, query: Tensor, values: Tensor, mask: Mask, kappa0: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        alpha, beta, kappa = self.parameters_of(query, kappa0)
        b, _, k = alpha.shape
        lk = mask.lk
        positions = torch.arange(1, lk + 1, dtype=query.dtype, device=query.device)
        params = torch.stack([alpha, beta, kappa], dim=-2)[:, None]  # (B, 1, Lq, 3, K)
        rows = max(1, self.options.chunk_bytes // max(1, b * k * lk * query.element_size()))
        phi = query_chunked(_mixture, params, positions, chunk=rows)[:, 0]  # (B, Lq, Lk)
        allowed = mask.allowed(query.device)
        if allowed is not None:
            phi = torch.where(allowed[:, 0], phi, torch.zeros((), dtype=phi.dtype, device=phi.device))
        return torch.matmul(phi, values), phi, kappa[:, -1]

    def forward(
        self, query: Tensor, keys: Tensor, values: Tensor, mask: Mask, prepared: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        context, phi, _ = self._run(query, values, mask, None)
        return context, phi

    def step(
        self, query: Tensor, keys: Tensor, values: Tensor, state: AlignmentState | None, mask: Mask,
    ) -> tuple[Tensor, Tensor, AlignmentState]:
        if state is None:
            state = GMMWindowState(self.prepare(keys), kappa=query.new_zeros(query.shape[0], self.options.components))
        if not isinstance(state, GMMWindowState) or state.kappa is None:
            raise TypeError(f"gmm_window needs the GMMWindowState of its previous step, got {type(state).__name__}")
        context, phi, kappa = self._run(query, values, mask, state.kappa)
        return context, phi, GMMWindowState(state.keys, state.length + query.shape[1], kappa)

    def reference(self, query: Tensor, keys: Tensor, values: Tensor, mask: Mask) -> tuple[Tensor, Tensor]:
        w, bias = self.window.weight, self.window.bias
        k_comp = self.options.components
        kappa = query.new_zeros(query.shape[0], k_comp)
        rows = []
        for t in range(query.shape[1]):
            hat = query[:, t] @ w.T + bias
            alpha, beta = self._positive(hat[:, :k_comp]), self._positive(hat[:, k_comp:2 * k_comp])
            kappa = kappa + self._positive(hat[:, 2 * k_comp:])
            row = []
            for u in range(1, keys.shape[1] + 1):
                phi = sum(alpha[:, j] * torch.exp(-beta[:, j] * (kappa[:, j] - u) ** 2) for j in range(k_comp))
                row.append(phi)
            rows.append(torch.stack(row, dim=-1))
        phi = torch.stack(rows, dim=1)
        allowed = mask.allowed(query.device)
        if allowed is not None:
            phi = phi * allowed[:, 0]
        return phi @ values, phi
