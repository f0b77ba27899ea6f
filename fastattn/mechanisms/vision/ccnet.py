"""Criss-cross attention (Huang et al., 2018, arXiv:1811.11721): "CCNet: Criss-Cross Attention for
Semantic Segmentation".

One pass: 1x1 convolutions give ``Q, K`` (``C' = C / reduction`` channels, 8 in the paper) and ``V``
(``C`` channels). Pixel ``u = (i, j)`` attends over its criss-cross path ``Omega_u``, the ``H + W - 1``
pixels of its row and its column **with itself counted once**, under **one** softmax::

    A_u = softmax_{v in Omega_u}(Q_u . K_v * scale),   y_u = gamma * sum_{v in Omega_u} A_uv V_v + x_u

with ``gamma`` a learned scalar initialised to 0 (the block starts as the identity) and no score scale
(``scale = 1``, as in the paper and the authors' code; ``scale=`` overrides). The recurrent module
(RCCA) applies the pass ``recurrence`` times (``R = 2`` in the paper) with shared weights: after one
pass pixel ``u`` has seen its row and column, after two every pixel of the image.

Self counted once: the paper's ``Omega_u`` has ``H + W - 1`` elements, and the authors' code agrees --
the CUDA kernel (``cc_attention/src/ca.cu``) skips the pixel itself in the column part, and the
pure-PyTorch version adds ``-inf`` on the diagonal of the column scores. (Re-implementations that drop
that ``-inf`` count the pixel twice, giving it double weight; this one does not.)

Efficient path (:meth:`CrissCross.forward`): per pass, row scores ``(B, heads, H, W, W)`` and column
scores ``(B, heads, H, W, H)`` with the column diagonal masked, concatenated and normalised by one
softmax, then split and applied to the row and column values. ``O(HW (H + W) C)`` time and
``O(HW (H + W))`` memory; no ``HW x HW`` tensor. Reference (:meth:`CrissCross.reference`): dense
softmax attention over the flattened grid under the explicit criss-cross mask, ``O((HW)^2)``.

Padding pixels (``mask``, True = padding) are removed from every softmax as keys; outputs at padding
pixels are replaced by their input by :class:`fastattn.Attention2d`. Multi-head (an extension; the paper
has one head): ``C'`` and ``C`` are split into ``num_heads`` groups, each with its own softmax.

The segmentation head around the module in the paper (3x3 convolutions before and after, the
concatenation with the input, the classifier) is network architecture, not attention, and is left to
the user.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastattn.core.masks import Mask, NEG_INF, masked_softmax
from fastattn.core.vision import VisionMechanism, unflatten_pixels
from fastattn.ops.softmax.dense import dense_attention
from fastattn.registry import register

__all__ = ["CrissCross", "criss_cross_mask"]


def criss_cross_mask(height: int, width: int, device: torch.device | None = None) -> Tensor:
    """Bool ``(HW, HW)`` on the row-major flattened grid: True where pixel ``p`` may see pixel ``p'``
    (same row or same column; each pair once, the pixel itself included once)."""
    pos = torch.arange(height * width, device=device)
    row, col = pos // width, pos % width
    return (row[:, None] == row[None, :]) | (col[:, None] == col[None, :])


@register(
    "ccnet", complexity="O(HW (H + W) C)", causal=False, decoding=False, padding=True,
    time_growth=1.5, memory_growth=1.5,
)
class CrissCross(VisionMechanism):
    """Recurrent criss-cross attention (see the module docstring)."""

    @dataclass(frozen=True)
    class Options:
        reduction: int = 8  # query/key channels C' = channels // reduction
        recurrence: int = 2  # R: passes with shared weights (2 reach every pixel)

        def __post_init__(self) -> None:
            if self.reduction < 1:
                raise ValueError(f"reduction must be >= 1, got {self.reduction}")
            if self.recurrence < 1:
                raise ValueError(f"recurrence must be >= 1, got {self.recurrence}")

    def __init__(self, options=None, *, channels: int, num_heads: int = 1, scale: float | None = None) -> None:
        super().__init__(options, channels=channels, num_heads=num_heads, scale=scale)
        qk = channels // self.options.reduction
        if qk < 1:
            raise ValueError(
                f"ccnet: channels ({channels}) // reduction ({self.options.reduction}) leaves no query/key "
                f"channel; use more channels or a smaller reduction"
            )
        if qk % num_heads or channels % num_heads:
            raise ValueError(
                f"ccnet: num_heads ({num_heads}) must divide the query/key channels ({qk}) and the "
                f"channels ({channels})"
            )
        self.query = nn.Conv2d(channels, qk, 1)
        self.key = nn.Conv2d(channels, qk, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    @property
    def score_scale(self) -> float:
        return 1.0 if self.scale is None else float(self.scale)

    def _heads(self, t: Tensor) -> Tensor:
        """``(B, h * d, H, W) -> (B, h, H, W, d)``."""
        b, c, hh, ww = t.shape
        return t.view(b, self.num_heads, c // self.num_heads, hh, ww).permute(0, 1, 3, 4, 2)

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))

    # ---- efficient path -----------------------------------------------------------------------
    def _pass(self, x: Tensor, mask: Tensor | None) -> Tensor:
        q, k, v = self._project(x)  # (B, h, H, W, d)
        b, _, hh, ww, _ = q.shape
        if self.score_scale != 1.0:
            q = q * self.score_scale
        row = torch.einsum("bnijd,bnikd->bnijk", q, k)  # (i, j) with (i, k): its row
        col = torch.einsum("bnijd,bnkjd->bnijk", q, k)  # (i, j) with (k, j): its column
        eye = torch.eye(hh, dtype=torch.bool, device=x.device)[:, None, :]  # key (k, j) is the pixel itself
        col = col.masked_fill(eye, NEG_INF)  # the pixel is counted in its row, not again in its column
        if mask is not None:
            row = row.masked_fill(mask[:, None, :, None, :], NEG_INF)  # key (i, k) padded
            col = col.masked_fill(mask.transpose(1, 2)[:, None, None, :, :], NEG_INF)  # key (k, j) padded
        p = masked_softmax(torch.cat([row, col], dim=-1))  # one softmax over row and column
        out = torch.einsum("bnijk,bnikd->bnijd", p[..., :ww], v) + torch.einsum(
            "bnijk,bnkjd->bnijd", p[..., ww:], v
        )
        return x + self.gamma * out.permute(0, 1, 4, 2, 3).reshape(b, self.channels, hh, ww)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        for _ in range(self.options.recurrence):
            x = self._pass(x, mask)
        return x

    # ---- literal reference --------------------------------------------------------------------
    def _reference_pass(self, x: Tensor, mask: Tensor | None) -> Tensor:
        b, c, hh, ww = x.shape
        q, k, v = (t.flatten(2, 3) for t in self._project(x))  # (B, h, HW, d), row-major pixels
        allowed = criss_cross_mask(hh, ww, x.device)
        bias = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(~allowed, NEG_INF)
        key_padding = None if mask is None else mask.flatten(1)
        out = dense_attention(q, k, v, Mask(hh * ww, hh * ww, key_padding=key_padding), self.score_scale,
                              extra_bias=bias)
        out = out.transpose(1, 2).reshape(b, hh * ww, c)  # heads back to channels
        return x + self.gamma * unflatten_pixels(out, hh, ww)

    def reference(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        for _ in range(self.options.recurrence):
            x = self._reference_pass(x, mask)
        return x
