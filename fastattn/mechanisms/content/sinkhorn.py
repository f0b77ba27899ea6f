"""Sparse Sinkhorn attention (Tay, Bahri, Yang, Metzler and Juan, 2020, arXiv:2002.11296).

The sequence is cut into blocks of ``b`` positions, ``N_B = ceil(n / b)``. A learned sorting network
(SortNet, per head) reads the block embeddings ``X'_beta = sum_{t in beta} k_t`` (sum pooling of the head's
keys) and scores every block against every block, ``R = relu(F2 relu(F1 X'))`` ``(N_B x N_B)``; the
Gumbel-Sinkhorn operator turns it into a soft permutation, ``S = Sinkhorn_{N_k}((log(R + eps) + g) / tau)``
(``N_k`` alternating row and column normalisations in log space; Gumbel noise ``g`` in training only).
The sorted blocks are soft mixtures of blocks, ``K~_beta = sum_beta' S[beta, beta'] K_beta'`` (and ``V~``
alike), and each query block attends to its sorted block and its own block under one softmax,
``softmax(q [K~_beta ; K_beta]^T s) [V~_beta ; V_beta]``.

Causal form (the paper's Causal Sinkhorn Balancing, as specified in MECHANISMS.md; details recalled from
the paper): ``S`` is strictly lower-triangular (``beta' < beta``, a soft mix containing the own block would
leak positions after ``i``), row ``beta`` of SortNet reads the sum of the blocks before ``beta`` (a
cumulative sum), and the column normalisation divides by the column's cumulative sum over rows
``<= beta``; so ``S[beta]`` depends on positions before block ``beta`` only. The own block is masked
``j <= i``. The first block has no sorted block (its queries see their own block only).

Padding: padded keys and values are zeroed before pooling and mixing; a sorted slot is visible when any
block mixed into it (``S > 0``) has a real key there. The SortNet's output width fixes
``max_length`` (``N_B <= ceil(max_length / b)``; longer inputs are a ``ValueError``). Non-causal calls need
``Lq == Lk`` (query blocks pair with key blocks); causal calls with ``Lq < Lk`` (decoding) place queries
bottom-right. Gumbel noise comes from buffers (``noise_seed``, ``noise_draws``; :mod:`fastattn.ops.noise`).

Cost ``O(n b d + N_B^2 (b d + h))`` time (``h`` the SortNet width; the block mixing is ``n^2 d / b``),
``O(n b + N_B^2)`` memory. SortCut (attending only the first sorted blocks) is not implemented.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastattn.core.base import Mechanism
from fastattn.core.checks import check_table_length
from fastattn.core.masks import NEG_INF, Mask, masked_softmax
from fastattn.ops.noise import new_seed, next_generator
from fastattn.ops.softmax.online import tile_partial
from fastattn.registry import register

EPS = 1e-6  # log(R + EPS): ReLU scores of 0 stay finite (as the peer's log)


def _lse(x: Tensor, dim: int) -> Tensor:
    """``logsumexp`` over ``dim`` (kept), ``-inf`` for all ``-inf`` slices, with finite gradients."""
    m = x.detach().amax(dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = torch.exp(x - m).sum(dim, keepdim=True)
    alive = s > 0
    return torch.where(alive, m + torch.log(torch.where(alive, s, torch.ones_like(s))), torch.full_like(s, NEG_INF))


def _minus(x: Tensor, lse: Tensor) -> Tensor:
    return x - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))


def log_sinkhorn(logits: Tensor, iterations: int, causal: bool) -> Tensor:
    """``S = exp(log_S)`` after ``iterations`` row-then-column normalisations of ``logits (..., N, N)``
    (``-inf`` = excluded entry) in log space. ``causal``: each column is divided by its cumulative sum
    over the rows up to the current one (rows ``<= beta``), so row ``beta`` depends on rows ``<= beta``."""
    x = logits
    for _ in range(iterations):
        x = _minus(x, _lse(x, -1))  # rows sum to 1 (entries <= 0 from here on: exp is safe)
        if causal:
            col = torch.exp(x).cumsum(-2)
            x = x - torch.log(torch.where(col > 0, col, torch.ones_like(col)))
        else:
            x = _minus(x, _lse(x, -2))
    return torch.exp(x)


@register(
    "sinkhorn", complexity="O(n b d + (n/b)^2 b d)", causal=True, decoding=True, padding=True, randomized=True,
    time_growth=1.5, memory_growth=1.0,
)
class Sinkhorn(Mechanism):
    """Block attention over the own block and a learned soft-sorted block (Gumbel-Sinkhorn SortNet)."""

    test_options = {"block": 8, "max_length": 64, "iterations": 5}
    positional = True  # blocks are absolute positions: decoding a padded row starts at its first real token
    deviations = (
        "SortNet reads sum-pooled keys of each head (the projected input), not the layer input X.",
        "log(R + 1e-6) instead of log R, so that ReLU scores of 0 stay finite (the peer's choice).",
        "Causal balancing: columns normalised by their cumulative sums over rows <= beta, rows over "
        "beta' < beta, SortNet on the prefix sums of earlier blocks (verify against the paper).",
        "SortCut is not implemented.",
    )

    @dataclass(frozen=True)
    class Options:
        block: int = 64  # b: positions per block
        max_length: int = 8192  # n_max: fixes the SortNet's output width ceil(n_max / b)
        hidden: int = 0  # SortNet hidden width (0: head_dim)
        temperature: float = 0.75  # tau of the Gumbel-Sinkhorn operator
        iterations: int = 7  # N_k row/column normalisations (the peer's default)

        def __post_init__(self) -> None:
            if self.block < 1 or self.max_length < 1 or self.hidden < 0 or self.iterations < 1:
                raise ValueError(
                    f"sinkhorn: block, max_length and iterations must be >= 1 and hidden >= 0, got "
                    f"{self.block}, {self.max_length}, {self.iterations}, {self.hidden}"
                )
            if not self.temperature > 0:
                raise ValueError(f"sinkhorn: temperature must be > 0, got {self.temperature}")

    def __init__(self, options=None, *, head_dim: int, num_heads: int, num_kv_heads: int | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(options, head_dim=head_dim, num_heads=num_heads, num_kv_heads=num_kv_heads)
        o = self.options
        hid = o.hidden or head_dim
        self.max_blocks = math.ceil(o.max_length / o.block)

        def uniform(*shape: int, fan_in: int) -> nn.Parameter:  # nn.Linear's initialisation, from the generator
            u = torch.rand(*shape, generator=generator, dtype=torch.float64) * 2 - 1
            return nn.Parameter((u * fan_in ** -0.5).float())

        self.w1, self.b1 = uniform(num_heads, head_dim, hid, fan_in=head_dim), uniform(num_heads, hid, fan_in=head_dim)
        self.w2, self.b2 = uniform(num_heads, hid, self.max_blocks, fan_in=hid), uniform(num_heads, self.max_blocks, fan_in=hid)
        self.register_buffer("noise_seed", new_seed(generator))
        self.register_buffer("noise_draws", torch.zeros((), dtype=torch.long))

    # ---- the sorting matrix ---------------------------------------------------------------------
    def _blocks(self, x: Tensor, nb: int) -> Tensor:
        """``(B, H, L, ...) -> (B, H, nb, b, ...)``, zero-padded at the end."""
        b, pad = self.options.block, nb * self.options.block - x.shape[2]
        if pad:
            x = torch.cat([x, x.new_zeros(*x.shape[:2], pad, *x.shape[3:])], dim=2)
        return x.view(*x.shape[:2], nb, b, *x.shape[3:])

    def _real(self, k: Tensor, mask: Mask) -> Tensor:
        keep = mask.key_keep(k.dtype)
        return torch.ones(k.shape[0], 1, k.shape[2], dtype=k.dtype, device=k.device) if keep is None else keep[..., 0]

    def sortnet(self, k: Tensor, mask: Mask) -> Tensor:
        """The SortNet scores ``R (B, H, N_B, N_B)`` (non-negative) from the real keys' block sums (causal:
        row ``beta`` from the blocks before ``beta``)."""
        nb = math.ceil(k.shape[2] / self.options.block)
        check_table_length(k.shape[2], self.options.max_length, "sinkhorn: key length")
        x = self._blocks(k * self._real(k, mask)[..., None], nb).sum(3)  # (B, H, N_B, E)
        if mask.causal:
            x = x.cumsum(2) - x
        h = torch.relu(torch.einsum("bhne,hef->bhnf", x, self.w1.to(x.dtype)) + self.b1.to(x.dtype)[:, None])
        r = torch.einsum("bhnf,hfm->bhnm", h, self.w2[..., :nb].to(x.dtype)) + self.b2[:, None, :nb].to(x.dtype)
        return torch.relu(r)

    def _logits(self, k: Tensor, mask: Mask) -> Tensor:
        """``(log(R + eps) + g) / tau`` with ``-inf`` outside the causal support (``beta' < beta``)."""
        r = self.sortnet(k, mask)
        x = torch.log(r + EPS)
        if self.training:  # Gumbel noise, from the module's own stream
            g = next_generator(self.noise_seed, self.noise_draws, k.device)
            u = torch.rand(x.shape, generator=g, device=k.device, dtype=x.dtype)
            x = x - torch.log(-torch.log(u + 1e-20) + 1e-20)
        x = x / self.options.temperature
        if mask.causal:
            nb = x.shape[-1]
            x = x.masked_fill(~torch.ones(nb, nb, dtype=torch.bool, device=x.device).tril(-1), NEG_INF)
        return x

    def sorting_matrix(self, k: Tensor, mask: Mask) -> Tensor:
        """The soft permutation ``S (B, H, N_B, N_B)``: row ``beta`` mixes the blocks ``beta'`` into the sorted
        block of ``beta`` (log-space Sinkhorn)."""
        return log_sinkhorn(self._logits(k, mask), self.options.iterations, mask.causal)

    # ---- attention --------------------------------------------------------------------------------
    def _check(self, q: Tensor, k: Tensor, mask: Mask) -> None:
        mask.require_only("key_padding", "causal", op="sinkhorn attention")
        if not mask.causal and q.shape[2] != k.shape[2]:
            raise ValueError(
                f"sinkhorn: non-causal attention needs as many queries as keys (query blocks pair with key "
                f"blocks), got Lq={q.shape[2]}, Lk={k.shape[2]}"
            )

    def _sorted(self, k: Tensor, v: Tensor, mask: Mask) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Blocked keys, values, real flags and the sorted ones: ``kb, vb (B, H, N_B, b, .)``, ``rb (B, 1|H,
        N_B, b)`` bool, ``ks, vs``, ``rs`` alike."""
        nb = math.ceil(k.shape[2] / self.options.block)
        real = self._real(k, mask)
        kb = self._blocks(k * real[..., None], nb)
        vb = self._blocks(v * real[..., None], nb)
        rb = self._blocks(real, nb)
        s = self.sorting_matrix(k, mask)
        ks = torch.einsum("bhuv,bhvte->bhute", s, kb)
        vs = torch.einsum("bhuv,bhvte->bhute", s, vb)
        rs = torch.einsum("bhuv,bhvt->bhut", (s > 0).to(k.dtype), rb.expand(*s.shape[:2], *rb.shape[2:])) > 0
        return kb, vb, rb > 0, ks, vs, rs

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, dropout_p: float = 0.0) -> Tensor:
        self._check(q, k, mask)
        bsz, h, lq, _ = q.shape
        lk, blk = k.shape[2], self.options.block
        kb, vb, rb, ks, vs, rs = self._sorted(k, v, mask)
        nb = kb.shape[2]
        first = (mask.q_start // blk) if mask.causal else 0  # the first block holding a query
        lead = mask.q_start - first * blk  # slots before query 0 in that block
        qp = torch.cat([q.new_zeros(bsz, h, lead, q.shape[3]), q], dim=2)
        qb = self._blocks(qp, nb - first)  # (B, H, nq, b, E)
        kb, vb, rb, ks, vs, rs = (x[:, :, first:] for x in (kb, vb, rb, ks, vs, rs))
        own = torch.matmul(qb, kb.transpose(-1, -2)) * scale  # (B, H, nq, b, b)
        keep = rb[..., None, :]
        if mask.causal:
            keep = keep & torch.ones(blk, blk, dtype=torch.bool, device=q.device).tril()
        srt = torch.matmul(qb, ks.transpose(-1, -2)) * scale
        s = torch.cat([srt.masked_fill(~rs[..., None, :], NEG_INF), own.masked_fill(~keep, NEG_INF)], dim=-1)
        vv = torch.cat([vs, vb.expand(*vs.shape[:3], *vb.shape[3:])], dim=-2)
        out, _ = tile_partial(s, lambda e: torch.matmul(e, vv.to(e.dtype)))
        return out.reshape(bsz, h, -1, v.shape[3])[:, :, lead:lead + lq].contiguous()

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
        """Dense: the literal Sinkhorn iteration in linear space, the sorted blocks as explicit mixtures,
        and one masked softmax of every query over all sorted slots and all keys."""
        self._check(q, k, mask)
        blk, lk = self.options.block, k.shape[2]
        nb = math.ceil(lk / blk)
        s = torch.exp(self._logits(k, mask))
        for _ in range(self.options.iterations):
            row = s.sum(-1, keepdim=True)
            s = s / torch.where(row > 0, row, torch.ones_like(row))  # an empty row (causal: the first) stays 0
            col = s.cumsum(-2) if mask.causal else s.sum(-2, keepdim=True)
            s = s / torch.where(col > 0, col, torch.ones_like(col))
        real = self._real(k, mask).expand(k.shape[0], k.shape[1], lk)
        kz, vz = k * real[..., None], v * real[..., None]
        slot_block = torch.arange(nb * blk, device=q.device) // blk  # sorted slot -> block
        slot_t = torch.arange(nb * blk, device=q.device) % blk
        j = torch.arange(lk, device=q.device)
        # the sorted key at slot (beta, t) = sum_j S[beta, block(j)] k_j over the keys j with t = j mod b
        mix = s[..., slot_block[:, None], j[None, :] // blk] * (slot_t[:, None] == j % blk)  # (B, H, N_B b, Lk)
        ks, vs = mix @ kz, mix @ vz
        rs = (mix > 0).to(k.dtype) @ real[..., None] > 0  # (B, H, N_B b, 1)
        qpos = torch.arange(q.shape[2], device=q.device) + mask.q_start
        qblk = qpos // blk
        see_sorted = (qblk[:, None] == slot_block[None, :]) & rs[..., 0][..., None, :]
        see_own = (qblk[:, None] == (j // blk)[None, :]) & (real[..., None, :] > 0)
        if mask.causal:
            see_own = see_own & (j[None, :] <= qpos[:, None])
        scores = torch.cat([q @ ks.transpose(-1, -2), q @ k.transpose(-1, -2)], -1) * scale
        allowed = torch.cat([see_sorted, see_own], -1)
        p = masked_softmax(scores.masked_fill(~allowed, NEG_INF))
        return p @ torch.cat([vs, vz], -2)
