"""Scatterbrain: Unifying Sparse and Low-rank Attention Approximation (Chen et al., 2021, arXiv:2110.15343),
the local-window form (the authors' ``SBLocalAttention`` in ``HazyResearch/fly``).

The attention matrix ``exp(s Q K^T)`` is estimated by a low-rank part, Performer's positive random
features ``phi`` (``phi(q) . phi(k)`` is an unbiased estimate of ``exp(s q . k)``), plus a sparse
correction that replaces the estimate by the exact value on a support ``S``, here the local window
``|i - j| <= window`` (causal: ``0 <= i - j <= window``)::

    Z_i   = sum_{j in S} e^{s_ij} + (phi(q_i) . sum_{all j} phi(k_j) - sum_{j in S} phi(q_i) . phi(k_j))
    out_i = [sum_{j in S} (e^{s_ij} - phi(q_i) . phi(k_j)) v_j + phi(q_i) sum_j phi(k_j) v_j^T] / Z_i

so the implied matrix is ``e^{s_ij}`` on ``S`` and ``phi(q_i) . phi(k_j)`` elsewhere (the sparse correction
alone has negative entries; rows of the implied matrix sum to 1). The paper clamps the low-rank remainder
of ``Z`` at ``>= 1e-24``; the reference does so.

* Efficient path: the remainder ``sum_all - sum_S`` is computed as what it equals, the low-rank sum over
  the keys *outside* the window -- keys ``j <= i - window - 1`` (causal linear attention over the keys
  shifted by ``window + 1`` positions) and, non-causal, keys ``j >= i + window + 1`` (the same on the
  reversed sequence) -- so nothing is subtracted and the remainder is never negative (the clamp guards
  the subtraction and is not needed). The window part is the block-sparse engine (``Window``), each part
  returns its partial result ``(out, lse)`` -- the linear engine's unnormalised numerator, denominator
  and key units with the query features' explicit log-scales -- and the parts are merged by log-sum-exp
  (:func:`~fastattn.ops.softmax.online.merge_partials`), never by mixing normalised outputs. Performer's
  features are defined up to per-token factors; scatterbrain mixes exact ``e^s`` with ``phi . phi`` so
  both factors are kept explicitly (query and key log-scales).
* ``window = -1``: empty support, Performer (with the same features). A window covering every key: exact
  softmax (up to the clamp, in the reference).
* Padding is removed from both parts; an all-padding row gives zeros. Fewer queries than keys: queries
  sit at the bottom-right absolute positions (so ``step`` equals the causal forward: the default
  KV-cache decoding, which recomputes the low-rank part over the cache -- no constant-size state).
* The LSH support of the paper is not implemented (local window only). O(n (w + m) d) time, O(n m) memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from fastattn.core.base import Mechanism
from fastattn.core.masks import Mask
from fastattn.ops.features import (
    RandomProjection, softmax_kernel_estimate, softmax_kernel_features, softmax_kernel_log_scale,
)
from fastattn.ops.linear.engine import linear_attention
from fastattn.ops.softmax.online import merge_partials
from fastattn.ops.sparse.engine import block_sparse_attention
from fastattn.ops.sparse.patterns import Pattern, Window
from fastattn.registry import register

__all__ = ["ScatterbrainAttention"]

CLAMP = 1e-24  # the paper's floor on the low-rank remainder of the normaliser


def _shift(x: Tensor, s: int, dim: int = 2, fill: float | bool = 0) -> Tensor:
    """``x`` moved ``s`` positions later along ``dim`` (``x'_t = x_{t - s}``), the first ``s`` filled."""
    if s == 0:
        return x
    n = x.shape[dim]
    shape = list(x.shape)
    shape[dim] = min(s, n)
    return torch.cat([x.new_full(shape, fill), x.narrow(dim, 0, max(n - s, 0))], dim)


@register(
    "scatterbrain", complexity="O(n (w + m) d)", causal=True, decoding=True, padding=True, weights=True,
    randomized=True, time_growth=1.0, memory_growth=1.0,
)
class ScatterbrainAttention(RandomProjection, Mechanism):
    """Performer's low-rank estimate with the exact scores on a local window (sparse + low-rank)."""

    positional = True
    test_options: ClassVar[dict[str, Any]] = {"window": 5, "num_features": 16, "block": 8, "chunk": 16}
    deviations = (
        "Local-window sparse support only (the paper's LSH support is not implemented).",
        "Decoding re-runs the causal forward over a KV cache (no LinearState plus bounded window).",
    )

    @dataclass(frozen=True)
    class Options:
        window: int = 64  # radius of the exact local window S (-1: empty support, Performer)
        num_features: int = 256  # m, Performer's random features
        orthogonal: bool = True  # orthogonal random features
        block: int = 64  # block of the sparse engine
        chunk: int = 128  # chunk of the causal linear scan

        def __post_init__(self) -> None:
            if self.window < -1:
                raise ValueError(f"window must be >= -1 (-1: no sparse part), got {self.window}")
            if self.num_features < 1 or self.block < 1 or self.chunk < 1:
                raise ValueError("num_features, block and chunk must be >= 1")

    def __init__(self, options=None, *, head_dim: int, num_heads: int, num_kv_heads: int | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(options, head_dim=head_dim, num_heads=num_heads, num_kv_heads=num_kv_heads)
        self.init_projection(generator)  # Performer's random matrix, the ``projection`` buffer

    # ---- pieces ---------------------------------------------------------------------------------
    def _features(self, x: Tensor, is_query: bool, scale: float, mask: Mask) -> tuple[Tensor, Tensor]:
        """Shifted positive features and their log-scales: ``phi(x) = f * exp(c)`` (``1 / sqrt(m)`` in ``c``)."""
        f = softmax_kernel_features(x, self.projection, scale)
        c = softmax_kernel_log_scale(x, self.projection, scale) - 0.5 * math.log(self.options.num_features)
        return f, c

    def _low_rank(self, fq: Tensor, cq: Tensor, fk: Tensor, ck: Tensor, v: Tensor, keep: Tensor, s: int) -> tuple[Tensor, Tensor]:
        """Partial ``(out, lse)`` of the low-rank estimate over keys ``j <= i - s`` (queries bottom-right)."""
        lq, lk = fq.shape[2], fk.shape[2]
        keep_s = _shift(keep, s, dim=1, fill=False)
        mask = Mask(lq, lk, causal=True, key_padding=~keep_s)
        num, den, m = linear_attention(
            fq, _shift(fk, s), _shift(v, s), mask, normalize=True, partial=True,
            key_log_scale=_shift(ck, s), chunk=self.options.chunk,
        )
        alive = den > 0
        safe = torch.where(alive, den, torch.ones_like(den))
        lse = torch.where(alive, torch.log(safe) + m + cq, torch.full_like(den, float("-inf")))
        return num / safe.unsqueeze(-1), lse

    # ---- the efficient path ---------------------------------------------------------------------
    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, dropout_p: float = 0.0) -> Tensor:
        mask.require_only("key_padding", "causal", op="scatterbrain")
        o = self.options
        lq, lk = q.shape[2], k.shape[2]
        if lq > lk:
            raise ValueError(f"scatterbrain needs Lq <= Lk (queries at the last Lq key positions), got {lq} > {lk}")
        keep = torch.ones(k.shape[0], lk, dtype=torch.bool, device=k.device)
        if mask.key_padding is not None:
            keep = ~mask.key_padding
        fq, cq = self._features(q, True, scale, mask)
        fk, ck = self._features(k, False, scale, mask)
        parts = []
        if o.window >= 0:
            pattern = Pattern(o.block, (Window(o.window),))
            parts.append(block_sparse_attention(q, k, v, mask, scale, pattern, return_lse=True))
        s = o.window + 1
        parts.append(self._low_rank(fq, cq, fk, ck, v, keep, s))  # keys j <= i - window - 1
        if not mask.causal:  # keys j >= i + window + 1: the same on the reversed sequence
            if s == 0:  # no window: the prefix part already holds every key up to i
                s = 1
            flip = lambda x: x.flip(2)[:, :, :lq]
            out_r, lse_r = self._low_rank(
                fq.flip(2), cq.flip(2), flip(fk), flip(ck), flip(v), keep.flip(1)[:, :lq], s
            )
            parts.append((out_r.flip(2), lse_r.flip(2)))
        out, _ = merge_partials(parts)
        return out

    # ---- the formula ----------------------------------------------------------------------------
    @staticmethod
    def _allowed(mask: Mask, device: torch.device) -> Tensor:
        """Bool ``(B|1, 1, Lq, Lk)``: causality and padding."""
        out = mask.allowed(device)
        return torch.ones(1, 1, mask.lq, mask.lk, dtype=torch.bool, device=device) if out is None else out

    def _implied(self, q: Tensor, k: Tensor, mask: Mask, scale: float) -> tuple[Tensor, Tensor]:
        """The paper's unnormalised matrix ``A = e^s on S - phi.phi on S + phi.phi`` and its row sums
        ``Z`` with the remainder clamped, both in units of ``exp(row max of the window scores)``."""
        lq, lk = q.shape[2], k.shape[2]
        allowed = self._allowed(mask, q.device)
        qpos = torch.arange(lq, device=q.device)[:, None] + mask.q_start
        kpos = torch.arange(lk, device=q.device)[None, :]
        support = ((qpos - kpos).abs() <= self.options.window) & allowed
        scores = scale * q @ k.transpose(-1, -2)
        shift = scores.masked_fill(~support, float("-inf")).amax(-1, keepdim=True).detach()
        shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
        exact = torch.exp(scores - shift).masked_fill(~support, 0.0)
        phi = softmax_kernel_estimate(q, k, self.projection, scale) * torch.exp(-shift)  # phi(q) . phi(k)
        phi_all = phi.masked_fill(~allowed, 0.0)
        phi_s = phi.masked_fill(~support, 0.0)
        a = exact - phi_s + phi_all
        remainder = phi_all.sum(-1) - phi_s.sum(-1)
        z = exact.sum(-1) + torch.maximum(remainder, CLAMP * torch.exp(-shift[..., 0]))
        return a, z

    def weights(self, q: Tensor, k: Tensor, mask: Mask, scale: float) -> Tensor:
        """The implied attention matrix ``A / Z`` (rows sum to 1 up to the clamp)."""
        a, z = self._implied(q, k, mask, scale)
        return a / z.unsqueeze(-1)

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
        return self.weights(q, k, mask, scale) @ v

    def sparse_correction(self, q: Tensor, k: Tensor, mask: Mask, scale: float) -> Tensor:
        """``(e^s - phi . phi)`` on the support, 0 elsewhere (unnormalised, for analysis: it has negative
        entries wherever the estimate exceeds the exact value)."""
        phi = softmax_kernel_estimate(q, k, self.projection, scale)
        allowed = self._allowed(mask, q.device)
        qpos = torch.arange(q.shape[2], device=q.device)[:, None] + mask.q_start
        support = ((qpos - torch.arange(k.shape[2], device=q.device)[None, :]).abs() <= self.options.window) & allowed
        return (torch.exp(scale * q @ k.transpose(-1, -2)) - phi).masked_fill(~support, 0.0)
