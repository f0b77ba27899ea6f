"""RecoNet's tensor low-rank reconstruction (Chen et al., 2020, arXiv:2008.00490): "Tensor Low-Rank
Reconstruction for Semantic Segmentation".

Context as a 3-D attention tensor of CP rank ``r``, built from rank-1 pieces instead of pixel pairs.
The Tensor Generation Module makes, for ``i = 1..r``, three sigmoid-gated vectors from three global
poolings of the feature map ``X (C, H, W)``::

    v_ci = sigmoid(W_ci GAP_{H,W}(X) + b_ci)   in R^C   (a 1x1 conv whose channels are C)
    v_hi = sigmoid(W_hi GAP_{C,W}(X) + b_hi)   in R^H   (a 1x1 conv whose channels are the rows)
    v_wi = sigmoid(W_wi GAP_{C,H}(X) + b_wi)   in R^W   (a 1x1 conv whose channels are the columns)

and the Tensor Reconstruction Module sums their outer products (CP form, learnable ``lambda_i``)::

    A = sum_i lambda_i v_ci (x) v_hi (x) v_wi     (C, H, W),   Y = X * A

The paper then concatenates ``Y`` with ``X`` (fusion ``"concat"``, followed here by the 1x1 convolution
``2C -> C`` that brings the block back to ``C`` channels); fusion ``"multiply"`` returns ``Y`` alone.

The row and column generators are convolutions over ``H`` and ``W`` channels, so their sizes are fixed
at construction (option ``size = (h, w)``). Any other input size is adaptive-average-pooled to ``(h,
w)``, the attention tensor is built there and bilinearly interpolated back to ``(H, W)`` (``strict=True``
raises on other sizes instead). Bilinear interpolation is separable, so interpolating the tensor equals
interpolating each ``v_hi`` and ``v_wi`` along its axis: the efficient path does that and never forms
the small tensor; the reference (:meth:`TensorLowRank.reference`) builds ``A`` at ``(h, w)`` rank by
rank, literally, and interpolates it. ``A`` keeps CP rank ``<= r`` either way.

``O(HW C r)`` time for the reconstruction, ``O(r (C^2 + h^2 + w^2))`` parameters. No padding mask: the
global poolings and the resampling to ``(h, w)`` would mix padding pixels into every vector.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastattn.core.vision import VisionMechanism
from fastattn.registry import register

__all__ = ["TensorLowRank"]

_FUSIONS = ("concat", "multiply")


@register(
    "tensor_lowrank", complexity="O(HW C r)", causal=False, decoding=False, padding=False,
    time_growth=1.0, memory_growth=1.0,
)
class TensorLowRank(VisionMechanism):
    """Rank-``r`` CP attention tensor from channel, row and column generators (see the module docstring)."""

    test_options = {"rank": 3, "size": (4, 6)}
    deviations = (
        (
            "Row/column generators are sized at construction (size=(h, w), default (16, 16)); other input "
            "sizes are pooled to (h, w) and the attention tensor bilinearly interpolated back; fusion "
            "'concat' ends with a 1x1 conv 2C -> C to keep C channels."
        ),
    )

    @dataclass(frozen=True)
    class Options:
        rank: int = 64  # r: number of rank-1 tensors (the paper's default)
        size: tuple[int, int] = (16, 16)  # (h, w) the row and column generators are built for
        fusion: str = "concat"  # "concat" [X; X * A] -> 1x1 conv | "multiply" X * A
        strict: bool = False  # raise on inputs whose size is not `size` instead of resampling

        def __post_init__(self) -> None:
            if self.rank < 1:
                raise ValueError(f"rank must be >= 1, got {self.rank}")
            size = tuple(self.size)
            if len(size) != 2 or any(int(s) != s or s < 1 for s in size):
                raise ValueError(f"size must be two positive integers (h, w), got {self.size!r}")
            object.__setattr__(self, "size", (int(size[0]), int(size[1])))
            if self.fusion not in _FUSIONS:
                raise ValueError(f"fusion must be one of {_FUSIONS}, got {self.fusion!r}")

    def __init__(self, options=None, *, channels: int, num_heads: int = 1, scale: float | None = None) -> None:
        if scale is not None or num_heads != 1:
            raise ValueError("tensor_lowrank has no scores and no heads; do not pass scale= or num_heads=")
        super().__init__(options, channels=channels, num_heads=num_heads, scale=scale)
        r, (h, w) = self.options.rank, self.options.size
        self.channel_gen = nn.Linear(channels, r * channels)  # r 1x1 convs C -> C
        self.height_gen = nn.Linear(h, r * h)  # r 1x1 convs over the h row-channels
        self.width_gen = nn.Linear(w, r * w)  # r 1x1 convs over the w column-channels
        self.weights = nn.Parameter(torch.full((r,), 1.0 / r))  # lambda_i
        self.fuse = nn.Conv2d(2 * channels, channels, 1) if self.options.fusion == "concat" else None

    def _check_size(self, x: Tensor) -> None:
        if self.options.strict and tuple(x.shape[2:]) != self.options.size:
            raise ValueError(
                f"tensor_lowrank (strict=True) was built for size {self.options.size}, got {tuple(x.shape[2:])}"
            )

    def generators(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``v_c (B, r, C)``, ``v_h (B, r, h)``, ``v_w (B, r, w)``: the rank-1 factors at ``size``."""
        b, r, (h, w) = x.shape[0], self.options.rank, self.options.size
        xp = F.adaptive_avg_pool2d(x, (h, w))
        v_c = torch.sigmoid(self.channel_gen(xp.mean(dim=(2, 3)))).view(b, r, -1)
        v_h = torch.sigmoid(self.height_gen(xp.mean(dim=(1, 3)))).view(b, r, h)
        v_w = torch.sigmoid(self.width_gen(xp.mean(dim=(1, 2)))).view(b, r, w)
        return v_c, v_h, v_w

    def attention_tensor(self, x: Tensor) -> Tensor:
        """``A (B, C, H, W)`` (efficient path: the factors interpolated, then combined)."""
        self._check_size(x)
        v_c, v_h, v_w = self.generators(x)
        hh, ww = x.shape[2], x.shape[3]
        if hh != v_h.shape[-1]:
            v_h = F.interpolate(v_h, size=hh, mode="linear", align_corners=False)
        if ww != v_w.shape[-1]:
            v_w = F.interpolate(v_w, size=ww, mode="linear", align_corners=False)
        return torch.einsum("brc,brh,brw->bchw", v_c * self.weights[:, None], v_h, v_w)

    def _fusion(self, x: Tensor, a: Tensor) -> Tensor:
        y = x * a
        return y if self.fuse is None else self.fuse(torch.cat([x, y], dim=1))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return self._fusion(x, self.attention_tensor(x))

    def reference(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        self._check_size(x)
        v_c, v_h, v_w = self.generators(x)
        a = 0.0
        for i in range(self.options.rank):  # A = sum_i lambda_i v_ci (x) v_hi (x) v_wi at (h, w)
            a = a + self.weights[i] * v_c[:, i, :, None, None] * v_h[:, i, None, :, None] * v_w[:, i, None, None, :]
        if tuple(a.shape[2:]) != tuple(x.shape[2:]):
            a = F.interpolate(a, size=x.shape[2:], mode="bilinear", align_corners=False)
        return self._fusion(x, a)
