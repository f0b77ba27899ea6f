"""Doubly-normalised attention (Ding et al., 2020, arXiv:2009.14308): "Attention that does not explain away".

Softmax attention normalises each query's row, so a key that every query scores low receives almost no
attention in total -- it is "explained away". The doubly-normalised attention scheme normalises first
over the *queries* (each key distributes a unit of mass among the queries), then over the keys (each
query's weights sum to one):

``A~_ij = exp(s_ij) / sum_i' exp(s_i'j)``,  ``A_ij = A~_ij / sum_j' A~_ij'``,  ``out = A V``,
with ``s_ij = scale * q_i . k_j``.

Since ``A~_ij <= 1`` and ``sum_i A~_ij = 1``, every key receives total attention
``sum_i A_ij >= 1 / n_keys`` -- no key is ignored.

Implementation: ``A`` is the row softmax of ``s_ij - c_j`` with ``c_j = logsumexp_i s_ij`` (the first
normalisation is a per-key bias), which is exact and cannot overflow. Two passes over query blocks of
``query_chunk`` rows, each block checkpointed: column log-sum-exp, then the biased row softmax. Time is
an honest O(n^2 d); memory O(n * query_chunk), never an ``n x n`` matrix.

Padding: padded keys are excluded from both normalisations. In self-attention (``Lq == Lk``) the padded
positions are also padded *queries*; with ``exclude_padded_queries=True`` (default) they are left out of
the normalisation over queries too, so real outputs never depend on padding tokens. Set it to False for
cross-attention whose query and key lengths happen to be equal. Non-causal: the normalisation over
queries looks at every query, future ones included.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fastattn.core.base import Mechanism
from fastattn.core.masks import Mask, masked_softmax, safe_rowmax
from fastattn.registry import register
from fastattn.ops.features import padding_bias, query_chunked


def _query_bias(mask: Mask, exclude: bool, dtype: torch.dtype, device: torch.device) -> Tensor | None:
    """``(B, 1, Lq, 1)`` with ``-inf`` on queries left out of the normalisation over queries."""
    if not exclude or mask.lq != mask.lk:
        return None
    return padding_bias(mask, dtype, device, dim=-2)


@register(
    "doubly_normalized", complexity="O(n^2 d)", causal=False, decoding=False, padding=True, weights=True,
    time_growth=2.0, memory_growth=2.0,
)
class DoublyNormalizedAttention(Mechanism):
    """Normalise over queries, then over keys (see module docstring)."""

    test_options = {"query_chunk": 16}

    @dataclass(frozen=True)
    class Options:
        query_chunk: int = 256  # queries per block (memory: query_chunk x Lk per block)
        exclude_padded_queries: bool = True  # self-attention: padded positions are not queries either

        def __post_init__(self) -> None:
            if self.query_chunk < 1:
                raise ValueError(f"query_chunk must be >= 1, got {self.query_chunk}")

    def _column_lse(self, q: Tensor, k: Tensor, mask: Mask, scale: float) -> Tensor:
        """``c_j = logsumexp_i s_ij`` over the counted queries, ``(B, H, 1, Lk)``; 0 where no query counts.

        Each query block yields its column maxima ``m`` (detached) and ``l = sum_i exp(s_ij - m_j)``;
        the blocks are merged like an online softmax. Excluded queries enter as ``exp(-inf) = 0``, so no
        ``-inf - -inf`` ever reaches autograd."""
        qbias = _query_bias(mask, self.options.exclude_padded_queries, q.dtype, q.device)

        def block(q_blk: Tensor, k_: Tensor, q0: int) -> Tensor:
            s = torch.matmul(q_blk, k_.transpose(-1, -2)) * scale
            if qbias is not None:
                s = s + qbias[:, :, q0:q0 + q_blk.shape[2]]
            m = safe_rowmax(s, dim=2)
            l = torch.exp(s - m).sum(dim=2, keepdim=True)
            return torch.cat([m, l], dim=2)  # (B, H, 2, Lk)

        parts = query_chunked(block, q, k, chunk=self.options.query_chunk)  # (B, H, 2 * n_blocks, Lk)
        m, l = parts[:, :, 0::2], parts[:, :, 1::2]
        top = m.amax(dim=2, keepdim=True)
        total = (l * torch.exp(m - top)).sum(dim=2, keepdim=True)
        return top + torch.log(torch.where(total > 0, total, torch.ones_like(total)))

    def _row_bias(self, q: Tensor, k: Tensor, mask: Mask, scale: float) -> Tensor:
        """``-c_j`` plus ``-inf`` on padding keys, ``(B, H, 1, Lk)``: ``A`` is the row softmax of ``s + bias``."""
        c = self._column_lse(q, k, mask, scale)
        kbias = padding_bias(mask, q.dtype, q.device)
        return -c if kbias is None else kbias - c

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, dropout_p: float = 0.0) -> Tensor:
        dtype = q.dtype
        dt = dtype
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
        bias = self._row_bias(q, k, mask, scale)

        def block(q_blk: Tensor, k_: Tensor, v_: Tensor, bias_: Tensor, q0: int) -> Tensor:
            s = torch.matmul(q_blk, k_.transpose(-1, -2)) * scale
            return torch.matmul(masked_softmax(s, bias_), v_)

        return query_chunked(block, q, k, v, bias, chunk=self.options.query_chunk).to(dtype)

    def weights(self, q: Tensor, k: Tensor, mask: Mask, scale: float) -> Tensor:
        """The doubly-normalised matrix ``(B, H, Lq, Lk)``, computed stably (row softmax of ``s - c``)."""
        dt = q.dtype
        q, k = q.to(dt), k.to(dt)
        s = torch.matmul(q, k.transpose(-1, -2)) * scale
        return masked_softmax(s, self._row_bias(q, k, mask, scale))

    def _literal_weights(self, q: Tensor, k: Tensor, mask: Mask, scale: float) -> Tensor:
        """The doubly-normalised matrix, literally: ``exp(s_ij)`` divided by its sum over the counted
        queries, then by its row sum over the real keys. (``exp`` can overflow on large scores: this
        dense form is the reference only.)"""
        e = torch.exp(torch.matmul(q, k.transpose(-1, -2)) * scale)
        qbias = _query_bias(mask, self.options.exclude_padded_queries, e.dtype, e.device)
        counted = e if qbias is None else e * torch.exp(qbias)  # excluded queries contribute 0
        col = counted.sum(dim=-2, keepdim=True)
        over_queries = e / torch.where(col > 0, col, torch.ones_like(col))
        allowed = mask.allowed(e.device)
        if allowed is not None:
            over_queries = over_queries * allowed.to(e.dtype)
        row = over_queries.sum(dim=-1, keepdim=True)
        return over_queries / torch.where(row > 0, row, torch.ones_like(row))

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
        return torch.matmul(self._literal_weights(q, k, mask, scale), v)
