"""What every pattern mechanism shares: forward through the engine, reference through the dense
pattern, and decoding with a cache pruned to the keys a future query may still see."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from fastattn.core.base import Mechanism, repeat_kv
from fastattn.core.masks import Mask
from fastattn.core.state import DecodingState, KVCache
from fastattn.ops.softmax.dense import dense_attention
from fastattn.ops.sparse.decode import left_padding, range_attention
from fastattn.ops.sparse.engine import block_sparse_attention
from fastattn.ops.sparse.nodes import Nodes
from fastattn.ops.sparse.plan import Plan, cached_plan, eager
from fastattn.ops.sparse.reference import pattern_reference
from fastattn.ops.sparse.patterns import Pattern

__all__ = ["PatternMechanism", "PrunedCache", "check_positive"]

def check_positive(**values: int) -> None:
    for name, x in values.items():
        if not isinstance(x, int) or isinstance(x, bool) or x < 1:
            raise ValueError(f"{name} must be a positive integer, got {x!r}")

@dataclass
class PrunedCache(DecodingState):
    """Decoding state of windowed patterns: the cached keys/values ``(B, Hkv, C, E)``, each row's own
    position of every cached key ``pos`` ``(B, C)`` (a row's positions count its real tokens only, so a
    left-padded row sees the positions it would see alone), which cached keys are padding
    (``key_padding`` ``(B, C)`` or ``None``), each row's next position ``next_pos`` ``(B,)`` and the
    positions seen, padding included (``length``). Keys no future query of any row can see are dropped
    after each step, so the cache is bounded for windowed patterns."""

    k: Tensor
    v: Tensor
    pos: Tensor
    key_padding: Tensor | None
    next_pos: Tensor
    length: int

    batched = ("k", "v", "pos", "key_padding", "next_pos")


class PatternMechanism(Mechanism):
    """A mechanism defined by a :class:`Pattern` (and optional extra :class:`Nodes`).

    Subclasses implement :meth:`pattern`; those with extra nodes implement :meth:`nodes`. Setting
    ``pruned_cache = True`` makes :meth:`step` keep only the keys the pattern still needs.
    """

    pruned_cache: ClassVar[bool] = False
    positional = True  # patterns and their nodes are laid out on absolute positions
    # True when the output is the pattern's attention and nothing else (no extra nodes, no chained
    # steps), so that where the pattern is a sliding window (:meth:`Pattern.reach`) a stretch of the
    # sequence plus ``reach`` keys on each side computes that stretch's output (halo exchange in
    # :mod:`fastattn.distributed`).
    windowed: ClassVar[bool] = False
    # the forward runs on the block-sparse engine, which has compiled CPU kernels (backend="cpp")
    compiled_block_sparse: ClassVar[bool] = True

    def pattern(self, lq: int, lk: int, device: torch.device) -> Pattern:
        raise NotImplementedError

    def window_reach(self, length: int) -> int | None:
        """The window's reach ``w`` where this mechanism declares itself ``windowed`` and its pattern on
        ``length`` tokens is a sliding window (query ``i`` sees only keys with ``|i - j| <= w``, by a rule
        of ``i - j`` alone); else None."""
        return self.pattern(length, length, torch.device("cpu")).reach() if self.windowed else None

    def nodes(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float | None = None) -> Nodes | None:
        """Extra key/value nodes; ``scale`` is the call's score scale (None: ``E ** -0.5``), which any
        attention the nodes themselves compute must use."""
        return None

    @eager
    def pattern_and_plan(self, mask: Mask, device: torch.device) -> tuple[Pattern, Plan]:
        """The pattern of this call and the engine's plan for it, from the process-wide plan cache
        (keyed on the pattern's value -- options, lengths, tables such as random blocks -- so a new
        module with the same options, as ``fastattn.attention`` builds per call, reuses the plan).
        Built eagerly: ``torch.compile`` does not trace this data-dependent index work."""
        pat = self.pattern(mask.lq, mask.lk, device)
        return pat, cached_plan(pat, mask.lq, mask.lk, mask.causal, device)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, dropout_p: float = 0.0) -> Tensor:
        pat, plan = self.pattern_and_plan(mask, q.device)
        return block_sparse_attention(q, k, v, mask, scale, pat, self.nodes(q, k, v, mask, scale), plan=plan)

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
        pat = self.pattern(mask.lq, mask.lk, q.device)
        return pattern_reference(q, k, v, mask, scale, pat, self.nodes(q, k, v, mask, scale))

    def dense_mask(self, lq: int, lk: int, causal: bool = False, device: torch.device | str = "cpu") -> Tensor:
        """The pattern as a bool ``(Lq, Lk)`` matrix, True = may attend (for inspection and for
        baselines that take a dense mask). Extra nodes are not included."""
        pat = self.pattern(lq, lk, torch.device(device))
        qpos = torch.arange(lk - lq, lk, device=device)[:, None]
        kpos = torch.arange(lk, device=device)[None, :]
        out = pat.dense(qpos, kpos)
        return out & (kpos <= qpos) if causal else out

    def decode_allowed(self, qpos: Tensor, kpos: Tensor, lk: int) -> Tensor:
        """The pattern for decoding over a pruned cache: bool ``(B, H | 1, T, C)`` from each row's query
        positions ``(B, T, 1)`` and cached key positions ``(B, 1, C)`` (``lk``: the longest row's length).
        Default: one pattern for every head; causality and padding are applied by the caller."""
        return self.pattern(qpos.shape[1], lk, qpos.device).dense(qpos, kpos)[:, None]

    def decode_patterns(self, heads: int) -> list[tuple[int, int, Pattern]] | None:
        """Where the output is pattern attention and nothing else: ``(first, end, pattern)`` for each
        group of query heads ``first .. end - 1`` (together all ``heads``), so that a one-token step
        gathers the keys each group's pattern keeps (:func:`~fastattn.ops.sparse.decode.range_attention`)
        instead of planning a call over the whole cache. None (default): the general step."""
        return None

    def gathered_step(
        self, q: Tensor, k: Tensor, v: Tensor, state: Any, scale: float, key_padding_mask: Tensor | None
    ) -> tuple[Tensor, KVCache] | None:
        """The one-token step over a :class:`KVCache`, O(kept keys): the cache grows in place and each
        head group attends to the ranges of cache positions its pattern keeps for the new position. A
        row's cache index is its position plus its count of padding keys where those all precede its
        real ones (left padding; rows with different counts attend one by one). None where it does not
        apply (prefill, several tokens, a padding token now or after a real one, patterns that cannot
        list their keys)."""
        if q.shape[2] != 1 or not isinstance(state, KVCache):
            return None
        if key_padding_mask is not None and bool(key_padding_mask.any()):
            return None
        groups = self.decode_patterns(q.shape[1])
        lead = left_padding(state)
        if groups is None or lead is None:
            return None
        n = state.length
        per_lead = {}
        for m in set(lead):  # ranges of cache indices, one list per head group, for each padding count
            ranges = [pat.key_ranges(n - m) for _, _, pat in groups]
            if any(r is None for r in ranges):
                return None
            per_lead[m] = [[range(r.start + m, r.stop + m, r.step) for r in rs] for rs in ranges]  # type: ignore[union-attr]
        cache = state.append(k, v)
        (qc,), kc, vc = self.upcast(q), cache.k, cache.v  # gathered keys/values take qc's dtype
        per = q.shape[1] // k.shape[1]

        def attend(qr: Tensor, kr: Tensor, vr: Tensor, ranges: list[list[range]]) -> Tensor:
            if len(groups) == 1:
                return range_attention(qr, kr, vr, ranges[0], scale)
            return torch.cat([range_attention(qr[:, a:b], kr, vr, r, scale, a, per)
                              for (a, b, _), r in zip(groups, ranges)], 1)

        if len(per_lead) == 1:
            out = attend(qc, kc, vc, per_lead[lead[0]])
        else:
            out = torch.cat([attend(qc[r:r + 1], kc[r:r + 1], vc[r:r + 1], per_lead[m]) for r, m in enumerate(lead)])
        return out.to(q.dtype), cache

    def step(
        self, q: Tensor, k: Tensor, v: Tensor, state: Any, scale: float, key_padding_mask: Tensor | None = None
    ) -> tuple[Tensor, Any]:
        if not self.pruned_cache:
            fast = self.gathered_step(q, k, v, state, scale, key_padding_mask)
            return fast if fast is not None else super().step(q, k, v, state, scale, key_padding_mask)
        b, t = q.shape[0], q.shape[2]
        dtype = q.dtype
        real = torch.ones(b, t, dtype=torch.bool, device=q.device) if key_padding_mask is None else ~key_padding_mask
        start = torch.zeros(b, dtype=torch.long, device=q.device) if state is None else state.next_pos
        qpos = start[:, None] + real.long().cumsum(1) - 1  # (B, T): each row's own positions
        pad = None if key_padding_mask is None and (state is None or state.key_padding is None) else ~real
        pos, seen = qpos, t
        if state is not None:
            k, v = torch.cat([state.k, k], 2), torch.cat([state.v, v], 2)
            pos, seen = torch.cat([state.pos, qpos], 1), state.length + t
            if pad is not None:
                old = state.key_padding
                old = torch.zeros_like(state.pos, dtype=torch.bool) if old is None else old
                pad = torch.cat([old, ~real], 1)
        next_pos = start + real.long().sum(1)
        groups = q.shape[1] // k.shape[1]

        n = int(next_pos.max())
        rows = 1 if pad is None else b  # never any padding: every row has the same positions
        qp, kp = qpos[:rows], pos[:rows]
        allowed = self.decode_allowed(qp[:, :, None], kp[:, None, :], n) & (kp[:, None, :] <= qp[:, :, None])[:, None]
        if pad is not None:
            allowed = allowed & ~pad[:, None, None, :]
        qc, kc, vc = self.upcast(q, repeat_kv(k, groups), repeat_kv(v, groups))  # the cache keeps the input dtype
        bias = torch.zeros(allowed.shape, dtype=qc.dtype, device=q.device).masked_fill(~allowed, float("-inf"))
        out = dense_attention(qc, kc, vc, Mask(t, k.shape[2]), scale, extra_bias=bias)
        pat = self.pattern(t, n, q.device)
        keep = torch.zeros(pos.shape[1], dtype=torch.bool, device=q.device)
        for i in range(rows):  # a key stays while some row's future queries may see it
            row = pat.needed(pos[i], int(next_pos[i]))
            keep |= row if pad is None else row & ~pad[i]
        cache = PrunedCache(
            k[:, :, keep], v[:, :, keep], pos[:, keep], None if pad is None else pad[:, keep], next_pos, seen
        )
        return out.to(dtype), cache
