"""Attention by constant (input-independent) matrices, in probability space.

A table ``T (H, n_max, n_max)`` gives, per head, the weight of key position ``j`` for query position
``i``. :func:`table_attention` looks the weights up at the queries' and keys' absolute positions,
multiplies them by what the mask allows (causality, padding; a float bias ``b`` multiplies by
``exp(b)``, so that ``-inf`` removes a key), renormalises every row to sum 1 (a row with no mass left
gives zeros, never NaN) and averages the values with them. No softmax: the table already holds
probabilities. Positions at or beyond ``n_max`` are a ``ValueError``: a table is never extended or
sliced silently.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["table_attention"]


def table_attention(
    table: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, *, allowed: Tensor | None = None,
    bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``table (H, n_max, n_max)``, ``v (B, H, Lk, Ev)``, ``q_pos (B|1, Lq)`` and ``k_pos (B|1, Lk)`` long
    absolute positions, ``allowed`` bool broadcastable to ``(B, H, Lq, Lk)``, ``bias`` float likewise.
    Returns the output ``(B, H, Lq, Ev)`` and the renormalised weights ``(B, H, Lq, Lk)``."""
    n_max = table.shape[-1]
    top = int(max(q_pos.max(), k_pos.max())) if q_pos.numel() and k_pos.numel() else -1
    if top >= n_max:
        raise ValueError(
            f"position {top} is beyond the constant attention table (max_length={n_max}); the table cannot be extended"
        )
    w = table[:, q_pos[:, :, None], k_pos[:, None, :]].transpose(0, 1).to(v.dtype)  # (B|1, H, Lq, Lk)
    if allowed is not None:
        w = w * allowed.to(w.dtype)
    if bias is not None:
        w = w * torch.exp(bias.to(w.dtype))
    w = w / w.sum(-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    return w @ v, w.expand(v.shape[0], -1, -1, -1)
