"""The online (streaming) softmax over key blocks, and the merge of partial softmax results.

A *partial* is the attention of some queries over a subset of the keys, ``(out, lse)``: ``out`` the
softmax-weighted values over that subset and ``lse = log sum exp(s)`` its row log-sum-exp (``-inf``, with
``out = 0``, for a row that sees no key of the subset). Partials over disjoint key subsets combine exactly
(:func:`merge_partials`): with ``L = log sum_i exp(lse_i)``, ``out = sum_i exp(lse_i - L) out_i``. The
online softmax is that merge applied tile by tile: for one block of queries the keys are visited
``block_k`` at a time, so the n x n score matrix never exists; causally empty key tiles are skipped
outright. Flash (:mod:`fastattn.ops.softmax.flash`), ring attention and the sparse engines merge the same
way.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor

from fastattn.core.masks import NEG_INF, Mask, finite_or_zero

__all__ = [
    "block_scores", "compute_dtype", "key_block_partial", "merge_partials", "merge_tiles", "online_softmax",
    "tile_partial", "tile_stats",
]

_HALF = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs accumulate in float32."""
    return torch.float32 if dtype in _HALF else dtype


def block_scores(q_blk: Tensor, k_blk: Tensor, mask: Mask, scale: float, q0: int, k0: int) -> Tensor:
    """Masked scores ``(B, H, bq, bk)`` of one tile (query slots from ``q0``, key slots from ``k0`` of
    ``mask``), in the compute dtype."""
    dt = compute_dtype(q_blk.dtype)
    s = torch.matmul(q_blk.to(dt), k_blk.to(dt).transpose(-1, -2)) * scale
    bias = mask.additive(dt, s.device, q0, q0 + q_blk.shape[2], k0, k0 + k_blk.shape[2])
    return s if bias is None else s + bias


def tile_stats(
    s: Tensor, apply: Callable[[Tensor], Tensor], dropout_p: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(a, l, m)`` of a tile of masked scores ``s``: ``m`` row max (detached; ``-inf`` where the tile
    has no allowed key), ``l`` row sum of ``e = exp(s - m)``, ``a = apply(dropout(e))`` (``e V`` for the
    tile's values)."""
    m = s.detach().amax(dim=-1, keepdim=True)
    e = torch.exp(s - finite_or_zero(m))
    l = e.sum(dim=-1, keepdim=True)
    if dropout_p > 0:
        e = torch.nn.functional.dropout(e, dropout_p)
    return apply(e), l, m


def _partial(a: Tensor, l: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
    """``(a / l, m + log l)`` with ``(0, -inf)`` where ``l == 0``; ``lse`` without the trailing axis."""
    alive = l > 0
    safe = torch.where(alive, l, torch.ones_like(l))
    lse = torch.where(alive, finite_or_zero(m) + torch.log(safe), torch.full_like(l, NEG_INF))
    return a / safe, lse.squeeze(-1)


def tile_partial(
    s: Tensor, apply: Callable[[Tensor], Tensor], dropout_p: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """The partial ``(out, lse)`` of one tile of masked scores ``s`` (see :func:`tile_stats`)."""
    return _partial(*tile_stats(s, apply, dropout_p))


def key_block_partial(
    q_blk: Tensor, k_blk: Tensor, v_blk: Tensor, mask: Mask, scale: float, q0: int, k0: int,
    dropout_p: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """The partial ``(out (B, H, bq, Ev), lse (B, H, bq))`` of one (query block, key block) tile."""
    s = block_scores(q_blk, k_blk, mask, scale, q0, k0)
    return tile_partial(s, lambda e: torch.matmul(e, v_blk.to(e.dtype)), dropout_p)


def merge_partials(parts: Iterable[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Merge partials ``(out_i (..., Lq, Ev), lse_i (..., Lq))`` over disjoint key sets (at least one) into
    the partial over their union: ``L = log sum_i exp(lse_i)``, ``out = sum_i exp(lse_i - L) out_i``.

    Streams (folds left), so a generator of tiles keeps one running result alive. Rows that no partial
    sees (every ``lse_i = -inf``) give ``out = 0`` and ``lse = -inf``, never NaN, in values and gradients.
    Differentiable in every ``out_i`` and ``lse_i``.
    """
    out = lse = None
    for o_j, lse_j in parts:
        if out is None or lse is None:
            out, lse = o_j, lse_j
            continue
        m = finite_or_zero(torch.maximum(lse, lse_j).detach())  # -inf only where both are dead
        w, w_j = torch.exp(lse - m), torch.exp(lse_j - m)
        tot = w + w_j
        alive = tot > 0
        safe = torch.where(alive, tot, torch.ones_like(tot))
        out = out * (w / safe).unsqueeze(-1).to(out.dtype) + o_j * (w_j / safe).unsqueeze(-1).to(o_j.dtype)
        lse = torch.where(alive, m + torch.log(safe), torch.full_like(tot, NEG_INF))
    if out is None or lse is None:
        raise ValueError("merge_partials needs at least one partial")
    return out, lse


def merge_tiles(tiles: Iterable[tuple[Tensor, Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """:func:`merge_partials` over the ``(a, l, m)`` of :func:`tile_stats`; returns ``out`` and ``lse``
    ``(..., Lq, 1)`` with 0 (not ``-inf``) for rows whose keys are all masked."""
    out, lse = merge_partials(_partial(*t) for t in tiles)
    return out, finite_or_zero(lse).unsqueeze(-1)


def online_softmax(
    q_blk: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, q0: int, block_k: int,
    dropout_p: float = 0.0, wrap: Callable | None = None, k0: int = 0,
) -> tuple[Tensor, Tensor]:
    """Attention of the query block at slot ``q0`` over the keys ``k, v`` at slots ``k0 ..`` of ``mask``,
    ``block_k`` keys at a time, merged with :func:`merge_partials`.

    ``wrap(fn, *tensors)`` may wrap each tile's computation (``memory_efficient`` checkpoints it).
    Returns the partial ``out (B, H, bq, Ev)`` in the compute dtype and ``lse (B, H, bq)``.
    """
    q1 = q0 + q_blk.shape[2]

    def tiles() -> Iterator[tuple[Tensor, Tensor]]:
        for j in range(0, k.shape[2], block_k):
            if j > 0 and mask.block_is_empty(q0, q1, k0 + j):
                break  # the first tile always runs: it gives the merge its shape
            k_blk, v_blk = k[:, :, j:j + block_k], v[:, :, j:j + block_k]

            def tile(qb: Tensor, kb: Tensor, vb: Tensor, _k0: int = k0 + j) -> tuple[Tensor, Tensor]:
                return key_block_partial(qb, kb, vb, mask, scale, q0, _k0, dropout_p)

            yield tile(q_blk, k_blk, v_blk) if wrap is None else wrap(tile, q_blk, k_blk, v_blk)

    return merge_partials(tiles())
