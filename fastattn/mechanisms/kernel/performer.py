"""Performer / FAVOR+ (Choromanski et al., 2020, arXiv:2009.14794): "Rethinking Attention with Performers".

The softmax kernel ``exp(q . k)`` (with ``q, k`` pre-scaled by ``scale ** 0.5``) is estimated without
bias by positive random features (Lemma 1)::

    phi(x) = m^(-1/2) [exp(w_i . x - |x|^2 / 2)]_{i=1..m},   w_i ~ N(0, I_d),
    E[phi(q) . phi(k)] = exp(q . k),

optionally with orthogonal ``w_i`` (blocks of a Haar-random orthogonal matrix, rows rescaled by
chi-distributed norms so each ``w_i`` is still marginally Gaussian -- the ORF variant of section 2.4,
lower variance). ``kernel="relu"`` is the paper's generalised attention with ``phi(x) = relu(W x)``.
Attention is then linear attention over these features: O(n m d) time, O(n m + m d) memory.

Numerics (exact, no leak): the exponents are shifted before ``exp`` by amounts that cancel.

* query ``i``: its own maximum over features -- a per-query factor cancels between numerator and
  denominator;
* keys: a data-independent per-feature shift ``c_j = max(0, |w_j|^2 / 2 - MARGIN)``, moved to the query
  side (``phi_j(q) phi_j(k) = exp(a_j + c_j) exp(b_j - c_j)``). Since
  ``w . k - |k|^2/2 = |w|^2/2 - |k - w|^2/2 <= |w|^2/2``, every key feature is ``<= exp(MARGIN)`` for
  any input, so sums over 65536 keys cannot overflow, and a key's feature never depends on another
  key (a global max over keys would make past outputs depend numerically on future keys).

The random matrix is a registered buffer drawn from the ``generator`` given at construction;
:meth:`Performer.redraw` draws a new one explicitly (the paper redraws periodically during training).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fastattn.core.masks import Mask
from fastattn.registry import register
from .random_features import RandomFeatureMechanism, draw_gaussian_projection

__all__ = ["Performer", "draw_gaussian_projection"]

MARGIN = 30.0  # key features are bounded by exp(MARGIN)


@register("performer", complexity="O(n m d)", causal=True, decoding=True, padding=True, randomized=True, time_growth=1.0, memory_growth=1.0)
class Performer(RandomFeatureMechanism):
    """FAVOR+ positive (orthogonal) random features for the softmax kernel."""

    test_options = {"num_features": 16, "chunk": 16}
    tokenwise = True

    @dataclass(frozen=True)
    class Options:
        num_features: int = 256  # m, the number of random features
        orthogonal: bool = True  # orthogonal random features (ORF) instead of i.i.d.
        kernel: str = "softmax"  # "softmax" (positive features, FAVOR+) or "relu" (generalised attention)
        chunk: int = 128  # chunk length of the causal scan

        def __post_init__(self) -> None:
            if self.num_features < 1:
                raise ValueError(f"num_features must be >= 1, got {self.num_features}")
            if self.kernel not in ("softmax", "relu"):
                raise ValueError(f"kernel must be 'softmax' or 'relu', got {self.kernel!r}")
            if self.chunk < 1:
                raise ValueError(f"chunk must be >= 1, got {self.chunk}")

    def _exponents(self, x: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        """``x`` pre-scaled by ``scale ** 0.5`` and the exponents ``w . x - |x|^2 / 2`` (unshifted)."""
        dt = x.dtype
        w = self.projection.to(dt)
        x = x.to(dt) * math.sqrt(scale)
        return x, torch.matmul(x, w.t()) - 0.5 * (x * x).sum(dim=-1, keepdim=True)

    def kernel_estimate(self, q: Tensor, k: Tensor, scale: float = 1.0) -> Tensor:
        """The unstabilised random-feature estimate ``phi(q) . phi(k)`` ``(..., Lq, Lk)`` of
        ``exp(scale * q . k)`` (for tests and analysis)."""
        _, a = self._exponents(q, scale)
        _, b = self._exponents(k, scale)
        return torch.matmul(a.exp(), b.exp().transpose(-1, -2)) / self.options.num_features

    def features(self, x: Tensor, *, is_query: bool, scale: float, mask: Mask) -> Tensor:
        # Factors common to all features of a query, or to all keys, cancel in the normalised attention,
        # so phi is computed up to them: no 1/sqrt(m), no exp(-|q|^2/2) for queries. The remaining
        # per-token terms ride in one matmul with augmented vectors: [x, |x|^2, 1] . [w, -1/2, -c].
        dt = x.dtype
        x = x.to(dt)
        w = self.projection.to(dt) * math.sqrt(scale)
        if self.options.kernel == "relu":
            return F.relu(torch.matmul(x, w.t()))
        c = (0.5 * self.projection.to(dt).pow(2).sum(dim=-1) - MARGIN).clamp_min(0.0)  # (m,), module docstring
        if is_query:
            a = torch.addmm(c, x.reshape(-1, x.shape[-1]), w.t()).view(*x.shape[:-1], -1)
            return torch.exp(a - a.amax(dim=-1, keepdim=True).detach())
        sq = (x * x).sum(dim=-1, keepdim=True) * (-0.5 * scale)
        x_aug = torch.cat([x, sq, torch.ones_like(sq)], dim=-1)
        w_aug = torch.cat([w, torch.ones_like(c)[:, None], -c[:, None]], dim=-1)
        return torch.exp(torch.matmul(x_aug, w_aug.t()))
