"""The global context block (Cao et al., 2019, arXiv:1904.11492): "GCNet: Non-local Networks Meet
Squeeze-Excitation Networks and Beyond".

The non-local block's attention maps turned out almost the same for every query, so GCNet computes one
query-independent context for the whole image and adds it to every pixel::

    alpha = softmax_{positions}(W_k x)                 (1x1 convolution C -> 1, one map)
    c     = sum_j alpha_j x_j                          (C,): attention pooling
    t     = W_v2 ReLU(LayerNorm(W_v1 c))               bottleneck C -> C / reduction -> C
    z_i   = x_i + t        (fusion "add", the paper's default)   or   x_i * sigmoid(t)   (fusion "scale")

``W_v2`` is initialised to zero (the paper: the block then starts as the identity under fusion "add").
The LayerNorm normalises the ``C / reduction`` values of the 1x1 bottleneck, per image (no batch
statistics). ``W_k`` has no bias: the softmax over positions cancels one (the authors' convolution has
a bias that never receives a gradient; drop it when porting weights). Padding pixels (``mask``) take
no share of the pooling softmax.

Attention pooling is softmax attention with a single query: ``alpha`` is the softmax of the logits
``W_k x`` (no query, no scale). The efficient path computes it with a masked softmax over positions and
one matrix-vector product, ``O(HW C)`` time and memory; the reference
(:meth:`GlobalContext.reference`) runs it as the library's dense softmax attention with one query
``q = 1``, keys the logits and values the pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastattn.core.masks import Mask, NEG_INF, masked_softmax
from fastattn.core.vision import VisionMechanism, flatten_pixels, key_padding
from fastattn.ops.softmax.dense import dense_attention
from fastattn.registry import register

__all__ = ["GlobalContext"]

_FUSIONS = ("add", "scale")


@register(
    "gcnet", complexity="O(HW C + C^2 / r)", causal=False, decoding=False, padding=True,
    time_growth=1.0, memory_growth=1.0,
)
class GlobalContext(VisionMechanism):
    """Attention pooling, bottleneck transform, broadcast fusion (see the module docstring)."""

    test_options = {"reduction": 4}
    deviations = ("W_k (the attention-map conv) has no bias: a bias cancels in the softmax over positions.",)

    @dataclass(frozen=True)
    class Options:
        reduction: int = 16  # bottleneck width = channels // reduction (the paper also reports 4)
        fusion: str = "add"  # "add" | "scale"

        def __post_init__(self) -> None:
            if self.reduction < 1:
                raise ValueError(f"reduction must be >= 1, got {self.reduction}")
            if self.fusion not in _FUSIONS:
                raise ValueError(f"fusion must be one of {_FUSIONS}, got {self.fusion!r}")

    def __init__(self, options=None, *, channels: int, num_heads: int = 1, scale: float | None = None) -> None:
        if scale is not None or num_heads != 1:
            raise ValueError("gcnet pools with one unscaled softmax map; do not pass scale= or num_heads=")
        super().__init__(options, channels=channels, num_heads=num_heads, scale=scale)
        hidden = channels // self.options.reduction
        if hidden < 1:
            raise ValueError(
                f"gcnet: channels ({channels}) // reduction ({self.options.reduction}) leaves no bottleneck "
                f"channel; use a smaller reduction"
            )
        self.key = nn.Conv2d(channels, 1, 1, bias=False)  # W_k (a bias would cancel in the softmax)
        self.transform = nn.Sequential(
            nn.Linear(channels, hidden), nn.LayerNorm(hidden), nn.ReLU(), nn.Linear(hidden, channels)
        )  # W_v1, LN, ReLU, W_v2 on the (B, C) context
        nn.init.zeros_(self.transform[3].weight)
        nn.init.zeros_(self.transform[3].bias)

    def pooling_weights(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``alpha (B, H * W)``: the softmax over the real pixels of the one attention map."""
        logits = self.key(x).flatten(1)
        bias = None if mask is None else torch.zeros_like(logits).masked_fill(mask.flatten(1), NEG_INF)
        return masked_softmax(logits, bias)

    def _fuse(self, x: Tensor, context: Tensor) -> Tensor:
        t = self.transform(context)[:, :, None, None]
        return x + t if self.options.fusion == "add" else x * torch.sigmoid(t)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        alpha = self.pooling_weights(x, mask)
        context = torch.bmm(x.flatten(2), alpha[:, :, None])[:, :, 0]  # (B, C)
        return self._fuse(x, context)

    def reference(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        b, _, hh, ww = x.shape
        logits = flatten_pixels(self.key(x))[:, None]  # (B, 1, HW, 1): keys of width 1
        one = torch.ones(b, 1, 1, 1, dtype=x.dtype, device=x.device)  # the single query
        pool = Mask(1, hh * ww, key_padding=key_padding(mask))
        context = dense_attention(one, logits, flatten_pixels(x)[:, None], pool, 1.0)
        return self._fuse(x, context[:, 0, 0])
