"""Shared piece of ``lightning`` and ``transnormer``: unnormalised linear attention with a per-head
exponential decay, followed by SRMSNorm (TransNormerLLM, arXiv:2307.14995, section 3).

``O = SRMSNorm([(phi(Q) phi(K)^T) * M] V)`` with ``M_ts = lambda_h^(t-s)`` for ``s <= t`` (0 otherwise)
and ``SRMSNorm(x) = x / (|x|_2 / sqrt(d))``. The decay rates are TransNormerLLM's
``lambda_h = exp(-(decay_base * h / H) * (1 - layer_ratio))`` for heads ``h = 0..H-1`` of a layer at
depth ``layer_ratio = l / L``; head 0 does not decay. The decay is the causal form's recency bias; the
bidirectional (non-causal) form is the same normalised attention without decay, as in TransNormer.

The norm replaces the softmax denominator: without it the output of a non-decaying head grows with n.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fastattn.core.masks import Mask
from fastattn.ops.softmax.online import compute_dtype
from .base import KernelMechanism
from fastattn.ops.features import elu_plus_one
from fastattn.ops.linear.state import LinearState

__all__ = ["DecayedLinear", "DecayedOptions", "tnl_decay", "srms_norm", "ACTIVATIONS"]

ACTIVATIONS = ("none", "silu", "elu1", "relu")


def tnl_decay(num_heads: int, decay_base: float, layer_ratio: float) -> Tensor:
    """TransNormerLLM's per-head decay ``exp(-(decay_base * h / H) * (1 - layer_ratio))``, ``(H,)``."""
    h = torch.arange(num_heads, dtype=torch.float64)
    return torch.exp(-(decay_base * h / num_heads) * (1.0 - layer_ratio))


class _SRMSNorm(torch.autograd.Function):
    # out = y r with r = (mean(y^2) + eps)^(-1/2); dy = r (g - out mean(g out)) -- two passes each way,
    # where autograd's division and power take about twice as many over the whole output.
    @staticmethod
    def forward(ctx, y: Tensor, eps: float) -> Tensor:  # noqa: D102
        r = torch.rsqrt(y.square().mean(dim=-1, keepdim=True).add_(eps))
        out = y * r
        ctx.save_for_backward(out, r)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):  # noqa: D102
        out, r = ctx.saved_tensors
        return (g - out * (g * out).mean(dim=-1, keepdim=True)).mul_(r), None


def srms_norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """``x / (|x|_2 / sqrt(d))`` over the last axis, computed in float32 for half inputs; a zero row
    stays zero."""
    return _SRMSNorm.apply(x.to(compute_dtype(x.dtype)), eps).to(x.dtype)


def activate(x: Tensor, name: str) -> Tensor:
    if name == "none":
        return x
    if name == "silu":
        return F.silu(x)
    if name == "elu1":
        return elu_plus_one(x)
    return F.relu(x)


class DecayedLinear(KernelMechanism):
    """Base of ``lightning`` / ``transnormer``: ``Options`` must carry ``activation``, ``decay_base``,
    ``layer_ratio``, ``norm`` and ``chunk``."""

    normalize = False

    def __init__(self, options: Any = None, **kw: Any) -> None:
        super().__init__(options, **kw)
        o = self.options
        self.register_buffer("lambdas", tnl_decay(self.num_heads, o.decay_base, o.layer_ratio).float(),
                             persistent=False)

    def decay(self) -> Tensor | None:
        return self.lambdas

    def features(self, x: Tensor, *, is_query: bool, scale: float, mask: Mask) -> Tensor:
        x = activate(x.to(compute_dtype(x.dtype)), self.options.activation)
        return x * math.sqrt(scale) if self.options.scale_qk else x

    def _norm(self, out: Tensor) -> Tensor:
        return srms_norm(out) if self.options.norm == "srms" else out

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, dropout_p: float = 0.0) -> Tensor:
        return self._norm(super().forward(q, k, v, mask, scale, dropout_p))

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
        return self._norm(super().reference(q, k, v, mask, scale))

    def step(self, q: Tensor, k: Tensor, v: Tensor, state: Any, scale: float) -> tuple[Tensor, LinearState]:
        out, state = super().step(q, k, v, state, scale)
        return self._norm(out), state


@dataclass(frozen=True)
class DecayedOptions:
    decay_base: float = 8.0  # lambda_h = exp(-(decay_base * h / H) * (1 - layer_ratio))
    layer_ratio: float = 0.0  # l / L, the layer's depth in the model
    activation: str = "none"  # feature map on q and k: none | silu | elu1 | relu
    scale_qk: bool = False  # multiply q and k by scale ** 0.5 (the papers do not)
    norm: str = "srms"  # output norm: srms | none
    chunk: int = 128  # block length of the intra/inter-block scan

    def __post_init__(self) -> None:
        validate(self)


def validate(o: Any) -> None:
    if o.activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {o.activation!r}")
    if o.norm not in ("srms", "none"):
        raise ValueError(f"norm must be 'srms' or 'none', got {o.norm!r}")
    if o.decay_base < 0:
        raise ValueError(f"decay_base must be >= 0, got {o.decay_base}")
    if not 0.0 <= o.layer_ratio <= 1.0:
        raise ValueError(f"layer_ratio must be in [0, 1], got {o.layer_ratio}")
    if o.chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {o.chunk}")
