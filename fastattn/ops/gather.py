"""Gather attention: each query attends its own explicit list of keys (data-dependent sparsity such
as learned edges), without any ``Lq x Lk`` tensor."""

from __future__ import annotations

import torch
from torch import Tensor

from fastattn.core.masks import masked_softmax
from fastattn.ops.softmax.online import compute_dtype

__all__ = ["index_attention", "index_mask"]


def index_attention(
    q: Tensor, k: Tensor, v: Tensor, idx: Tensor, valid: Tensor, scale: float, bias: Tensor | None = None,
) -> Tensor:
    """Attention of each query over its own list of keys (data-dependent sparsity, e.g. learned edges).

    ``idx`` (long) / ``valid`` (bool) ``(B, H, Lq, K)``: query ``i`` sees keys ``idx[..., i, :]`` where
    ``valid`` (an index must not repeat among a row's valid entries); ``bias`` ``(B, H, Lq, K)`` is added to
    those scores. The chosen keys are gathered as ``(B, H, Lq, K, E)``: O(n K d), no ``Lq x Lk`` tensor.
    Rows with no valid key return zeros. :func:`index_mask` gives the same edges as a dense mask."""
    B, H, Lq, K = idx.shape
    dt = compute_dtype(q.dtype)
    flat = idx.reshape(B, H, Lq * K, 1)
    kg = torch.gather(k.to(dt), 2, flat.expand(-1, -1, -1, k.shape[3])).view(B, H, Lq, K, k.shape[3])
    vg = torch.gather(v.to(dt), 2, flat.expand(-1, -1, -1, v.shape[3])).view(B, H, Lq, K, v.shape[3])
    s = torch.matmul(kg, q.to(dt)[..., None]).squeeze(-1) * scale  # (B, H, Lq, K)
    if bias is not None:
        s = s + bias.to(dt)
    p = masked_softmax(s.masked_fill(~valid, float("-inf")))
    return torch.matmul(p[..., None, :], vg).squeeze(-2).to(q.dtype)


def index_mask(idx: Tensor, valid: Tensor, lk: int, values: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """The edges of :func:`index_attention` as a dense bool ``(B, H, Lq, Lk)`` mask (True = may attend) and,
    given per-edge ``values``, the dense additive bias holding them (for references only)."""
    allowed = torch.zeros(*idx.shape[:-1], lk, dtype=torch.int32, device=idx.device).scatter_add_(
        -1, idx, valid.to(torch.int32)
    ) > 0
    if values is None:
        return allowed, None
    dense = torch.zeros(*idx.shape[:-1], lk, dtype=values.dtype, device=idx.device)
    dense = dense.scatter_add(-1, idx, values.masked_fill(~valid, 0.0))
    return allowed, dense
