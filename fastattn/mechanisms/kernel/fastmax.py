"""Fastmax (Gerami et al., 2024, arXiv:2402.07901): "FAST: Factorizable Attention for Speeding up Transformers".

The score is the order-``p`` Taylor polynomial of exp of a bounded similarity::

    a_ij = f(s_ij) / sum_l f(s_il),   f(x) = sum_{l=0}^{p} x^l / l!,  p in {1, 2}.

``normalize`` chooses ``s``:

* ``"token"`` (default; the paper's normalisation as this library reads it): queries and keys are
  normalised per token -- mean over features subtracted, then scaled to unit norm
  (``q_hat = (q - mean q) / |q - mean q|``) -- and ``s = q_hat . k_hat``. Since ``|s| <= 1``, ``f > 0`` for
  both orders (the bound behind the paper's gradient analysis). The ``scale`` argument is not used.
* ``"scaled"``: ``s = (q . k) * scale`` (``scale`` defaults to ``1/sqrt(d)``), the default of the authors'
  released ``fastmax`` function. ``s`` is unbounded, so only ``p = 2`` (``f > 0`` everywhere) is allowed.

The authors' code also offers dividing q and k by the largest token norm of the sequence; that looks
at every position (it is not causal) and is not offered here.

``f`` factorises: ``f(q . k) = phi(q) . phi(k)`` with ``phi(x) = [1, x, (x_i x_j)_{i<=j} w_ij]``
(``w_ii = 1/sqrt 2``, ``w_ij = 1`` for ``i < j``), ``1 + d + d(d+1)/2`` features, so the cost is
O(n d^(p+1)) -- linear in n -- on the shared linear-attention engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fastattn.core.masks import Mask
from fastattn.registry import register
from .base import KernelMechanism
from fastattn.ops.linear.engine import _safe_divide

__all__ = ["Fastmax", "fastmax_normalize", "taylor_features"]


def fastmax_normalize(x: Tensor, eps: float = 1e-6) -> Tensor:
    """``(x - mean x) / |x - mean x|`` over the feature axis (per token)."""
    x = x - x.mean(dim=-1, keepdim=True)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def taylor_features(x: Tensor, order: int) -> Tensor:
    """``phi(x)`` with ``phi(q) . phi(k) = sum_{l<=order} (q . k)^l / l!`` (order 1 or 2)."""
    parts = [torch.ones_like(x[..., :1]), x]
    if order == 2:
        d = x.shape[-1]
        i, j = torch.triu_indices(d, d, device=x.device)
        w = torch.where(i == j, torch.full((), 1 / math.sqrt(2), dtype=x.dtype, device=x.device),
                        torch.ones((), dtype=x.dtype, device=x.device))
        parts.append(x[..., i] * x[..., j] * w)
    return torch.cat(parts, dim=-1)


@register("fastmax", complexity="O(n d^(p+1))", causal=True, decoding=True, padding=True, time_growth=1.0, memory_growth=1.0)
class Fastmax(KernelMechanism):
    """Normalised q, k and a factorised Taylor polynomial of exp (order 1 or 2)."""

    deviations = (
        (
            "The authors' code defaults to f(q . k / sqrt(d)) (normalize='scaled' here); the default follows "
            "the paper's per-token normalisation. Division by the largest token norm is not offered."
        ),
    )

    test_options = {"chunk": 16}
    tokenwise = True

    @dataclass(frozen=True)
    class Options:
        order: int = 2  # p, the Taylor order of f
        chunk: int = 64  # chunk length of the causal scan
        normalize: str = "token"  # token: per-token centred unit q, k (paper) | scaled: (q . k) * scale

        def __post_init__(self) -> None:
            if self.order not in (1, 2):
                raise ValueError(f"order must be 1 or 2, got {self.order}")
            if self.chunk < 1:
                raise ValueError(f"chunk must be >= 1, got {self.chunk}")
            if self.normalize not in ("token", "scaled"):
                raise ValueError(f"normalize must be 'token' or 'scaled', got {self.normalize!r}")
            if self.normalize == "scaled" and self.order == 1:
                raise ValueError("normalize='scaled' needs order=2: 1 + x is not positive for unbounded x")

    def _prepare(self, x: Tensor, scale: float) -> Tensor:
        return fastmax_normalize(x) if self.options.normalize == "token" else x * math.sqrt(scale)

    def features(self, x: Tensor, *, is_query: bool, scale: float, mask: Mask) -> Tensor:
        return taylor_features(self._prepare(x, scale), self.options.order)

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
        """The formula literally: ``f(s)``, masked, row-normalised, times ``V``."""
        dt = q.dtype
        if self.options.normalize == "token":
            s = torch.matmul(fastmax_normalize(q.to(dt)), fastmax_normalize(k.to(dt)).transpose(-1, -2))
        else:
            s = torch.matmul(q.to(dt), k.to(dt).transpose(-1, -2)) * scale
        a = sum(s ** p / math.factorial(p) for p in range(self.options.order + 1))
        allowed = mask.allowed(q.device)
        if allowed is not None:
            a = a * allowed.to(a.dtype)
        out = _safe_divide(torch.matmul(a, v.to(dt)), a.sum(dim=-1, keepdim=True))
        return out.to(q.dtype)
