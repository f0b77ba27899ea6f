"""CBAM, the Convolutional Block Attention Module (Woo et al., 2018, arXiv:1807.06521).

Channel attention, then spatial attention, in that order (the paper's finding: sequential,
channel-first is best)::

    M_c = sigmoid(MLP(AvgPool(F)) + MLP(MaxPool(F)))        (B, C, 1, 1), one MLP shared by both
    F'  = M_c * F
    M_s = sigmoid(conv_kxk([Avg_c(F'); Max_c(F')]))         (B, 1, H, W), pooled along the channels
    F'' = M_s * F'

The shared MLP is ``C -> C / reduction -> C`` with a ReLU (``reduction = 16``); the spatial convolution
is ``spatial_kernel x spatial_kernel`` (7) with zero padding. The channel maps are concatenated in the
paper's order ``[avg; max]`` (the authors' code uses ``[max; mean]``: swap the two input channels of the
convolution's weight when porting weights).

Options from the authors' code, not in the paper's equations: ``mlp_bias`` (the official MLP has biases,
the default here) and ``spatial_bn`` (the official spatial gate puts a BatchNorm after the convolution;
off by default: the paper's equation has none, and in training mode a BatchNorm mixes the images of a
batch; in training it refuses a padding mask, whose pixels would enter its statistics).

Padding (``mask``, True = padding pixel): the global average and max pooling of the channel attention
run over the real pixels only, and the two channel maps are zeroed at padding pixels before the
convolution -- exactly what the convolution's own zero padding does at the border of the cropped
image, so a padded image gives the crop's result on its real region.

No attention over pixel pairs: ``O(HW C (C / reduction + k^2 / C))`` time, ``O(HW C)`` memory.
The efficient path and the reference differ only in how they pool (vectorised versus image by image
over the real pixels' values).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastattn.core.vision import VisionMechanism, batch_norm, pooled_mean_max
from fastattn.registry import register

__all__ = ["CBAM"]


@register(
    "cbam", complexity="O(HW C^2 / r + HW k^2)", causal=False, decoding=False, padding=True,
    time_growth=1.0, memory_growth=1.0,
)
class CBAM(VisionMechanism):
    """Channel then spatial attention (see the module docstring)."""

    test_options = {"reduction": 4, "spatial_kernel": 3}
    deviations = (
        (
            "Spatial gate without BatchNorm by default (the paper's equation; the authors' code has one: "
            "spatial_bn=True); channel maps concatenated in the paper's [avg; max] order, not the code's [max; mean]."
        ),
    )

    @dataclass(frozen=True)
    class Options:
        reduction: int = 16  # hidden width of the shared MLP = channels // reduction
        spatial_kernel: int = 7  # odd size of the spatial convolution
        mlp_bias: bool = True
        spatial_bn: bool = False

        def __post_init__(self) -> None:
            if self.reduction < 1:
                raise ValueError(f"reduction must be >= 1, got {self.reduction}")
            if self.spatial_kernel < 1 or self.spatial_kernel % 2 == 0:
                raise ValueError(f"spatial_kernel must be a positive odd size, got {self.spatial_kernel}")

    def __init__(self, options=None, *, channels: int, num_heads: int = 1, scale: float | None = None) -> None:
        if scale is not None or num_heads != 1:
            raise ValueError("cbam has no score scale and no heads; do not pass scale= or num_heads=")
        super().__init__(options, channels=channels, num_heads=num_heads, scale=scale)
        opt = self.options
        hidden = channels // opt.reduction
        if hidden < 1:
            raise ValueError(
                f"cbam: channels ({channels}) // reduction ({opt.reduction}) leaves no hidden unit in the "
                f"shared MLP; use a smaller reduction"
            )
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden, bias=opt.mlp_bias), nn.ReLU(), nn.Linear(hidden, channels, bias=opt.mlp_bias)
        )
        k = opt.spatial_kernel
        self.spatial = nn.Conv2d(2, 1, k, padding=k // 2, bias=not opt.spatial_bn)
        self.bn = nn.BatchNorm2d(1) if opt.spatial_bn else None

    def channel_gate(self, avg: Tensor, mx: Tensor) -> Tensor:
        """``M_c (B, C, 1, 1)`` from the pooled descriptors ``(B, C)``."""
        return torch.sigmoid(self.mlp(avg) + self.mlp(mx))[:, :, None, None]

    def spatial_gate(self, f: Tensor, mask: Tensor | None) -> Tensor:
        """``M_s (B, 1, H, W)`` of the channel-refined features ``F'``."""
        maps = torch.cat([f.mean(dim=1, keepdim=True), f.amax(dim=1, keepdim=True)], dim=1)
        if mask is not None:
            maps = maps.masked_fill(mask[:, None], 0.0)  # as the convolution's zero padding of the crop
        s = self.spatial(maps)
        if self.bn is not None:
            s = batch_norm(self.bn, s, mask, "cbam (spatial_bn=True)")
        return torch.sigmoid(s)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        f = self.channel_gate(*pooled_mean_max(x, mask)) * x
        return self.spatial_gate(f, mask) * f

    def reference(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        avg, mx = [], []
        for n in range(x.shape[0]):  # pool image by image over the real pixels' feature vectors
            pixels = x[n].flatten(1) if mask is None else x[n][:, ~mask[n]]  # (C, real pixels)
            avg.append(pixels.sum(dim=1) / pixels.shape[1])
            mx.append(pixels.max(dim=1).values)
        f = self.channel_gate(torch.stack(avg), torch.stack(mx)) * x
        return self.spatial_gate(f, mask) * f
