"""Interlaced sparse self-attention (Huang et al., 2019, arXiv:1907.12273).

The dense affinity is factorised into two sparse ones applied one after the other. With group size
``P`` on the ``(n / P, P)`` view:

1. **long-range**: positions at the same offset of every block (``i = j mod P``, an interlaced group)
   attend to each other -- a column of the view;
2. **short-range**: positions of the same block attend to each other -- a row of the view.

**The layer** (``MultiheadAttention(d, h, "interlaced")``, :class:`InterlacedLayer`) is the paper's: two
self-attention modules, each with its own query/key/value and output projections, the second run on the
first one's output::

    Z = A_long(X W_q1, X W_k1) (X W_v1) W_o1,     O = A_short(Z W_q2, Z W_k2) (Z W_v2) W_o2.

(The self-attention block of the authors' code, from OCNet/openseg, shares one transform for queries
and keys, ``f_query = f_key``; here each module has separate ``W_q``, ``W_k`` as in the paper's equations.)
In cross-attention (the paper has none) the long-range step takes its queries from ``x`` and its keys and
values from the context, and the short-range step is self-attention over its output.

**The operator** (``fastattn.attention(q, k, v, method="interlaced")``) has one ``q, k, v`` for both steps:
``stage="both"`` (default) is the two-hop form ``A_short(Q, K) (A_long(K, K) V)``, where the long-range
step of key position ``j`` uses ``k_j`` as its query (so that it is defined for any query length, and
decodes); ``stage="long"`` / ``"short"`` is one step alone, ``A_long(Q, K) V`` / ``A_short(Q, K) V`` (what
each module of the layer runs).

Causal form (the paper has none; it segments images): both steps keep ``j <= i``, and by default
(``causal_form="previous_block"``) the short-range step of block ``b`` also sees every position of block
``b - 1`` (whose long-range outputs summarise their interlaced groups up to block ``b - 1``), so every
earlier position is reached in the two hops, as in the non-causal form. ``causal_form="masked"`` (the
form before) only masks the two steps: an earlier block's positions to the right of the current offset
are then never reached, at any depth. O(n (P + n / P) d).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fastattn.core.layer import LayerConfig, LayerMechanism, ProjectedAttention
from fastattn.core.masks import Mask
from fastattn.core.state import KVCache, StackedState
from fastattn.registry import register
from .base import PatternMechanism, check_positive
from fastattn.ops.sparse.decode import ExtendedCache, one_token_unpadded, range_attention
from fastattn.ops.sparse.engine import block_sparse_attention
from fastattn.ops.sparse.reference import pattern_reference
from fastattn.ops.sparse.patterns import Pattern, PrevBlock, SameBlock, Strided

__all__ = ["InterlacedAttention", "InterlacedLayer"]

STAGES = ("both", "long", "short")


class InterlacedLayer(LayerMechanism):
    """The paper's layer: a long-range self-attention module (``long``) and a short-range one
    (``short``) on its output, each a :class:`~fastattn.core.layer.ProjectedAttention` with its own
    projections and the operator's ``stage="long"`` / ``"short"`` as its core."""

    def __init__(self, options: Any, config: LayerConfig, *, generator: torch.Generator | None = None) -> None:
        super().__init__(options, config, generator=generator)
        o = self.options
        given = dict(o.core_options)
        if given.get("stage", "both") != "both":
            raise ValueError(
                "the interlaced layer runs both steps, each with its own projections; stage is an option of "
                "the operator (fastattn.attention)"
            )

        def stage(name: str, cfg: LayerConfig) -> ProjectedAttention:
            return ProjectedAttention(
                ProjectedAttention.Options(core=o.core, core_options={**given, "stage": name}), cfg
            )

        self.long = stage("long", config)
        # the short-range module reads the long-range one's output (embed_dim wide) on every side
        self.short = stage("short", dataclasses.replace(config, kdim=None, vdim=None))

    def _stages(self, run, x, context, value, key_padding_mask, attn_mask, is_causal) -> Tensor:
        z = run(self.long, x, context, value, key_padding_mask, attn_mask, is_causal)
        # self-attention: the padded positions' long-range outputs are keys of the second step -> masked
        return run(self.short, z, None, None, key_padding_mask if context is None else None, None, is_causal)

    def forward(
        self, x: Tensor, context: Tensor | None = None, value: Tensor | None = None, *,
        key_padding_mask: Tensor | None = None, attn_mask: Tensor | None = None, is_causal: bool = False,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        def run(m, a, c, v, kpm, am, causal):
            return m(a, c, v, key_padding_mask=kpm, attn_mask=am, is_causal=causal)[0]

        out = self._stages(run, x, context, value, key_padding_mask, attn_mask, is_causal)
        self.aux_loss = self.long.aux_loss + self.short.aux_loss
        return out, None  # two hops: no single attention matrix

    def reference(
        self, x: Tensor, context: Tensor | None = None, value: Tensor | None = None, *,
        key_padding_mask: Tensor | None = None, attn_mask: Tensor | None = None, is_causal: bool = False,
    ) -> Tensor:
        """``Z = A_long(X W_q1, X W_k1) (X W_v1) W_o1``, ``O = A_short(Z W_q2, Z W_k2) (Z W_v2) W_o2``, each
        step by the dense masked softmax of its pattern."""
        def run(m, a, c, v, kpm, am, causal):
            return m.reference(a, c, v, key_padding_mask=kpm, attn_mask=am, is_causal=causal)

        return self._stages(run, x, context, value, key_padding_mask, attn_mask, is_causal)

    def step(self, x: Tensor, state: Any, *, key_padding_mask: Tensor | None = None) -> tuple[Tensor, Any]:
        s_long, s_short = (None, None) if state is None else state.states
        z, s_long = self.long.step(x, s_long, key_padding_mask=key_padding_mask)
        out, s_short = self.short.step(z, s_short, key_padding_mask=key_padding_mask)
        return out, StackedState([s_long, s_short])


@register("interlaced", complexity="O(n (P + n / P) d)", causal=True, decoding=True, padding=True, time_growth=2.0, memory_growth=2.0)
class InterlacedAttention(PatternMechanism):
    """Long-range attention inside interlaced groups, then short-range attention inside blocks."""

    test_options = {"group": 8}
    layer_form = InterlacedLayer
    deviations = (
        (
            "The operator (fastattn.attention, stage='both') has one q, k, v for both steps: the long-range "
            "step uses the keys as its queries. The layer (MultiheadAttention) is the paper's: two modules, "
            "each with its own projections."
        ),
        (
            "The causal form is this library's (the paper is non-causal): the short-range step also sees the "
            "whole previous block, so every earlier position is reached."
        ),
        (
            "Each module of the layer has its own query and key projections, as in the paper's self-attention; "
            "the authors' code (the OCNet/openseg self-attention block) shares one transform, f_query = f_key."
        ),
    )

    @dataclass(frozen=True)
    class Options:
        group: int = 128  # P: block length; the interlaced groups have n / P members
        causal_form: str = "previous_block"  # causal short-range step: previous_block | masked
        stage: str = "both"  # both (two hops over one q, k, v) | long | short (one step alone)

        def __post_init__(self) -> None:
            check_positive(group=self.group)
            if self.causal_form not in ("previous_block", "masked"):
                raise ValueError(f"causal_form must be 'previous_block' or 'masked', got {self.causal_form!r}")
            if self.stage not in STAGES:
                raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")

    def long_pattern(self) -> Pattern:
        return Pattern(self.options.group, column=Strided(self.options.group))

    def short_pattern(self, causal: bool = False) -> Pattern:
        p = self.options.group
        if causal and self.options.causal_form == "previous_block":
            return Pattern(p, (SameBlock(p), PrevBlock(p)))
        return Pattern(p, (SameBlock(p),))

    def _steps(self, fn, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
        stage = self.options.stage
        if stage == "long":
            return fn(q, k, v, mask, scale, self.long_pattern())
        if stage == "short":
            return fn(q, k, v, mask, scale, self.short_pattern(mask.causal))
        self_mask = Mask(mask.lk, mask.lk, key_padding=mask.key_padding, causal=mask.causal)
        v_long = fn(k, k, v, self_mask, scale, self.long_pattern())
        return fn(q, k, v_long, mask, scale, self.short_pattern(mask.causal))

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, dropout_p: float = 0.0) -> Tensor:
        return self._steps(block_sparse_attention, q, k, v, mask, scale)

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
        return self._steps(pattern_reference, q, k, v, mask, scale)

    def pattern(self, lq: int, lk: int, device: torch.device) -> Pattern:
        """The step's pattern (non-causal); for ``stage="both"`` one hop of each step (their product
        reaches every position)."""
        if self.options.stage == "long":
            return self.long_pattern()
        if self.options.stage == "short":
            return self.short_pattern()
        return self.long_pattern() + self.short_pattern()

    def decode_patterns(self, heads: int) -> list[tuple[int, int, Pattern]] | None:
        if self.options.stage == "both":
            return None  # two hops: :meth:`step`
        return [(0, heads, self.long_pattern() if self.options.stage == "long" else self.short_pattern(True))]

    def step(
        self, q: Tensor, k: Tensor, v: Tensor, state: Any, scale: float, key_padding_mask: Tensor | None = None
    ) -> tuple[Tensor, Any]:
        """``stage="both"``, one unpadded token: the new key's long-range output (its column), kept in
        the state's table, then the short-range hop over the table; else the general step (a plain
        cache; the table is rebuilt, by one long-range call, at the next one-token step)."""
        old = one_token_unpadded(q, state, key_padding_mask) if self.options.stage == "both" else None
        if old is None:
            cache = state.cache if isinstance(state, ExtendedCache) else state
            return super().step(q, k, v, cache, scale, key_padding_mask)
        p, i = self.options.group, old.length
        cache = old.append(k, v)
        table = state.tables[0] if isinstance(state, ExtendedCache) else KVCache(k[:, :, :0, :0], v[:, :, :0])
        (qc, kc) = self.upcast(q, cache.k)
        if table.length < i:  # long-range outputs of the keys cached before (after a general step)
            lo = table.length
            done = block_sparse_attention(kc[:, :, lo:i], kc[:, :, :i], cache.v[:, :, :i].to(kc.dtype),
                                          Mask(i - lo, i, causal=True), scale, self.long_pattern())
            table = table.append(k.new_zeros(*done.shape[:3], 0), done.to(v.dtype))
        long_i = range_attention(kc[:, :, i:], kc, cache.v, [range(i % p, i + 1, p)], scale, per=1)
        table = table.append(k[..., :0], long_i.to(v.dtype))
        ranges = self.short_pattern(True).key_ranges(i)
        out = range_attention(qc, kc, table.v, ranges, scale)  # type: ignore[arg-type]
        return out.to(q.dtype), ExtendedCache(cache, [table])
