"""Longformer (Beltagy et al., 2020, arXiv:2004.05150): sliding window + dilation + global tokens.

Query ``i`` attends to ``j`` when ``|i - j| <= w * d`` and ``d`` divides ``i - j`` (``w`` keys on each side,
dilation ``d``; causal: only ``j <= i``), and **global tokens** (task-chosen positions such as [CLS]
or question tokens) attend to every position and are attended by every position (symmetric global
attention). The window is gathered block-wise by the engine, global keys form one small extra key
set, and the rows of global queries are computed densely: O(n (w + g) d) time and memory.
Decoding keeps the last ``w * d`` keys plus the global ones.

``dilation`` may also be a tuple with one dilation per head, as in the paper, whose upper layers dilate
only a few heads and leave the others contiguous (each distinct dilation runs as its own group of heads).

Kept deviation: global attention uses the same projections as the window (the paper has separate global
projections, a layer-level choice).
"""

from __future__ import annotations

from dataclasses import dataclass
import torch
from torch import Tensor

from fastattn.core.masks import Mask
from fastattn.registry import register
from .base import PatternMechanism, check_positive
from fastattn.ops.sparse.engine import block_sparse_attention
from fastattn.ops.sparse.plan import cached_plan
from fastattn.ops.sparse.reference import pattern_reference
from fastattn.ops.sparse.patterns import DilatedWindow, Pattern, Window


@register(
    "longformer", complexity="O(n (w + g) d)", causal=True, decoding=True, padding=True,
    time_growth=1.0, memory_growth=1.0,
)
class LongformerAttention(PatternMechanism):
    """Sliding (optionally dilated) window plus symmetric global tokens."""

    test_options = {"window": 5, "dilation": 2, "global_tokens": (0, 30), "block": 8}
    windowed = True  # halo exchange where the pattern is a window (no global tokens)
    deviations = ("Global attention shares the window's projections (the paper has separate global ones).",)
    pruned_cache = True

    @dataclass(frozen=True)
    class Options:
        window: int = 256  # w: attended keys on each side of the query
        dilation: int | tuple[int, ...] = 1  # d: gap between attended keys (1 = contiguous); or one per head
        global_tokens: tuple[int, ...] = (0,)  # positions with global attention (beyond the length: none)
        block: int = 128  # engine block size (speed only)

        def __post_init__(self) -> None:
            check_positive(window=self.window, block=self.block)
            if isinstance(self.dilation, (tuple, list)):
                if not self.dilation:
                    raise ValueError("dilation must be a positive integer or a non-empty tuple of them")
                for d in self.dilation:
                    check_positive(dilation=d)
                object.__setattr__(self, "dilation", tuple(self.dilation))
            else:
                check_positive(dilation=self.dilation)
            if not all(isinstance(t, int) and t >= 0 for t in self.global_tokens):
                raise ValueError(f"global_tokens must be non-negative integer positions, got {self.global_tokens!r}")
            object.__setattr__(self, "global_tokens", tuple(self.global_tokens))

    def __init__(self, options=None, **kw) -> None:
        super().__init__(options, **kw)
        d = self.options.dilation
        if isinstance(d, tuple) and len(d) != self.num_heads:
            raise ValueError(f"longformer: {len(d)} per-head dilations for {self.num_heads} heads")

    @property
    def heads_independent(self) -> bool:  # type: ignore[override]
        """Per-head dilations make the heads differ."""
        return len(self.head_groups()) == 1

    def head_groups(self) -> list[tuple[int, list[int]]]:
        """``(dilation, heads)`` for each distinct dilation, in order of first appearance."""
        d = self.options.dilation
        if not isinstance(d, tuple):
            return [(d, list(range(self.num_heads)))]
        groups: dict[int, list[int]] = {}
        for h, dh in enumerate(d):
            groups.setdefault(dh, []).append(h)
        return list(groups.items())

    def dilation_pattern(self, dilation: int, device: torch.device) -> Pattern:
        o = self.options
        part = Window(o.window) if dilation == 1 else DilatedWindow(o.window, dilation)
        g = torch.tensor(sorted(set(o.global_tokens)), dtype=torch.long, device=device)
        return Pattern(o.block, (part,), global_keys=g, global_queries=g)

    def pattern(self, lq: int, lk: int, device: torch.device) -> Pattern:
        """The pattern of every head (one dilation), or the union over the heads' dilations (the keys the
        layer reaches; each head group runs with its own)."""
        pats = [self.dilation_pattern(d, device) for d, _ in self.head_groups()]
        out = pats[0]
        for p in pats[1:]:
            out = out + p
        return out

    # ---- per-head dilations: one engine call per group of heads -----------------------------------
    def _per_group(self, run, q: Tensor, *rest: Tensor) -> Tensor:
        groups = self.head_groups()
        outs, order = [], []
        for d, heads in groups:
            idx = torch.tensor(heads, device=q.device)
            outs.append(run(d, q.index_select(1, idx), *(x.index_select(1, idx) for x in rest)))
            order += heads
        out = torch.cat(outs, 1)
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return out.index_select(1, inverse.to(q.device))

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, dropout_p: float = 0.0) -> Tensor:
        if len(self.head_groups()) == 1:
            return super().forward(q, k, v, mask, scale, dropout_p)

        def run(d: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            pat = self.dilation_pattern(d, q.device)
            plan = cached_plan(pat, mask.lq, mask.lk, mask.causal, q.device)
            return block_sparse_attention(q, k, v, mask, scale, pat, plan=plan)

        return self._per_group(run, q, k, v)

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
        if len(self.head_groups()) == 1:
            return super().reference(q, k, v, mask, scale)
        return self._per_group(
            lambda d, q, k, v: pattern_reference(q, k, v, mask, scale, self.dilation_pattern(d, q.device)), q, k, v
        )

    def dense_mask(self, lq: int, lk: int, causal: bool = False, device: torch.device | str = "cpu") -> Tensor:
        """The pattern as bool ``(Lq, Lk)`` -- ``(H, Lq, Lk)`` with per-head dilations -- True = may attend."""
        if not isinstance(self.options.dilation, tuple):
            return super().dense_mask(lq, lk, causal, device)
        dev = torch.device(device)
        qpos = torch.arange(lk - lq, lk, device=dev)[:, None]
        kpos = torch.arange(lk, device=dev)[None, :]
        masks = []
        for d in self.options.dilation:
            m = self.dilation_pattern(d, dev).dense(qpos, kpos)
            masks.append(m & (kpos <= qpos) if causal else m)
        return torch.stack(masks)

    def decode_allowed(self, qpos: Tensor, kpos: Tensor, lk: int) -> Tensor:
        if len(self.head_groups()) == 1:
            return super().decode_allowed(qpos, kpos, lk)
        per_head: list[Tensor] = [qpos] * self.num_heads
        for d, heads in self.head_groups():
            m = self.dilation_pattern(d, qpos.device).dense(qpos, kpos)
            for h in heads:
                per_head[h] = m
        return torch.stack(per_head, 1)
