"""Flash attention (Dao et al., 2022, arXiv:2205.14135) as an op, tiled in PyTorch.

Forward: for each block of ``block_q`` queries, an online softmax over blocks of ``block_k`` keys
(:func:`~fastattn.ops.softmax.online.online_softmax`); only the output ``O`` and the row log-sum-exp
``L`` are saved. Backward (the paper's Algorithm 4): with ``D = rowsum(dO * O) - dL``, each tile recomputes
``P = exp(Q K^T * scale - L)`` and accumulates ``dV += P^T dO``, ``dS = P * (dO V^T - D)``,
``dQ += dS K * scale``, ``dK += dS^T Q * scale``. No n x n tensor is ever stored: O(n) memory,
O(n^2 d) time; causally empty tiles are skipped in both passes.

The two passes over one block of keys are public (:func:`flash_block_forward`,
:func:`flash_block_backward`) so that a caller holding the keys in pieces (ring attention: each piece with
its absolute ``k_start`` in the :class:`~fastattn.core.masks.Mask`) can run the forward piece by piece,
merge the partials with :func:`~fastattn.ops.softmax.online.merge_partials`, and run the backward piece
by piece against the merged ``(out, lse)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fastattn.core.masks import Mask, finite_or_zero
from .online import block_scores, compute_dtype, online_softmax

__all__ = ["flash_attention", "flash_block_backward", "flash_block_forward"]


def flash_block_forward(
    q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, q0: int = 0, k0: int = 0, *,
    block_q: int = 1024, block_k: int = 1024,
) -> tuple[Tensor, Tensor]:
    """The partial of queries ``q (B, H, Lq, E)`` at slots ``q0 ..`` of ``mask`` over the keys
    ``k, v (B, H, Lk, .)`` at slots ``k0 ..``, tile by tile. Not differentiable (call it under
    ``no_grad`` or inside an autograd function).

    Returns ``out (B, H, Lq, Ev)`` in the compute dtype (float32 for half inputs) and ``lse (B, H, Lq)``,
    ``-inf`` (with ``out = 0``) for queries that see none of these keys.
    """
    outs, lses = [], []
    for qs in range(0, q.shape[2], block_q):
        o, lse = online_softmax(q[:, :, qs:qs + block_q], k, v, mask, scale, q0 + qs, block_k, k0=k0)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def flash_block_backward(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, d_out: Tensor, mask: Mask, scale: float,
    q0: int = 0, k0: int = 0, *, block_q: int = 1024, block_k: int = 1024, d_lse: Tensor | None = None,
    delta: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of attention through the keys ``k, v`` at slots ``k0 ..`` for the queries ``q`` at
    slots ``q0 ..``, given the *final* ``out (B, H, Lq, Ev)`` and ``lse (B, H, Lq)`` of those queries (over
    every key, not only these) and the incoming ``d_out`` (and ``d_lse``, if ``lse`` is used downstream).

    ``delta`` (``rowsum(d_out * out) - d_lse``, ``(B, H, Lq, 1)``) may be passed when the keys come in
    pieces, to compute it once. Returns ``(dq, dk, dv)`` in the compute dtype; ``dq`` is this piece's
    contribution (sum it over the pieces).
    """
    dt = compute_dtype(q.dtype)
    d_out = d_out.to(dt)
    if delta is None:
        delta = (d_out * out.to(dt)).sum(dim=-1, keepdim=True)
        if d_lse is not None:
            delta = delta - d_lse.to(dt).unsqueeze(-1)
    lse = finite_or_zero(lse.to(dt)).unsqueeze(-1)  # -inf rows see no key: their scores are -inf too
    dq = torch.zeros(q.shape, dtype=dt, device=q.device)
    dk = torch.zeros(k.shape, dtype=dt, device=k.device)
    dv = torch.zeros(v.shape, dtype=dt, device=v.device)
    for qs in range(0, q.shape[2], block_q):
        qe = min(qs + block_q, q.shape[2])
        q_blk, do_blk = q[:, :, qs:qe].to(dt), d_out[:, :, qs:qe]
        for ks in range(0, k.shape[2], block_k):
            if mask.block_is_empty(q0 + qs, q0 + qe, k0 + ks):
                break
            ke = min(ks + block_k, k.shape[2])
            k_blk, v_blk = k[:, :, ks:ke].to(dt), v[:, :, ks:ke].to(dt)
            p = torch.exp(block_scores(q_blk, k_blk, mask, scale, q0 + qs, k0 + ks) - lse[:, :, qs:qe])
            dv[:, :, ks:ke] += p.transpose(-1, -2) @ do_blk
            ds = p * (do_blk @ v_blk.transpose(-1, -2) - delta[:, :, qs:qe])
            dq[:, :, qs:qe] += (ds @ k_blk) * scale
            dk[:, :, ks:ke] += (ds.transpose(-1, -2) @ q_blk) * scale
    return dq, dk, dv


class _Flash(torch.autograd.Function):
    """Differentiable in both outputs: ``out`` and ``lse``."""

    @staticmethod
    def forward(
        ctx: Any, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, block_q: int, block_k: int,
    ) -> tuple[Tensor, Tensor]:
        out, lse = flash_block_forward(q, k, v, mask, scale, block_q=block_q, block_k=block_k)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask, ctx.scale, ctx.block_q, ctx.block_k = mask, scale, block_q, block_k
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx: Any, d_out: Tensor, d_lse: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = flash_block_backward(
            q, k, v, out, lse, d_out, ctx.mask, ctx.scale, block_q=ctx.block_q, block_k=ctx.block_k, d_lse=d_lse,
        )
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def flash_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, *, block_q: int = 1024, block_k: int = 1024,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Exact softmax attention of ``q (B, H, Lq, E)`` over ``k, v (B, H, Lk, .)`` under ``mask``, in
    ``block_q x block_k`` tiles with a recomputing backward (O(n) memory).

    Honours every :class:`~fastattn.core.masks.Mask` field; a float ``bias`` is applied but not
    differentiated (a ``ValueError`` if it requires grad). Returns ``out`` in ``q``'s dtype, or with
    ``return_lse`` the partial ``(out, lse (B, H, Lq))`` (``lse`` in the compute dtype, ``-inf`` for
    queries that see no key), differentiable in both, ready for
    :func:`~fastattn.ops.softmax.online.merge_partials`.

    Example:
        >>> q = k = v = torch.randn(1, 2, 100, 16)
        >>> out, lse = flash_attention(q, k, v, Mask(100, 100, causal=True), 0.25, block_q=32, return_lse=True)
    """
    if block_q < 1 or block_k < 1:
        raise ValueError(f"block sizes must be >= 1, got {block_q}, {block_k}")
    if mask.bias is not None and mask.bias.requires_grad:
        raise ValueError(
            "flash attention does not differentiate a float attn_mask (Mask.bias requires grad); "
            "the dense and online softmax ops do"
        )
    out, lse = _Flash.apply(q, k, v, mask, scale, block_q, block_k)
    return (out, lse) if return_lse else out
