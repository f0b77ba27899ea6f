"""LightNL, the lightweight non-local block of AutoNL (Li et al., 2020, arXiv:2004.01961): "Neural
Architecture Search for Lightweight Non-Local Networks". Checked against the authors' TensorFlow code
(``LiYingwei/AutoNL``, ``model_def.py``: ``non_local_op`` and ``MnasBlock._call_non_local``).

No embedding convolutions and no softmax: the query and key are the first ``r C`` **channels** of the
input itself (channel slicing, the point of the design), the value is the whole input, and keys and
values may be spatially sub-sampled by a stride ``s``::

    theta = x[:, :rC],   x_s = x[:, :, ::s, ::s],   phi = x_s[:, :rC],   g = x_s
    f     = theta (phi^T g) / (H W)        or, identically,   (theta phi^T) g / (H W)
    out   = x + Norm(DWConv3x3(f))

The divisor is ``H W`` of the full map even when the keys are sub-sampled (as in the code). The code
picks whichever association its multiply-accumulate count finds cheaper; option ``order="auto"`` does
the same, ``"linear"`` / ``"quadratic"`` force one (they agree to round-off). The linear order runs the
library's non-causal linear attention without normaliser
(:func:`~fastattn.ops.linear.engine.linear_attention`): ``O(HW r C^2)`` time, ``O(HW C)`` memory.
The reference (:meth:`LightNL.reference`) is the quadratic order, written literally.

``ratio`` (``r``) and ``stride`` (``s``) are searched per block in the paper (``r`` in {0.25, 0.5, 1},
``s`` in {1, 2}); the defaults here (0.25, 1) are one point of that space. ``Norm``: the code's
BatchNorm (``norm="batch"``; its scale zero-initialised with ``zero_init``, the code's
``nl_zero_init``), or by default none (``norm="none"``: a BatchNorm in training mode mixes the images
of a batch), in which case ``zero_init`` zeroes the depthwise convolution so the block starts as the
identity.

Padding (``mask``): padding pixels are no keys (their ``phi`` and ``g`` are zero), the divisor is the
number of real pixels, and ``f`` is zeroed at padding pixels before the 3x3 convolution (as the
convolution's zero padding at the border of the cropped image), so a padded image gives the crop's result
on its real (top-left) region.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastattn.core.masks import Mask
from fastattn.core.vision import VisionMechanism, batch_norm, key_padding, pixel_heads, unpixel_heads
from fastattn.ops.linear.engine import linear_attention
from fastattn.registry import register

__all__ = ["LightNL"]

_ORDERS = ("auto", "linear", "quadratic")
_NORMS = ("none", "batch")


@register(
    "autonl", complexity="O(HW r C^2)", causal=False, decoding=False, padding=True,
    time_growth=1.0, memory_growth=1.0,
)
class LightNL(VisionMechanism):
    """The lightweight non-local block (see the module docstring)."""

    test_options = {"stride": 2}
    deviations = (
        (
            "No BatchNorm after the depthwise conv by default (norm='none', the conv zero-initialised); "
            "norm='batch' is the authors' code, batch-dependent in training."
        ),
    )

    @dataclass(frozen=True)
    class Options:
        ratio: float = 0.25  # r: query/key channels = int(r * channels), sliced, not projected
        stride: int = 1  # s: keys and values sub-sampled x[:, :, ::s, ::s]
        order: str = "auto"  # "auto" (the code's cost rule) | "linear" theta (phi^T g) | "quadratic"
        norm: str = "none"  # "none" | "batch" after the depthwise conv
        zero_init: bool = True  # start as the identity (zero BN scale, or zero depthwise conv)

        def __post_init__(self) -> None:
            if not 0.0 < self.ratio <= 1.0:
                raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")
            if self.stride < 1:
                raise ValueError(f"stride must be >= 1, got {self.stride}")
            if self.order not in _ORDERS:
                raise ValueError(f"order must be one of {_ORDERS}, got {self.order!r}")
            if self.norm not in _NORMS:
                raise ValueError(f"norm must be one of {_NORMS}, got {self.norm!r}")

    def __init__(self, options=None, *, channels: int, num_heads: int = 1, scale: float | None = None) -> None:
        if scale is not None or num_heads != 1:
            raise ValueError("autonl has no score scale and no heads; do not pass scale= or num_heads=")
        super().__init__(options, channels=channels, num_heads=num_heads, scale=scale)
        self.qk_channels = int(self.options.ratio * channels)
        if self.qk_channels < 1:
            raise ValueError(f"autonl: int(ratio ({self.options.ratio}) * channels ({channels})) = 0 channels")
        self.dwconv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.bn = nn.BatchNorm2d(channels) if self.options.norm == "batch" else None
        if self.options.zero_init:
            nn.init.zeros_(self.dwconv.weight if self.bn is None else self.bn.weight)

    def _inputs(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Mask, Tensor]:
        """``theta (B, 1, HW, rC)``, ``phi (B, 1, N, rC)``, ``g (B, 1, N, C)``, the keys' mask and the
        divisor ``(B, 1, 1, 1)`` (real pixels of the full map)."""
        s = self.options.stride
        xs = x[:, :, ::s, ::s]
        ms = None if mask is None else mask[:, ::s, ::s]
        theta = pixel_heads(x[:, :self.qk_channels], 1)
        phi, g = pixel_heads(xs[:, :self.qk_channels], 1), pixel_heads(xs, 1)
        if ms is not None:  # padding pixels are no keys
            keep = (~ms).flatten(1)[:, None, :, None].to(x.dtype)
            phi, g = phi * keep, g * keep
        if mask is None:
            n = torch.full((1, 1, 1, 1), float(x.shape[2] * x.shape[3]), dtype=x.dtype, device=x.device)
        else:
            n = (~mask).sum(dim=(1, 2)).clamp_min(1).to(x.dtype).view(-1, 1, 1, 1)
        return theta, phi, g, Mask(theta.shape[2], phi.shape[2], key_padding=key_padding(ms)), n

    def quadratic_is_cheaper(self, height: int, width: int) -> bool:
        """The authors' rule: multiply-accumulates of ``(theta phi^T) g`` against ``theta (phi^T g)``."""
        s, c, r = self.options.stride, self.channels, self.options.ratio
        hw, reduced = height * width, (height // s) * (width // s)
        return hw * reduced * c * (1 + r) < hw * c * c * r + reduced * c * c * r

    def _out(self, f: Tensor, x: Tensor, mask: Tensor | None) -> Tensor:
        f = unpixel_heads(f, x.shape[2], x.shape[3])
        if mask is not None:
            f = f.masked_fill(mask[:, None], 0.0)  # as the depthwise conv's zero padding of the crop
        f = self.dwconv(f)
        if self.bn is not None:
            f = batch_norm(self.bn, f, mask, "autonl (norm='batch')")
        return x + f

    def _quadratic(self, theta: Tensor, phi: Tensor, g: Tensor, n: Tensor) -> Tensor:
        return torch.matmul(torch.matmul(theta, phi.transpose(-1, -2)), g) / n

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        theta, phi, g, m, n = self._inputs(x, mask)
        order = self.options.order
        if order == "auto":
            order = "quadratic" if self.quadratic_is_cheaper(x.shape[2], x.shape[3]) else "linear"
        if order == "quadratic":
            f = self._quadratic(theta, phi, g, n)
        else:
            f = linear_attention(theta, phi / n, g, m, normalize=False)
        return self._out(f, x, mask)

    def reference(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        theta, phi, g, _, n = self._inputs(x, mask)
        return self._out(self._quadratic(theta, phi, g, n), x, mask)
