"""The dense form of a block-sparse pattern: the literal boolean mask (``Pattern.dense``) on absolute
positions and a dense masked softmax under it. O(Lq Lk) -- the references of the pattern mechanisms,
and decoding over a (bounded) cache whose keys sit at arbitrary positions."""

from __future__ import annotations

import torch
from torch import Tensor

from fastattn.core.masks import Mask
from fastattn.ops.softmax.dense import dense_attention, dense_scores
from fastattn.ops.softmax.online import compute_dtype
from .nodes import Nodes
from .patterns import Pattern

__all__ = ["dense_pattern_attention", "masked_logsumexp", "pattern_allowed", "pattern_reference"]


def pattern_allowed(
    qpos: Tensor, kpos: Tensor, pattern: Pattern, *, causal: bool, key_padding: Tensor | None = None,
    nodes: Nodes | None = None,
) -> Tensor:
    """Bool ``(B|1, H|1, Lq, Lk [+ m])``: may the query at absolute position ``qpos[i]`` see the key at
    ``kpos[j]`` (then each extra node, in order)?"""
    allowed = pattern.dense(qpos[:, None], kpos[None, :])
    if causal:
        allowed = allowed & (kpos[None, :] <= qpos[:, None])
    allowed = allowed[None, None]
    if key_padding is not None:
        allowed = allowed & ~key_padding[:, None, None, :]
    if nodes is not None:
        na = nodes.mask(qpos[:, None])
        shape = torch.broadcast_shapes(allowed.shape[:-1], na.shape[:-1])
        allowed = torch.cat([allowed.expand(*shape, -1), na.expand(*shape, -1)], dim=-1)
    return allowed


def masked_logsumexp(s: Tensor) -> Tensor:
    """``log sum exp`` over the last axis; ``-inf`` (with zero gradient) for rows whose every entry is
    ``-inf`` -- the log of an empty sum, which weighs nothing when partial results are merged."""
    dead = ~torch.isfinite(s).any(-1)
    return torch.logsumexp(s.masked_fill(dead[..., None], 0.0), -1).masked_fill(dead, float("-inf"))


def dense_pattern_attention(
    q: Tensor, k: Tensor, v: Tensor, qpos: Tensor, kpos: Tensor, scale: float, pattern: Pattern, *,
    causal: bool, key_padding: Tensor | None = None, nodes: Nodes | None = None, return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Dense masked softmax with the literal pattern (``Pattern.dense``) on the given absolute query and
    key positions; the reference, and decoding over a cache whose keys sit at ``kpos``. With
    ``return_lse`` also the log-sum-exp ``(B, H, Lq)`` of each query's allowed scores (compute dtype)."""
    allowed = pattern_allowed(qpos, kpos, pattern, causal=causal, key_padding=key_padding, nodes=nodes)
    if nodes is not None:
        k = torch.cat([k, nodes.k.to(k.dtype)], dim=2)
        v = torch.cat([v, nodes.v.to(v.dtype)], dim=2)
    dt = compute_dtype(q.dtype)
    bias = torch.zeros(allowed.shape, dtype=dt, device=q.device).masked_fill(~allowed, float("-inf"))
    q_, k_, v_, mask = q.to(dt), k.to(dt), v.to(dt), Mask(q.shape[2], k.shape[2])
    out = dense_attention(q_, k_, v_, mask, scale, extra_bias=bias).to(q.dtype)
    if not return_lse:
        return out
    return out, masked_logsumexp(dense_scores(q_, k_, mask, scale, extra_bias=bias))


def pattern_reference(
    q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, pattern: Pattern, nodes: Nodes | None = None,
    *, return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The reference of a pattern mechanism: dense softmax under the pattern's literal boolean mask
    (queries bottom-right aligned, ``mask``'s causality and key padding); ``return_lse`` as in
    :func:`dense_pattern_attention`."""
    mask.require_only("key_padding", "causal", op="the pattern reference")
    dev = q.device
    qpos = mask.offset + torch.arange(q.shape[2], device=dev)
    return dense_pattern_attention(
        q, k, v, qpos, torch.arange(k.shape[2], device=dev), scale, pattern,
        causal=mask.causal, key_padding=mask.key_padding, nodes=nodes, return_lse=return_lse,
    )
