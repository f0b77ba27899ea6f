"""The online (streaming) softmax over key blocks, shared by ``memory_efficient`` and ``flash``.

For one block of queries, keys are visited ``block_k`` at a time. Each visit yields the block's row
maxima ``m_j``, ``l_j = sum exp(s - m_j)`` and ``a_j = exp(s - m_j) V_j``; the running triple is rescaled
to the new maximum and summed, so the n x n score matrix never exists. Causally empty key blocks are
skipped outright. The result is ``(out, lse)`` with ``lse = log sum_j exp(s_j)`` per query (0 for rows
whose keys are all masked, whose output is 0).
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor

from fastattn.core.masks import Mask, finite_or_zero

__all__ = ["block_scores", "key_block_stats", "merge_tiles", "online_softmax", "tile_stats"]

_HALF = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs accumulate in float32."""
    return torch.float32 if dtype in _HALF else dtype


def block_scores(q_blk: Tensor, k_blk: Tensor, mask: Mask, scale: float, q0: int, k0: int) -> Tensor:
    """Masked scores ``(B, H, bq, bk)`` of one (query block, key block) tile, in the compute dtype."""
    dt = compute_dtype(q_blk.dtype)
    s = torch.matmul(q_blk.to(dt), k_blk.to(dt).transpose(-1, -2)) * scale
    bias = mask.additive(dt, s.device, q0, q0 + q_blk.shape[2], k0, k0 + k_blk.shape[2])
    return s if bias is None else s + bias


def key_block_stats(
    q_blk: Tensor, k_blk: Tensor, v_blk: Tensor, mask: Mask, scale: float, q0: int, k0: int,
    dropout_p: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(a, l, m)`` of one tile: ``m`` row max (detached), ``l`` row sum of ``exp(s - m)``,
    ``a = dropout(exp(s - m)) V``."""
    s = block_scores(q_blk, k_blk, mask, scale, q0, k0)
    return tile_stats(s, lambda e: torch.matmul(e, v_blk.to(e.dtype)), dropout_p)


def tile_stats(
    s: Tensor, apply: Callable[[Tensor], Tensor], dropout_p: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(a, l, m)`` of a tile of masked scores ``s``: ``m`` row max (detached; ``-inf`` where the tile
    has no allowed key, so that such a tile cannot move the running maximum), ``l`` row sum of
    ``e = exp(s - m)``, ``a = apply(dropout(e))`` (``e V`` for the tile's values)."""
    m = s.detach().amax(dim=-1, keepdim=True)
    e = torch.exp(s - finite_or_zero(m))
    l = e.sum(dim=-1, keepdim=True)
    if dropout_p > 0:
        e = torch.nn.functional.dropout(e, dropout_p)
    return apply(e), l, m


def merge_tiles(tiles: Iterable[tuple[Tensor, Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """The online softmax over the ``(a, l, m)`` of successive key tiles of the same queries (at least
    one): each is rescaled to the running maximum and summed. Returns ``out = a / l`` and
    ``lse = m + log l`` (both 0 for rows whose keys are all masked)."""
    acc = l = m = None
    for a_j, l_j, m_j in tiles:
        if acc is None:
            acc, l, m = a_j, l_j, m_j
            continue
        m_new = torch.maximum(m, m_j)
        ref = finite_or_zero(m_new)  # -inf only while every key so far is masked
        c_old, c_new = torch.exp(m - ref), torch.exp(m_j - ref)
        acc = acc * c_old + a_j * c_new
        l = l * c_old + l_j * c_new
        m = m_new
    assert acc is not None and l is not None and m is not None
    alive = l > 0
    out = acc / torch.where(alive, l, torch.ones_like(l))
    lse = torch.where(alive, m + torch.log(torch.where(alive, l, torch.ones_like(l))), torch.zeros_like(l))
    return out, lse


def online_softmax(
    q_blk: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, q0: int, block_k: int,
    dropout_p: float = 0.0, wrap: Callable | None = None,
) -> tuple[Tensor, Tensor]:
    """Attention of the query block starting at ``q0`` over all keys, ``block_k`` keys at a time.

    ``wrap(fn, *tensors)`` may wrap each tile's computation (``memory_efficient`` checkpoints it).
    Returns ``out (B, H, bq, Ev)`` in the compute dtype and ``lse (B, H, bq, 1)``.
    """
    q1 = q0 + q_blk.shape[2]

    def tiles() -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        for k0 in range(0, k.shape[2], block_k):
            if mask.block_is_empty(q0, q1, k0):
                break  # block 0 is never causally empty
            k_blk, v_blk = k[:, :, k0:k0 + block_k], v[:, :, k0:k0 + block_k]

            def tile(qb: Tensor, kb: Tensor, vb: Tensor, _k0: int = k0) -> tuple[Tensor, Tensor, Tensor]:
                return key_block_stats(qb, kb, vb, mask, scale, q0, _k0, dropout_p)

            yield tile(q_blk, k_blk, v_blk) if wrap is None else wrap(tile, q_blk, k_blk, v_blk)

    return merge_tiles(tiles())
