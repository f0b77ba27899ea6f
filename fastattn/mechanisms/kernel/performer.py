"""Performer / FAVOR+ (Choromanski et al., 2020, arXiv:2009.14794): "Rethinking Attention with Performers".

The softmax kernel ``exp(q . k)`` (with ``q, k`` pre-scaled by ``scale ** 0.5``) is estimated without
bias by positive random features (Lemma 1)::

    phi(x) = m^(-1/2) [exp(w_i . x - |x|^2 / 2)]_{i=1..m},   w_i ~ N(0, I_d),
    E[phi(q) . phi(k)] = exp(q . k),

optionally with orthogonal ``w_i`` (blocks of a Haar-random orthogonal matrix, rows rescaled by
chi-distributed norms so each ``w_i`` is still marginally Gaussian -- the ORF variant of section 2.4,
lower variance). ``kernel="relu"`` is the paper's generalised attention with ``phi(x) = relu(W x)``.
Attention is then linear attention over these features: O(n m d) time, O(n m + m d) memory.

Numerics (exact, no leak): features are computed up to per-token factors that the op accounts for.

* query ``i``: ``exp(w . q - max_j w_j . q)`` -- a per-query factor, which cancels between numerator
  and denominator;
* key ``s``: the same shifted form ``exp(w . k - max_j w_j . k)``, with the per-key log-scale
  ``c_s = max_j w_j . k - |k|^2 / 2`` given to the op (:meth:`Performer.key_log_scale`), which keeps the
  state in units of the running maximum of ``c`` (:mod:`fastattn.ops.linear.engine`), as online softmax
  does. Nothing underflows for keys of any norm: before, a fixed shift left ``exp(w . k - |k|^2 / 2)``
  to underflow in float32 once ``|k|^2 / 2`` exceeded ~90, and 0 / 0 rows came out as zeros. Each
  ``c_s`` and each shift depends on keys ``<= s`` only: a future key never changes a past output.
  Cost: the keys' projection ``W k`` is computed once more for ``c`` (without autograd, in blocks), and
  the causal form runs the op's per-token gated kernels. Float64 results are unchanged (to rounding).

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

_LOG_SCALE_BLOCK = 1024  # tokens per block when computing key log-scales (bounds the (L, m) temporary)


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

    def _projected(self, x: Tensor, scale: float) -> Tensor:
        """``w . x`` for every feature, ``x`` pre-scaled by ``scale ** 0.5``: ``(..., L, m)``."""
        w = self.projection.to(x.dtype) * math.sqrt(scale)
        return torch.matmul(x, w.t())

    def features(self, x: Tensor, *, is_query: bool, scale: float, mask: Mask) -> Tensor:
        # Factors common to all features of a token are left out: for a query they cancel in the
        # normalised attention; for a key the op multiplies exp(key_log_scale) back (module docstring).
        # No 1/sqrt(m), and exp(-|x|^2/2) is part of the key's log-scale.
        a = self._projected(x, scale)
        if self.options.kernel == "relu":
            return F.relu(a)
        return torch.exp(a - a.amax(dim=-1, keepdim=True).detach())

    def key_log_scale(self, k: Tensor, *, scale: float, mask: Mask) -> Tensor | None:
        """``c_s = max_j w_j . k_s - |k_s|^2 / 2`` (``k`` pre-scaled by ``scale ** 0.5``): the positive
        features of key ``s`` are ``exp(c_s)`` times :meth:`features`. None for the relu kernel. The
        maximum is a constant for autograd (as in :meth:`features`, where it cancels); ``-|k|^2 / 2``
        is differentiable."""
        if self.options.kernel == "relu":
            return None
        with torch.no_grad():
            top = [self._projected(x, scale).amax(dim=-1) for x in k.split(_LOG_SCALE_BLOCK, dim=-2)]
        return (torch.cat(top, dim=-1) if len(top) != 1 else top[0]) - 0.5 * scale * (k * k).sum(dim=-1)
