"""Small pieces shared by several kernel mechanisms (written once here).

* :func:`real_key_count` -- ``n``, the number of real (non-padding) keys, for the mechanisms whose
  formula divides by the sequence length (efficient attention's scaling normalisation, real-time fast
  attention, Primal-Attention's regulariser);
* :func:`l2_normalize` -- ``x / ||x||`` that stays finite (and differentiable) at ``x = 0``;
* :func:`elu_plus_one` -- ``elu(x) + 1`` in one pass, with a one-pass backward;
* :func:`query_chunked` -- re-exported from :mod:`fastattn.ops.chunked` (checkpointed query blocks),
  used by the honest O(n^2) kernels (``fourierformer``, ``doubly_normalized``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastattn.ops.chunked import query_chunked  # re-exported: used by the quadratic kernels
from ..core.masks import NEG_INF, Mask

__all__ = ["real_key_count", "padding_bias", "l2_normalize", "elu_plus_one", "query_chunked"]


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
