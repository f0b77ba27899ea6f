"""What every pattern mechanism shares: forward through the engine, reference through the dense
pattern, and decoding with a cache pruned to the keys a future query may still see."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from fastattn.core.base import Mechanism, repeat_kv
from fastattn.core.masks import Mask
from fastattn.ops.sparse.engine import block_sparse_attention
from fastattn.ops.sparse.nodes import Nodes
from fastattn.ops.sparse.plan import Plan, cached_plan, eager
from fastattn.ops.sparse.reference import dense_pattern_attention, pattern_reference
from fastattn.ops.sparse.patterns import Pattern

__all__ = ["PatternMechanism", "PrunedCache", "check_positive"]

def check_positive(**values: int) -> None:
    for name, x in values.items():
        if not isinstance(x, int) or isinstance(x, bool) or x < 1:
            raise ValueError(f"{name} must be a positive integer, got {x!r}")

@dataclass
class PrunedCache:
    """Decoding state: the cached keys/values ``(B, Hkv, C, E)``, their absolute positions ``(C,)`` and
    the position of the next token. Keys no future query can see are dropped after each step, so the
    cache is bounded for windowed patterns."""

    k: Tensor
    v: Tensor
    pos: Tensor
    next_pos: int

    @property
    def length(self) -> int:
        return self.next_pos

class PatternMechanism(Mechanism):
    """A mechanism defined by a :class:`Pattern` (and optional extra :class:`Nodes`).

    Subclasses implement :meth:`pattern`; those with extra nodes implement :meth:`nodes`. Setting
    ``pruned_cache = True`` makes :meth:`step` keep only the keys the pattern still needs.
    """

    pruned_cache: ClassVar[bool] = False

    def pattern(self, lq: int, lk: int, device: torch.device) -> Pattern:
        raise NotImplementedError

    def nodes(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask) -> Nodes | None:
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
        return block_sparse_attention(q, k, v, mask, scale, pat, self.nodes(q, k, v, mask), plan=plan)

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
        pat = self.pattern(mask.lq, mask.lk, q.device)
        return pattern_reference(q, k, v, mask, scale, pat, self.nodes(q, k, v, mask))

    def dense_mask(self, lq: int, lk: int, causal: bool = False, device: torch.device | str = "cpu") -> Tensor:
        """The pattern as a bool ``(Lq, Lk)`` matrix, True = may attend (for inspection and for
        baselines that take a dense mask). Extra nodes are not included."""
        pat = self.pattern(lq, lk, torch.device(device))
        qpos = torch.arange(lk - lq, lk, device=device)[:, None]
        kpos = torch.arange(lk, device=device)[None, :]
        out = pat.dense(qpos, kpos)
        return out & (kpos <= qpos) if causal else out

    def step(self, q: Tensor, k: Tensor, v: Tensor, state: Any, scale: float) -> tuple[Tensor, Any]:
        if not self.pruned_cache:
            return super().step(q, k, v, state, scale)
        t = q.shape[2]
        start = 0 if state is None else state.next_pos
        pos = torch.arange(start, start + t, device=q.device)
        if state is not None:
            k, v = torch.cat([state.k, k], 2), torch.cat([state.v, v], 2)
            pos = torch.cat([state.pos, pos])
        groups = q.shape[1] // k.shape[1]

        pat = self.pattern(t, start + t, q.device)
        out = dense_pattern_attention(
            q, repeat_kv(k, groups), repeat_kv(v, groups), pos[-t:], pos, scale, pat, causal=True
        )
        keep = pat.needed(pos, start + t)
        return out, PrunedCache(k[:, :, keep], v[:, :, keep], pos[keep], start + t)
