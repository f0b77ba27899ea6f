"""Multi-scale Transformer language models (Subramanian et al., 2020, arXiv:2005.00581):
retina-like attention over several scales.

Near tokens are seen individually, farther ones only through coarse (mean-pooled) summaries, and the
farther the coarser. With fine block ``s``, radius ``r`` and pooling factor ``f``, level ``l`` summarises
``p_l = s * f ** (l - 1)`` positions (``l = 1 .. levels``). Query ``i`` sees

* every token in the fine blocks ``|j // s - i // s| <= r``;
* the level-``l`` summaries (mean of the keys and of the values over their span, padding excluded) of
  the spans ``u`` with ``|u - i // p_l| > r`` that lie within ``r`` spans of ``i`` at level ``l + 1``
  (all remaining spans at the top level).

Every position is counted exactly once, at the finest scale that reaches it, all in one softmax.
Causal: only past tokens, and only spans that end at or before ``i``. The summaries are extra nodes of
the engine, scored densely: O(n (r s + n / s) d).

Decoding keeps the span means of every complete span of each level in the state (one table per level,
a span pooled once, when its last position arrives); a one-token step gathers its fine blocks from the
cache and its spans from the tables: O(r s + f r + n / s_L) keys per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fastattn.core.masks import Mask
from fastattn.core.state import KVCache
from fastattn.registry import register
from .base import PatternMechanism, check_positive
from fastattn.ops.compress import span_means
from fastattn.ops.sparse.decode import ExtendedCache, one_token_unpadded, sources_attention
from fastattn.ops.sparse.nodes import Nodes
from fastattn.ops.sparse.patterns import BlockWindow, Pattern


def retina_nodes(k: Tensor, v: Tensor, mask: Mask, block: int, radius: int, factor: int, levels: int) -> Nodes:
    """The coarse spans of the retina: level ``l`` (``1 .. levels``) means over ``block * factor ** (l - 1)``
    positions, each visible to the queries for which it is the finest scale reaching it (see the module
    docstring); the fine part is ``BlockWindow(radius)`` on blocks of ``block``."""
    dt = k.dtype
    keep = torch.ones(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device)
    if mask.key_padding is not None:
        keep = ~mask.key_padding
    ks, vs, alive, lvl, span = [], [], [], [], []
    for level in range(1, levels + 1):
        p = block * factor ** (level - 1)
        km, ok = span_means(k.to(dt), keep, p)
        vm, _ = span_means(v.to(dt), keep, p)
        ks.append(km), vs.append(vm), alive.append(ok)
        lvl.append(torch.full((km.shape[2],), level, device=k.device))
        span.append(torch.arange(km.shape[2], device=k.device))
    lvl_t, span_t, alive_t = torch.cat(lvl), torch.cat(span), torch.cat(alive, 1)  # (m,), (m,), (B, m)
    size = block * factor ** (lvl_t - 1)
    causal = mask.causal

    def allow(qpos: Tensor) -> Tensor:
        qs = torch.div(qpos, size, rounding_mode="floor")  # i's span at each node's level
        ok = (span_t - qs).abs() > radius
        parent = torch.div(qpos, size * factor, rounding_mode="floor")
        ok &= (lvl_t == levels) | ((torch.div(span_t, factor, rounding_mode="floor") - parent).abs() <= radius)
        if causal:
            ok &= (span_t + 1) * size - 1 <= qpos
        lead = alive_t.shape[:1] + (1,) + (1,) * (qpos.dim() - 1)
        return ok[None, None] & alive_t.view(*lead, -1)

    return Nodes(torch.cat(ks, 2), torch.cat(vs, 2), allow)


@register("multiscale", complexity="O(n (r s + n / s) d)", causal=True, decoding=True, padding=True, time_growth=2.0, memory_growth=2.0)
class MultiscaleAttention(PatternMechanism):
    """Fine tokens nearby, mean-pooled spans farther away, coarser with distance."""

    test_options = {"block": 4, "radius": 1, "factor": 2, "levels": 2}

    @dataclass(frozen=True)
    class Options:
        block: int = 32  # s: fine block (and level-1 span)
        radius: int = 2  # r: spans on each side kept at each scale
        factor: int = 4  # f: span growth per level
        levels: int = 2  # number of coarse levels

        def __post_init__(self) -> None:
            check_positive(block=self.block, radius=self.radius, factor=self.factor, levels=self.levels)

    def pattern(self, lq: int, lk: int, device: torch.device) -> Pattern:
        return Pattern(self.options.block, (BlockWindow(self.options.radius),))

    def nodes(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float | None = None) -> Nodes | None:
        o = self.options
        return retina_nodes(k, v, mask, o.block, o.radius, o.factor, o.levels)

    def step(
        self, q: Tensor, k: Tensor, v: Tensor, state: Any, scale: float, key_padding_mask: Tensor | None = None
    ) -> tuple[Tensor, Any]:
        """One unpadded token: the fine blocks from the cache and the retina's spans from the state's
        per-level tables of span means (filled as spans complete); else the general step (which returns
        a plain cache; the tables are rebuilt at the next one-token step)."""
        old = one_token_unpadded(q, state, key_padding_mask)
        if old is None:
            cache = state.cache if isinstance(state, ExtendedCache) else state
            return super().step(q, k, v, cache, scale, key_padding_mask)
        o = self.options
        cache = old.append(k, v)
        i = cache.length - 1
        tables = list(state.tables) if isinstance(state, ExtendedCache) else []
        sources = [(cache.k, cache.v, [range(max(0, (i // o.block - o.radius) * o.block), i + 1)])]
        for level in range(1, o.levels + 1):
            p = o.block * o.factor ** (level - 1)
            table = tables[level - 1] if len(tables) >= level else KVCache(cache.k[:, :, :0], cache.v[:, :, :0])
            done = (i + 1) // p  # complete spans
            if table.length < done:  # pool the spans completed since the last step
                lo, hi = table.length * p, done * p
                table = table.append(span_means(cache.k[:, :, lo:hi], None, p)[0],  # type: ignore[arg-type]
                                     span_means(cache.v[:, :, lo:hi], None, p)[0])  # type: ignore[arg-type]
            tables[level - 1:level] = [table]
            first = 0 if level == o.levels else max(0, (i // (p * o.factor) - o.radius) * o.factor)
            sources.append((table.k, table.v, [range(first, min(done, i // p - o.radius))]))
        (qc,) = self.upcast(q)
        return sources_attention(qc, sources, scale).to(q.dtype), ExtendedCache(cache, tables)
