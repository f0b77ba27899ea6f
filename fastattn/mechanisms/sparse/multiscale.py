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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fastattn.core.masks import Mask
from fastattn.registry import register
from .base import PatternMechanism, check_positive
from fastattn.ops.compress import span_means
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
