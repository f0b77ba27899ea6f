"""Small pieces shared by several kernel mechanisms (written once here).

* :func:`real_key_count` -- ``n``, the number of real (non-padding) keys, for the mechanisms whose
  formula divides by the sequence length (efficient attention's scaling normalisation, real-time fast
  attention, Primal-Attention's regulariser);
* :func:`l2_normalize` -- ``x / ||x||`` that stays finite (and differentiable) at ``x = 0``;
* :func:`elu_plus_one` -- ``elu(x) + 1`` in one pass, with a one-pass backward;
* :func:`draw_gaussian_projection` -- the random matrix of random-feature kernels (i.i.d. or block-orthogonal);
* :func:`softmax_kernel_features`, :func:`softmax_kernel_log_scale`, :func:`softmax_kernel_estimate` --
  FAVOR+'s positive random features of ``exp(scale q . k)``, stabilised (a per-token factor kept apart as a
  log-scale), used by ``performer`` and by the low-rank part of ``scatterbrain``;
* :func:`query_chunked` -- re-exported from :mod:`fastattn.ops.chunked` (checkpointed query blocks),
  used by the honest O(n^2) kernels (``fourierformer``, ``doubly_normalized``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastattn.ops.chunked import query_chunked  # re-exported: used by the quadratic kernels
from ..core.masks import NEG_INF, Mask

__all__ = [
    "real_key_count", "padding_bias", "l2_normalize", "elu_plus_one", "query_chunked", "draw_gaussian_projection",
    "random_projection", "softmax_kernel_features", "softmax_kernel_log_scale", "softmax_kernel_estimate",
    "RandomProjection",
]

_LOG_SCALE_BLOCK = 1024  # tokens per block when computing key log-scales (bounds the (L, m) temporary)


def draw_gaussian_projection(
    m: int, d: int, *, orthogonal: bool, generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``(m, d)`` rows ``w_i ~ N(0, I_d)``; with ``orthogonal`` the rows of each block of ``d`` are
    exactly orthogonal (Haar-random orthogonal matrix with chi-distributed row norms)."""
    if not orthogonal:
        return torch.randn(m, d, generator=generator, dtype=torch.float64).to(dtype)
    g = torch.randn(math.ceil(m / d), d, d, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)  # sign fix: Haar-distributed
    w = q.transpose(-1, -2).reshape(-1, d)[:m]
    norms = torch.randn(m, d, generator=generator, dtype=torch.float64).norm(dim=1, keepdim=True)
    return (w * norms).to(dtype)


def random_projection(x: Tensor, w: Tensor, scale: float) -> Tensor:
    """``w . x`` for every feature, ``x`` pre-scaled by ``scale ** 0.5``: ``(..., L, m)``."""
    return torch.matmul(x, (w.to(x.dtype) * math.sqrt(scale)).t())


def softmax_kernel_features(x: Tensor, w: Tensor, scale: float) -> Tensor:
    """``exp(w . x - max_j w_j . x)``: the positive features up to a per-token factor (for a query it
    cancels in normalised attention; for a key it is :func:`softmax_kernel_log_scale`, multiplied back
    by the linear op). No ``1/sqrt(m)``."""
    a = random_projection(x, w, scale)
    return torch.exp(a - a.amax(dim=-1, keepdim=True).detach())


def softmax_kernel_log_scale(k: Tensor, w: Tensor, scale: float) -> Tensor:
    """``c_s = max_j w_j . k_s - |k_s|^2 / 2`` (``k`` pre-scaled by ``scale ** 0.5``): the positive
    features of key ``s`` are ``exp(c_s)`` times :func:`softmax_kernel_features`. The maximum is a
    constant for autograd (as in the features, where it cancels); ``-|k|^2 / 2`` is differentiable."""
    with torch.no_grad():
        top = [random_projection(x, w, scale).amax(dim=-1) for x in k.split(_LOG_SCALE_BLOCK, dim=-2)]
    return (torch.cat(top, dim=-1) if len(top) != 1 else top[0]) - 0.5 * scale * (k * k).sum(dim=-1)


def softmax_kernel_estimate(q: Tensor, k: Tensor, w: Tensor, scale: float = 1.0) -> Tensor:
    """The unstabilised random-feature estimate ``phi(q) . phi(k)`` ``(..., Lq, Lk)`` of
    ``exp(scale * q . k)`` (dense: for references, tests and analysis)."""
    def exponents(x: Tensor) -> Tensor:
        x = x * math.sqrt(scale)
        return torch.matmul(x, w.to(x.dtype).t()) - 0.5 * (x * x).sum(dim=-1, keepdim=True)

    return torch.matmul(exponents(q).exp(), exponents(k).exp().transpose(-1, -2)) / w.shape[0]


def real_key_count(mask: Mask, batch: int, lk: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(B|1, 1, 1, 1)``: the number of keys that are not padding (``Lk`` without a padding mask)."""
    keep = mask.key_keep(dtype)
    if keep is None:
        return torch.full((1, 1, 1, 1), float(lk), dtype=dtype, device=device)
    return keep.sum(dim=2, keepdim=True)


def padding_bias(mask: Mask, dtype: torch.dtype, device: torch.device, dim: int = -1) -> Tensor | None:
    """Additive ``-inf`` on padding positions (``None`` without padding), laid along ``dim`` of a
    4-D tensor: ``dim=-1`` gives ``(B, 1, 1, L)`` (keys as columns), ``dim=-2`` gives ``(B, 1, L, 1)``."""
    if mask.key_padding is None:
        return None
    bias = torch.zeros(mask.key_padding.shape, dtype=dtype, device=device).masked_fill(mask.key_padding, NEG_INF)
    return bias[:, None, None, :] if dim == -1 else bias[:, None, :, None]


def l2_normalize(x: Tensor, dim: int = -1) -> Tensor:
    """``x / ||x||_2`` along ``dim``; a zero vector maps to zero (with zero gradient), never NaN."""
    sq = x.pow(2).sum(dim=dim, keepdim=True)
    zero = sq == 0
    norm = torch.sqrt(torch.where(zero, torch.ones_like(sq), sq))
    return torch.where(zero, torch.zeros_like(x), x / norm)


class _EluPlusOne(torch.autograd.Function):
    # elu(x) + 1 = max(x + 1, exp(min(x, 0))) (exp(x) >= 1 + x); its derivative is min(phi(x), 1).
    # torch's elu kernel is ~2.5x slower than exp on CPU and the "+ 1" is another pass and tensor.
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: D102
        y = x + 1
        torch.maximum(y, x.clamp(max=0).exp_(), out=y)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: D102
        (y,) = ctx.saved_tensors
        return y.clamp(max=1).mul_(grad)


def elu_plus_one(x: Tensor) -> Tensor:
    """``elu(x) + 1`` (linear attention's feature map), positive, computed and differentiated in one
    fused pass each."""
    return _EluPlusOne.apply(x)


class RandomProjection:
    """Mixin for a mechanism (an ``nn.Module`` with ``options.num_features``, optional
    ``options.orthogonal``, and ``head_dim``) that keeps a random ``(num_features, head_dim)`` matrix in the
    buffer ``projection`` (so ``state_dict`` reproduces it), drawn by :func:`draw_gaussian_projection`."""

    def init_projection(self, generator: torch.Generator | None) -> None:
        """Register the ``projection`` buffer and draw it (``generator`` is also kept for :meth:`redraw`)."""
        self._generator = generator
        self.register_buffer("projection", torch.empty(self.options.num_features, self.head_dim))
        self.redraw(generator)

    @torch.no_grad()
    def redraw(self, generator: torch.Generator | None = None) -> None:
        """Draw a fresh random matrix into the ``projection`` buffer (from ``generator``, else the one
        given at construction, else torch's global generator)."""
        g = generator if generator is not None else self._generator
        w = draw_gaussian_projection(self.options.num_features, self.head_dim,
                                     orthogonal=getattr(self.options, "orthogonal", False), generator=g)
        self.projection.copy_(w.to(self.projection))
