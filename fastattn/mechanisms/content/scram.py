"""SCRAM, "Spatially Coherent Randomized Attention Maps" (Calian, Roelants, Cali, Carr, Dubba, Reid and
Zhang, 2019, arXiv:1905.10308), on sequences.

Each query first finds (approximately) its best key, ``j*(i) ~ argmax_j q_i . k_j``, by PatchMatch, then
attends with ordinary softmax scores to the ``window`` keys around it, ``[j* - window/2, j* + window/2)``
(the paper's sparse approximation of the non-local mean around the mode). PatchMatch, vectorised over the
queries (every iteration updates all of them from the previous iteration's matches):

* initialisation: one random key per query;
* ``iterations`` rounds, each scoring the candidates current match ``j*(i)``, propagation from the left
  neighbour ``j*(i-1) + 1`` (and, non-causally, from the right ``j*(i+1) - 1``), random search around the
  match at radii ``m / 2, m / 4, ..., 1/2`` (``m`` the query's number of visible keys) and ``samples`` uniform random keys; the best-scoring one wins
  (ties keep the current match, so scores never decrease). Cost ``O(n (log n + s) d)`` per round.

The random numbers are a fixed hash of ``(noise_seed, query position, head, slot)`` (``noise_seed`` a
buffer drawn from ``generator`` at construction, saved in the ``state_dict``), so the search is
reproducible and the same for every batch row. The search is not differentiable (``argmax``); gradients
flow through the window softmax only.

Causal form: candidates and window within ``j <= i`` and propagation from the left only, so the future
never changes the past. Padding keys are never candidates nor in the window; rows with no visible key
return zeros. Decoding (:meth:`Scram.step`): the propagation couples a query's match to the previous
``iterations`` queries' matches, so the state caches queries beside keys and values, and each step reruns
the search over the last ``iterations`` real queries and the new ones (the earlier queries' chains are
complete after ``iterations`` rounds, so the new queries' matches equal the full forward's). Cost ``O(r n (log n + s) d + n w d)`` time, ``O(n w)``
memory (the window attention gathers keys per query group, :func:`~fastattn.ops.gather.index_attention`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from typing import Any

from fastattn.core.base import Mechanism
from fastattn.core.masks import Mask
from fastattn.core.state import DecodingState, KVCache
from fastattn.ops.gather import index_attention, index_mask
from fastattn.ops.softmax.dense import dense_attention
from fastattn.registry import register

class ScramState(DecodingState):
    """SCRAM's decoding state: the keys and values ``(B, Hkv, L, .)``, the queries ``(B, H, L, E)`` and the
    padding ``(B, L)`` (``None`` when no token was padding) seen so far."""

    batched = ("k", "v", "q", "key_padding")

    def __init__(self, k: Tensor, v: Tensor, q: Tensor, key_padding: Tensor | None) -> None:
        self.k, self.v, self.q, self.key_padding = k, v, q, key_padding

    @property
    def length(self) -> int:  # type: ignore[override]
        return self.k.shape[2]


_M = 2147483647  # 2^31 - 1: the hash works modulo this prime (products stay inside int64)
_RADII = 48  # hash slots reserved per round for the random search (radii down to span / 2^48)


def _uniform(seed: int, pos: Tensor, heads: int, slot: int) -> Tensor:
    """Hashed uniforms in ``[0, 1)``, ``(H, L)``: a fixed function of ``(seed, position, head, slot)``."""
    h = torch.arange(heads, device=pos.device)[:, None]
    x = (pos[None, :] * 1000003 + h * 7919 + slot * 104729 + seed) % _M
    for _ in range(3):  # multiplicative steps with xor-shifts between them (nonlinear modulo _M)
        x = (x * 48271) % _M
        x = x ^ (x >> 11)
    return (x % _M).double() / _M


@register(
    "scram", complexity="O(r n (log n + s) d + n w d)", causal=True, decoding=True, padding=True, randomized=True,
    time_growth=1.1, memory_growth=1.0,
)
class Scram(Mechanism):
    """Softmax over a window around each query's PatchMatch best key."""

    test_options = {"window": 8, "iterations": 3, "samples": 2}
    heads_independent = False  # the candidate hash mixes in the head index
    discontinuous = True  # the best key flips under rounding: half-precision checks compare per-row medians
    deviations = (
        "One-dimensional (sequence) PatchMatch; the paper's image form with 2-D neighbours and patches is "
        "not implemented. Window size, rounds and random samples are options (defaults not from the paper).",
        "Candidates come from a hash of the position, not a random stream: reproducible and batch-independent.",
    )

    @dataclass(frozen=True)
    class Options:
        window: int = 64  # keys attended around the best match
        iterations: int = 4  # PatchMatch rounds
        samples: int = 4  # uniform random candidates per round
        chunk: int = 1024  # queries scored at a time in the search (a memory knob)

        def __post_init__(self) -> None:
            if self.window < 1 or self.iterations < 0 or self.samples < 0 or self.chunk < 1:
                raise ValueError(
                    f"scram: window and chunk must be >= 1, iterations and samples >= 0, got {self.window}, "
                    f"{self.chunk}, {self.iterations}, {self.samples}"
                )

    def __init__(self, options=None, *, head_dim: int, num_heads: int, num_kv_heads: int | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(options, head_dim=head_dim, num_heads=num_heads, num_kv_heads=num_kv_heads)
        self.register_buffer("noise_seed", torch.randint(0, _M, (), generator=generator, dtype=torch.long))

    # ---- the search ---------------------------------------------------------------------------
    def _scores(self, q: Tensor, k: Tensor, real: Tensor, cand: Tensor, ok: Tensor) -> Tensor:
        """``q_i . k_c`` of the candidates ``cand (B, H, Lq, C)`` (``-inf`` where not ``ok`` or padding)."""
        B, H, lq, C = cand.shape
        out = []
        for q0 in range(0, lq, self.options.chunk):
            c = cand[:, :, q0:q0 + self.options.chunk].clamp(0, k.shape[2] - 1)
            flat = c.reshape(B, H, -1)
            kc = k.gather(2, flat[..., None].expand(*flat.shape, k.shape[3])).view(*c.shape, k.shape[3])
            s = torch.matmul(kc, q[:, :, q0:q0 + self.options.chunk, :, None])[..., 0]
            good = ok[:, :, q0:q0 + self.options.chunk] & real.expand(B, H, -1).gather(2, flat).view(c.shape)
            out.append(s.masked_fill(~good, float("-inf")))
        return torch.cat(out, 2)

    @torch.no_grad()
    def best_keys(self, q: Tensor, k: Tensor, mask: Mask) -> Tensor:
        """The PatchMatch best key ``j* (B, H, Lq)`` of every query (an index into the keys)."""
        mask.require_only("key_padding", "causal", op="scram attention")
        B, H, lq, _ = q.shape
        lk, seed, o = k.shape[2], int(self.noise_seed), self.options
        pos = torch.arange(lq, device=q.device) + mask.q_start  # absolute positions (bottom-right)
        hi = pos.clamp(max=lk - 1) if mask.causal else torch.full_like(pos, lk - 1)  # last visible key
        span = (hi + 1).clamp_min(1).double()
        keep = mask.key_keep(torch.float32)
        real = torch.ones(B, 1, lk, dtype=torch.bool, device=q.device) if keep is None else keep[..., 0] > 0

        def rnd(slot: int) -> Tensor:  # slots are numbered by (round, candidate), whatever the length
            return _uniform(seed, pos, H, slot).to(q.device)

        def within(c: Tensor) -> Tensor:
            return (c >= 0) & (c <= hi)

        best = (rnd(0) * span).long().clamp(max=lk - 1).expand(B, H, lq)
        best_s = self._scores(q, k, real, best[..., None], within(best)[..., None])[..., 0]
        levels = max(1, math.ceil(math.log2(max(int(span.max()), 2))))  # radii span/2, span/4, ... >= 1/2
        first = torch.arange(lq, device=q.device) > 0
        for it in range(o.iterations):
            base = 1 + it * (_RADII + o.samples)
            cands = [best, torch.cat([best[..., :1], best[..., :-1] + 1], -1)]
            oks = [within(best), within(cands[1]) & first]
            if not mask.causal:
                cands.append(torch.cat([best[..., 1:] - 1, best[..., -1:]], -1))
                oks.append(within(cands[-1]) & (torch.arange(lq, device=q.device) < lq - 1))
            for t in range(min(levels, _RADII)):
                radius = span / 2 ** (t + 1)  # per query: its own visible range
                c = best + torch.round(radius * (2 * rnd(base + t) - 1)).long()
                cands.append(c.clamp(min=0).minimum(hi.expand_as(c)))
                oks.append(within(cands[-1]) & (radius >= 0.5))
            for j in range(o.samples):
                c = (rnd(base + _RADII + j) * span).long().clamp(max=lk - 1).expand(B, H, lq)
                cands.append(c)
                oks.append(within(c))
            cand = torch.stack(cands, -1)
            ok = torch.stack([x.expand(B, H, lq) for x in oks], -1)
            s = self._scores(q, k, real, cand, ok)
            s[..., 0] = best_s  # the current match keeps its score (ties keep it)
            best_s, at = s.max(-1)
            best = cand.gather(-1, at[..., None])[..., 0]
        return best

    def window(self, q: Tensor, k: Tensor, mask: Mask) -> tuple[Tensor, Tensor]:
        """Every query's keys ``idx (B, H, Lq, w)`` around its best match and which of them it sees."""
        best = self.best_keys(q, k, mask)
        w, lk = self.options.window, k.shape[2]
        idx = best[..., None] - w // 2 + torch.arange(w, device=q.device)
        valid = (idx >= 0) & (idx < lk)
        pos = torch.arange(q.shape[2], device=q.device) + mask.q_start
        if mask.causal:
            valid = valid & (idx <= pos[:, None])
        keep = mask.key_keep(torch.float32)
        if keep is not None:
            real = (keep[..., 0] > 0).expand(q.shape[0], q.shape[1], lk)
            valid = valid & real.gather(2, idx.clamp(0, lk - 1).flatten(2)).view(idx.shape)
        return idx.clamp(0, lk - 1), valid

    # ---- attention --------------------------------------------------------------------------------
    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, dropout_p: float = 0.0) -> Tensor:
        idx, valid = self.window(q, k, mask)
        return index_attention(q, k, v, idx, valid, scale)

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
        """Dense softmax under the mask of the windows (and the call's own masks)."""
        idx, valid = self.window(q, k, mask)
        allowed, _ = index_mask(idx, valid, k.shape[2])
        bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill(~allowed, float("-inf"))
        return dense_attention(q, k, v, mask, scale, extra_bias=bias)

    # ---- decoding ---------------------------------------------------------------------------------
    def step(self, q: Tensor, k: Tensor, v: Tensor, state: Any, scale: float,
             key_padding_mask: Tensor | None = None) -> tuple[Tensor, Any]:
        """Decoding with a :class:`ScramState` (keys, values and queries so far); rows with different padding run separately on their real tokens (positions count from
        each row's first real token, as if it were alone)."""
        empty = q.new_empty(*q.shape[:3], 0)
        if state is None:
            kv, qs = KVCache(k, v, key_padding_mask), KVCache(q, empty, key_padding_mask)
        else:
            kv = KVCache(state.k, state.v, state.key_padding).append(k, v, key_padding_mask)
            qs = KVCache(state.q, state.q[..., :0], state.key_padding).append(q, empty, key_padding_mask)
        t, keep = q.shape[2], self.options.iterations
        out = q.new_zeros(*q.shape[:3], v.shape[3])
        pad = kv.key_padding
        patterns, which = (torch.zeros(1, kv.length, dtype=torch.bool, device=q.device),
                           torch.zeros(q.shape[0], dtype=torch.long, device=q.device)) if pad is None else \
            torch.unique(pad, dim=0, return_inverse=True)
        for g in range(patterns.shape[0]):
            rows = (which == g).nonzero().flatten()
            real = ~patterns[g]
            fresh = int(real[-t:].sum())
            if fresh == 0:
                continue
            pos = real.nonzero().flatten()  # the row's real tokens; the search reruns over the last ones
            tail = pos[-(fresh + keep):]
            o = self.run(qs.k.index_select(0, rows)[:, :, tail], kv.k.index_select(0, rows)[:, :, pos],
                         kv.v.index_select(0, rows)[:, :, pos], is_causal=True, scale=scale)
            part = o.new_zeros(rows.shape[0], q.shape[1], t, o.shape[3])
            part[:, :, real[-t:]] = o[:, :, -fresh:]
            out = out.index_copy(0, rows, part)
        return out, ScramState(kv.k, kv.v, qs.k, kv.key_padding)
