"""Error metrics of the approximation-error section, and the trivial baselines printed beside them.

All compare an approximate output ``out`` with exact softmax attention ``exact`` (both ``(B, H, N, Ev)``,
computed in float64) on the same ``q, k, v``:

* :func:`rel_error` -- ``||out - exact|| / ||exact||`` (Frobenius over everything). Zeros score exactly 1.
* :func:`scaled_error` -- the same after multiplying each output row by its best non-negative scale
  ``a_i = max(<out_i, exact_i>, 0) / |out_i|^2``. It is the fair figure for mechanisms whose output has
  its own normalisation instead of softmax's denominator (``lightning``, ``transnormer``: an RMS norm of
  the output), whose raw error mostly measures that scale. It never exceeds :func:`rel_error`.
* :func:`row_kl`, :func:`row_tv` -- mean over rows of ``KL(exact row || approximate row)`` and of the
  total variation ``0.5 * sum |p - q|`` of attention weights, for mechanisms that expose them.

The baselines (:func:`baselines`) are what a mechanism must beat to be worth anything: the output
zeros (relative error 1 by definition), the plain mean of the values over the keys each query may see
(uniform attention: the figure a mechanism that learned nothing about ``q . k`` gets), and for
attention weights the uniform rows.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["rel_error", "scaled_error", "row_kl", "row_tv", "mean_of_values", "uniform_weights", "baselines"]


def _check(out: Tensor, exact: Tensor) -> tuple[Tensor, Tensor]:
    if out.shape != exact.shape:
        raise ValueError(f"output {tuple(out.shape)} and exact {tuple(exact.shape)} differ in shape")
    return out.double(), exact.double()


def rel_error(out: Tensor, exact: Tensor) -> float:
    """``||out - exact|| / ||exact||``."""
    out, exact = _check(out, exact)
    return float((out - exact).norm() / exact.norm().clamp_min(1e-300))


def scaled_error(out: Tensor, exact: Tensor) -> float:
    """Relative error after the best non-negative scale per output row (see the module docstring)."""
    out, exact = _check(out, exact)
    dot = (out * exact).sum(-1, keepdim=True)
    sq = (out * out).sum(-1, keepdim=True)
    a = torch.where(sq > 0, dot.clamp_min(0) / sq.clamp_min(1e-300), torch.zeros_like(sq))
    return float((a * out - exact).norm() / exact.norm().clamp_min(1e-300))


def row_kl(p: Tensor, q: Tensor) -> float:
    """Mean over rows of KL(p || q), exact weights ``p``, approximate ``q`` clamped at 1e-12 (a sparse
    ``q`` that drops keys carrying mass gives a large, finite value)."""
    p, q = p.double(), q.double().clamp_min(1e-12)
    return max(float((p * (torch.log(p.clamp_min(1e-300)) - torch.log(q))).sum(-1).mean()), 0.0)


def row_tv(p: Tensor, q: Tensor) -> float:
    """Mean over rows of the total variation distance ``0.5 * sum_j |p_j - q_j|`` (in [0, 1])."""
    return float(0.5 * (p.double() - q.double()).abs().sum(-1).mean())


def uniform_weights(exact_w: Tensor) -> Tensor:
    """Uniform rows over the keys each query may see (the support of the exact weights)."""
    allowed = (exact_w > 0).double()
    return allowed / allowed.sum(-1, keepdim=True).clamp_min(1.0)


def mean_of_values(v: Tensor, exact_w: Tensor | None = None) -> Tensor:
    """Uniform attention's output: each query gets the mean of the values it may see (all of them
    without ``exact_w``; the support of ``exact_w``'s row otherwise)."""
    v = v.double()
    if exact_w is None:
        return v.mean(dim=-2, keepdim=True).expand_as(v).contiguous()
    return uniform_weights(exact_w) @ v


def baselines(v: Tensor, exact: Tensor, exact_w: Tensor | None = None) -> dict[str, float]:
    """The trivial baselines' figures on one set of inputs (see the module docstring)."""
    mean_v = mean_of_values(v, exact_w)
    row = {
        "zeros_rel_err": 1.0,
        "mean_v_rel_err": rel_error(mean_v, exact),
        "mean_v_scaled_err": scaled_error(mean_v, exact),
    }
    if exact_w is not None:
        uni = uniform_weights(exact_w)
        row["uniform_kl"] = row_kl(exact_w, uni)
        row["uniform_tv"] = row_tv(exact_w, uni)
    return row


def entropy(p: Tensor) -> float:
    """Mean row entropy (nats) of attention weights."""
    return float(-(p * torch.log(p.clamp_min(1e-30))).sum(-1).mean())


def uniform_entropy(n: int) -> float:
    return math.log(n)
