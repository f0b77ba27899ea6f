"""Hand-crafted (input-independent) attention (Wu et al., 2020, arXiv:2006.05174).

The study finds that trained self-supervised audio transformers use a few kinds of attention maps and
replaces them by fixed weights that ignore ``q . k``: each query averages the values of a fixed set of
keys with equal weights. The kinds here:

* ``diagonal``: the neighbours ``|i - j| <= w`` (causal: ``0 <= i - j <= w``), the banded/diagonal maps;
* ``block``: the positions of the same block of ``w`` (block-diagonal maps);
* ``global``: every (unpadded, causal: earlier) position, the uniform "vertical/global" map.

``out_i = mean_{j in S(i)} v_j``. The first two run on the sparse engine with zero scores, ``global``
as a (cumulative) masked mean: O(n w d) and O(n d). No learned parts; queries and keys are unused
(their gradients are zero).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fastattn.core.masks import Mask
from fastattn.registry import register
from .base import PatternMechanism, check_positive
from fastattn.ops.sparse.patterns import Pattern, SameBlock, Window


@register("handcrafted", complexity="O(n w d)", causal=True, decoding=True, padding=True, time_growth=1.0, memory_growth=1.0)
class HandcraftedAttention(PatternMechanism):
    """Uniform weights over a fixed neighbourhood, block or the whole sequence."""

    test_options = {"kind": "diagonal", "window": 6, "block": 8}
    windowed = True  # halo exchange where the pattern is a window (no global tokens)
    pruned_cache = True

    @dataclass(frozen=True)
    class Options:
        kind: str = "diagonal"  # "diagonal" | "block" | "global"
        window: int = 8  # w: neighbours on each side (diagonal)
        block: int = 64  # block length (block); engine block size otherwise

        def __post_init__(self) -> None:
            if self.kind not in ("diagonal", "block", "global"):
                raise ValueError(f"kind must be 'diagonal', 'block' or 'global', got {self.kind!r}")
            check_positive(window=self.window, block=self.block)

    def pattern(self, lq: int, lk: int, device: torch.device) -> Pattern:
        o = self.options
        if o.kind == "diagonal":
            return Pattern(o.block, (Window(o.window),))
        if o.kind == "block":
            return Pattern(o.block, (SameBlock(o.block),))
        return Pattern(o.block, global_keys=torch.arange(lk, device=device))

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, dropout_p: float = 0.0) -> Tensor:
        if self.options.kind != "global":
            return super().forward(q * 0, k * 0, v, mask, scale)
        keep = torch.ones(v.shape[0], 1, v.shape[2], 1, dtype=v.dtype, device=v.device)
        if mask.key_padding is not None:
            keep = (~mask.key_padding)[:, None, :, None].to(v.dtype)
        zero = (q[..., :1] * 0).sum() + (k[..., :1] * 0).sum()  # keeps q, k in the graph (zero grads)
        vk = v * keep
        if mask.causal:
            tot = vk.cumsum(2)[:, :, mask.offset:]
            cnt = keep.cumsum(2)[:, :, mask.offset:]
        else:
            tot, cnt = vk.sum(2, keepdim=True), keep.sum(2, keepdim=True)
        out = tot / cnt.clamp(min=1)
        return (out.expand(*v.shape[:2], mask.lq, v.shape[3]) + zero).to(v.dtype)

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
        return super().reference(q * 0, k * 0, v, mask, scale)

    def step(
        self, q: Tensor, k: Tensor, v: Tensor, state: Any, scale: float, key_padding_mask: Tensor | None = None
    ) -> tuple[Tensor, Any]:
        return super().step(q * 0, k * 0, v, state, scale, key_padding_mask)
