"""Softmax attention through torch's fused ``scaled_dot_product_attention`` under any
:class:`~fastattn.core.masks.Mask`.

Without a mask (or causal with equal lengths) it is torch's call as is; otherwise the mask is handed to
torch as a boolean ``(B|1, H|1, Lq, Lk)`` tensor (or as the additive bias when the mask has one). Rows that
see no key attend anywhere inside the kernel and are zeroed after it, so they give zeros, never NaN, and
no gradient. On CPU torch's flash kernel takes the mask without forming the scores: O(Lq Lk) bytes for the
mask, O(n) for everything else.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from fastattn.core.masks import Mask

__all__ = ["fused_attention"]


def fused_attention(q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, dropout_p: float = 0.0) -> Tensor:
    """``softmax(Q K^T * scale + mask) V`` for ``q (B, H, Lq, E)``, ``k, v (B, H, Lk, .)`` by torch's SDPA;
    all-masked rows are zeros."""
    if mask.used() <= {"causal"} and (not mask.causal or mask.lq == mask.lk):
        return F.scaled_dot_product_attention(q, k, v, is_causal=mask.causal, scale=scale, dropout_p=dropout_p)
    allowed = mask.allowed(q.device)
    if mask.bias is None and allowed is None:  # e.g. causal decoding: the new tokens see every key
        return F.scaled_dot_product_attention(q, k, v, scale=scale, dropout_p=dropout_p)
    if mask.bias is None:
        assert allowed is not None
        dead = ~allowed.any(dim=-1, keepdim=True)
        sdpa_mask: Tensor = allowed | dead  # dead rows attend anywhere, then are zeroed: no NaN
    else:
        bias = mask.additive(q.dtype, q.device)
        assert bias is not None
        dead = bias.isneginf().all(dim=-1, keepdim=True)
        sdpa_mask = bias.masked_fill(dead, 0.0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask, scale=scale, dropout_p=dropout_p)
    return out.masked_fill(dead, 0.0)
