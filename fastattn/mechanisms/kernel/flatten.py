"""FLatten Transformer's focused linear attention (Han et al., 2023, arXiv:2308.00442).

Linear attention ``phi(Q) (phi(K)^T V) / phi(Q) sum phi(K)`` with the *focused* feature map

``phi_p(x) = f_p(ReLU(x))``,  ``f_p(x) = (||x|| / ||x^p||) x^p``  (``x^p`` element-wise),

which keeps each vector's norm but pulls its direction towards its dominant axes as the focusing power
``p`` grows, so similar queries and keys become more similar and dissimilar ones less -- the sharp
"focus" of softmax attention at linear cost. Plus the rank-restoration term

``O = phi_p(Q) (phi_p(K)^T V) / (phi_p(Q) sum phi_p(K)) + DWC(V)``,

a depthwise convolution over token positions applied to the values: a banded, full-rank token-mixing
matrix that lifts the rank (at most ``d``) of the linear-attention map. The convolution is learned, so
``flatten`` is a layer mechanism (``fastattn.MultiheadAttention(..., method="flatten")``).

Choices made here, each stated:

* the paper's images are 2-D grids; a sequence mechanism sees a 1-D sequence, so the depthwise
  convolution runs along the sequence (``kernel_size`` taps, zero "same" padding);
* the paper's depthwise convolution has one kernel per value channel; here each head has one kernel
  shared by its value channels, so the mechanism does not depend on the value width. ``kernel_size=0``
  drops the term (pure focused linear attention);
* the official code adds ``1e-6`` after the ReLU so that an all-negative vector has a direction; so do we;
* the learnable per-channel temperature of the official code is not in the paper and is left out;
* the learnable positional encoding the paper adds to the keys (over its fixed-size image grid) is
  omitted: a sequence mechanism has no fixed length to learn it for.

Complexity O(n d^2 + n d k). Non-causal (the convolution is centred). Padding keys have zero features
and their values are zeroed before the convolution, so they never matter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastattn.core.masks import Mask
from fastattn.registry import register
from .base import KernelMechanism

__all__ = ["focus", "FocusedLinearAttention"]

_EPS = 1e-6


def focus(x: Tensor, p: float) -> Tensor:
    """The focusing function ``f_p(x) = (||x|| / ||x^p||) x^p`` for ``x >= 0`` (last dim).

    Computed on ``u = x / max(x)`` (``f_p`` is positively homogeneous), so ``u^p`` never overflows or
    underflows to all-zero; a zero vector maps to zero."""
    m = x.detach().amax(dim=-1, keepdim=True)
    m = torch.where(m > 0, m, torch.ones_like(m))
    u = x / m
    up = u.pow(p)
    tiny = torch.finfo(x.dtype).tiny  # only a zero vector gets near it; it maps to 0 with finite grads
    norm_u = u.mul(u).sum(dim=-1, keepdim=True).clamp_min(tiny)  # ||x|| = m ||u||, never squaring x
    norm_up = up.mul(up).sum(dim=-1, keepdim=True).clamp_min(tiny)
    return up * (m * torch.sqrt(norm_u / norm_up))


@register("flatten", complexity="O(n d^2)", causal=False, decoding=False, padding=True, time_growth=1.0, memory_growth=1.0)
class FocusedLinearAttention(KernelMechanism):
    """Focused linear attention + depthwise-convolution rank restoration (see module docstring)."""

    test_options = {"kernel_size": 5}
    heads_independent = False  # per-head depthwise convolution (dwc)
    deviations = (
        (
            "The depthwise convolution runs along the 1-D sequence with one kernel per head (the "
            "paper: a 2-D kernel per channel)."
        ),
        (
            "The learnable positional encoding the paper adds to k is omitted (it belongs to a "
            "fixed-size image grid); so is the official code's per-channel temperature."
        ),
    )
    tokenwise = True

    @dataclass(frozen=True)
    class Options:
        power: float = 3.0  # focusing power p (the paper's default is 3)
        kernel_size: int = 5  # taps of the depthwise convolution on V (odd); 0 disables it

        def __post_init__(self) -> None:
            if not self.power > 0:
                raise ValueError(f"power must be > 0, got {self.power}")
            if self.kernel_size < 0 or (self.kernel_size and self.kernel_size % 2 == 0):
                raise ValueError(f"kernel_size must be 0 or an odd positive integer, got {self.kernel_size}")

    def __init__(self, options=None, **kwargs) -> None:
        super().__init__(options, **kwargs)
        k = self.options.kernel_size
        self.dwc = nn.Parameter(torch.empty(self.num_heads, k)) if k else None
        if self.dwc is not None:
            bound = 1.0 / math.sqrt(k)  # nn.Conv1d's default for a depthwise kernel (fan_in = k)
            nn.init.uniform_(self.dwc, -bound, bound)

    def features(self, x: Tensor, *, is_query: bool, scale: float, mask: Mask) -> Tensor:
        return focus(F.relu(x) + _EPS, self.options.power)

    def _values(self, v: Tensor, mask: Mask) -> Tensor:
        if mask.lq != mask.lk:
            raise ValueError(
                f"flatten's depthwise convolution on V needs self-attention (Lq == Lk), got Lq={mask.lq}, "
                f"Lk={mask.lk}; use kernel_size=0 for cross-attention"
            )
        keep = mask.key_keep(v.dtype)
        return v if keep is None else v * keep

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, dropout_p: float = 0.0) -> Tensor:
        out = super().forward(q, k, v, mask, scale, dropout_p)
        if self.dwc is None:
            return out
        vv = self._values(v, mask)
        ks, n = self.options.kernel_size, vv.shape[2]
        padded = F.pad(vv, (0, 0, ks // 2, ks // 2))  # zero "same" padding along the sequence
        w = self.dwc.to(vv.dtype)
        conv = sum(w[:, t].view(1, -1, 1, 1) * padded[:, :, t:t + n] for t in range(ks))  # k shifted FMAs
        return (out.to(vv.dtype) + conv).to(v.dtype)

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
        out = super().reference(q, k, v, mask, scale)
        if self.dwc is None:
            return out
        vv = self._values(v, mask)
        n, half = vv.shape[2], self.options.kernel_size // 2
        i = torch.arange(n, device=v.device)
        offset = i[None, :] - i[:, None] + half  # tap index of key j for output i
        inside = (offset >= 0) & (offset < self.options.kernel_size)
        taps = self.dwc.to(v.dtype)[:, offset.clamp(0, self.options.kernel_size - 1)]  # (h, n, n)
        band = torch.where(inside, taps, torch.zeros_like(taps))
        return out + torch.matmul(band, vv)
