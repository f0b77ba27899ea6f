"""Dense softmax attention written as the formula: the ground truth of the whole library.

``softmax(Q K^T * scale + bias) V`` with the :class:`~fastattn.core.masks.Mask` turned into an additive
bias. Every reference implementation that is "softmax under some mask" calls this with an extra bias.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastattn.core.masks import Mask, masked_softmax

__all__ = ["dense_scores", "dense_weights", "dense_attention"]


def dense_scores(q: Tensor, k: Tensor, mask: Mask, scale: float, extra_bias: Tensor | None = None) -> Tensor:
    """``Q K^T * scale`` plus every mask as ``-inf`` / additive bias, shape ``(B, H, Lq, Lk)``."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    bias = mask.additive(s.dtype, s.device)
    if bias is not None:
        s = s + bias
    if extra_bias is not None:
        s = s + extra_bias.to(s.dtype)
    return s


def dense_weights(q: Tensor, k: Tensor, mask: Mask, scale: float, extra_bias: Tensor | None = None) -> Tensor:
    """The attention matrix; rows with every key masked are zeros."""
    return masked_softmax(dense_scores(q, k, mask, scale, extra_bias))


def dense_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float,
    dropout_p: float = 0.0, extra_bias: Tensor | None = None,
) -> Tensor:
    p = dense_weights(q, k, mask, scale, extra_bias)
    if dropout_p > 0:
        p = torch.nn.functional.dropout(p, dropout_p)
    return torch.matmul(p, v)
