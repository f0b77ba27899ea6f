"""Shared piece of ``lightning`` and ``transnormer``: unnormalised linear attention with a per-head
exponential decay, followed by SRMSNorm (TransNormerLLM, arXiv:2307.14995, section 3).

``O = SRMSNorm([(phi(Q) phi(K)^T) * M] V)`` with ``M_ts = lambda_h^(t-s)`` for ``s <= t`` (0 otherwise)
and ``SRMSNorm(x) = x / (|x|_2 / sqrt(d))``.

**Decay rates** (``decay``). ``"slopes"`` (default) is what the authors' released code and the trained
models use (OpenNLPLab's TransnormerLLM and lightning-attention, and the models built on them):
``lambda_h = exp(-s_h (1 - layer_ratio + 1e-5))`` with the ALiBi slopes ``s_h = 2^(-8 (h + 1) / H)``
(``H`` a power of two; otherwise ALiBi's interleaving) and ``layer_ratio = l / (L - 1)`` -- memories
from about 3 to a few hundred tokens. ``"paper"`` is the formula in the paper's text,
``lambda_h = exp(-(decay_base * h / H) * (1 - layer_ratio))`` with ``layer_ratio = l / L``, where head 0
does not decay (the default before; with 8 heads, 6 of them remember about one token).
The rates are kept as ``log lambda`` (a buffer), so even a decay that underflows to 0 (``decay_base``
in the hundreds: every token sees only itself) stays exact.

**Output norm** (``norm``). ``"srms_concat"`` (default): one SRMSNorm over the concatenated heads of each
token, as in the authors' code (the norm of the layer's ``H * Ev`` output). ``"srms"``: per head (the
default before). ``"none"``: the raw operator.

The decay is the causal form's recency bias; the bidirectional (non-causal) form is the same
normalised attention without decay, as in TransNormer. The norm replaces the softmax denominator:
without it the output of a non-decaying head grows with n.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fastattn.core.masks import Mask
from .base import KernelMechanism
from fastattn.ops.features import elu_plus_one
from fastattn.ops.positions import alibi_slopes
from fastattn.ops.linear.state import LinearState

__all__ = [
    "DecayedLinear", "DecayedOptions", "tnl_decay", "tnl_log_decay", "alibi_slopes", "srms_norm", "ACTIVATIONS",
    "DECAYS", "NORMS",
]

ACTIVATIONS = ("none", "silu", "elu1", "relu")
DECAYS = ("slopes", "paper")
NORMS = ("srms_concat", "srms", "none")


def tnl_log_decay(num_heads: int, kind: str, decay_base: float, layer_ratio: float) -> Tensor:
    """``log lambda_h`` ``(H,)`` (float64) of the decay ``kind`` (see the module docstring)."""
    if kind == "slopes":
        return -alibi_slopes(num_heads) * (1.0 - layer_ratio + 1e-5)
    h = torch.arange(num_heads, dtype=torch.float64)
    return -(decay_base * h / num_heads) * (1.0 - layer_ratio)


def tnl_decay(num_heads: int, decay_base: float, layer_ratio: float) -> Tensor:
    """The paper's per-head decay ``exp(-(decay_base * h / H) * (1 - layer_ratio))``, ``(H,)``."""
    return torch.exp(tnl_log_decay(num_heads, "paper", decay_base, layer_ratio))


class _SRMSNorm(torch.autograd.Function):
    # out = y r with r = (mean(y^2) + eps)^(-1/2) over ``dims``; dy = r (g - out mean(g out)) -- two passes
    # each way, where autograd's division and power take about twice as many over the whole output.
    @staticmethod
    def forward(ctx, y: Tensor, eps: float, dims: tuple[int, ...]) -> Tensor:  # noqa: D102
        r = torch.rsqrt(y.square().mean(dim=dims, keepdim=True).add_(eps))
        out = y * r
        ctx.save_for_backward(out, r)
        ctx.dims = dims
        return out

    @staticmethod
    def backward(ctx, g: Tensor):  # noqa: D102
        out, r = ctx.saved_tensors
        return (g - out * (g * out).mean(dim=ctx.dims, keepdim=True)).mul_(r), None, None


def srms_norm(x: Tensor, eps: float = 1e-6, dims: tuple[int, ...] = (-1,)) -> Tensor:
    """``x / (|x|_2 / sqrt(d))`` over ``dims`` (the last axis by default); a zero row stays zero.
    (Mechanisms compute half precision in float32: ``Mechanism.half_precision``.)"""
    return _SRMSNorm.apply(x, eps, tuple(dims))


def activate(x: Tensor, name: str) -> Tensor:
    if name == "none":
        return x
    if name == "silu":
        return F.silu(x)
    if name == "elu1":
        return elu_plus_one(x)
    return F.relu(x)


class DecayedLinear(KernelMechanism):
    """Base of ``lightning`` / ``transnormer``: ``Options`` must carry ``activation``, ``decay``,
    ``decay_base``, ``layer_ratio``, ``norm`` and ``chunk``."""

    normalize = False
    log_decay = True
    heads_independent = False  # per-head decay rates; the srms_concat norm spans the heads

    def __init__(self, options: Any = None, **kw: Any) -> None:
        super().__init__(options, **kw)
        self.register_buffer("log_lambdas", self._exact_log_decay(), persistent=False)

    def _exact_log_decay(self) -> Tensor:
        o = self.options
        return tnl_log_decay(self.num_heads, o.decay, o.decay_base, o.layer_ratio)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        # the rates are derived from the options: keep them exact (float64) through .half(), .float(), ...
        out = super()._apply(fn, recurse)
        self.log_lambdas = self._exact_log_decay().to(self.log_lambdas.device)
        return out

    @property
    def lambdas(self) -> Tensor:
        """The per-head decay rates ``(H,)``."""
        return self.log_lambdas.exp()

    def decay(self) -> Tensor | None:
        return self.log_lambdas

    def features(self, x: Tensor, *, is_query: bool, scale: float, mask: Mask) -> Tensor:
        x = activate(x, self.options.activation)
        return x * math.sqrt(scale) if self.options.scale_qk else x

    def _norm(self, out: Tensor) -> Tensor:
        if self.options.norm == "srms_concat":  # (B, H, L, Ev): all heads of a token together
            return srms_norm(out, dims=(1, 3))
        return srms_norm(out) if self.options.norm == "srms" else out

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, dropout_p: float = 0.0) -> Tensor:
        return self._norm(super().forward(q, k, v, mask, scale, dropout_p))

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
        return self._norm(super().reference(q, k, v, mask, scale))

    def step(
        self, q: Tensor, k: Tensor, v: Tensor, state: Any, scale: float, key_padding_mask: Tensor | None = None
    ) -> tuple[Tensor, LinearState]:
        out, state = super().step(q, k, v, state, scale, key_padding_mask)
        return self._norm(out), state


@dataclass(frozen=True)
class DecayedOptions:
    decay: str = "slopes"  # slopes: authors' code, exp(-s_h (1 - layer_ratio + 1e-5)) | paper: see decay_base
    decay_base: float = 8.0  # decay="paper": lambda_h = exp(-(decay_base * h / H) * (1 - layer_ratio))
    layer_ratio: float = 0.0  # the layer's depth in the model: l / (L - 1) (slopes) or l / L (paper)
    activation: str = "none"  # feature map on q and k: none | silu | elu1 | relu
    scale_qk: bool = False  # multiply q and k by scale ** 0.5 (the papers do not)
    norm: str = "srms_concat"  # output norm: srms_concat (over all heads) | srms (per head) | none
    chunk: int = 128  # block length of the intra/inter-block scan

    def __post_init__(self) -> None:
        validate(self)


def validate(o: Any) -> None:
    if o.activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {o.activation!r}")
    if o.norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {o.norm!r}")
    if o.decay not in DECAYS:
        raise ValueError(f"decay must be one of {DECAYS}, got {o.decay!r}")
    if not (o.decay_base >= 0 and math.isfinite(o.decay_base)):
        raise ValueError(f"decay_base must be finite and >= 0, got {o.decay_base}")
    if not 0.0 <= o.layer_ratio <= 1.0:
        raise ValueError(f"layer_ratio must be in [0, 1], got {o.layer_ratio}")
    if o.chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {o.chunk}")
