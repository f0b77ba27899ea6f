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
from fastattn.ops.features import (
    draw_gaussian_projection, random_projection, softmax_kernel_estimate, softmax_kernel_features,
    softmax_kernel_log_scale,
)
from .random_features import RandomFeatureMechanism

__all__ = ["Performer", "draw_gaussian_projection"]



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

    def kernel_estimate(self, q: Tensor, k: Tensor, scale: float = 1.0) -> Tensor:
        """The unstabilised random-feature estimate ``phi(q) . phi(k)`` ``(..., Lq, Lk)`` of
        ``exp(scale * q . k)`` (for tests and analysis)."""
        return softmax_kernel_estimate(q, k, self.projection, scale)

    def features(self, x: Tensor, *, is_query: bool, scale: float, mask: Mask) -> Tensor:
        # Factors common to all features of a token are left out: for a query they cancel in the
        # normalised attention; for a key the op multiplies exp(key_log_scale) back (module docstring).
        # No 1/sqrt(m), and exp(-|x|^2/2) is part of the key's log-scale.
        if self.options.kernel == "relu":
            return F.relu(random_projection(x, self.projection, scale))
        return softmax_kernel_features(x, self.projection, scale)

    def key_log_scale(self, k: Tensor, *, scale: float, mask: Mask) -> Tensor | None:
        """The key's log-scale (:func:`~fastattn.ops.features.softmax_kernel_log_scale`): its positive
        features are ``exp(c_s)`` times :meth:`features`. None for the relu kernel."""
        if self.options.kernel == "relu":
            return None
        return softmax_kernel_log_scale(k, self.projection, scale)
