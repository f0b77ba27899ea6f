"""The feature-map kind (``kind="vision"``): the base class of 2-D-only modules and the pixel helpers
that :class:`fastattn.Attention2d` and every such module share.

Layout: ``x (B, C, H, W)``; a pixel mask is bool ``(B, H, W)`` with **True marking a padding pixel**
(the ``key_padding_mask`` convention, per pixel). On the flattened grid, pixel ``(i, j)`` is position
``i * W + j`` (row-major), so ``flatten_pixels(x)[:, i * W + j] == x[:, :, i, j]``.

A :class:`VisionMechanism` is a whole module (projections, attention, residual): ``forward(x, mask)``
is the efficient implementation and ``reference(x, mask)`` the paper's formula written literally
(dense, readable, float64-safe). Callers go through :class:`fastattn.Attention2d`, which validates the
inputs and passes padding pixels through unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from .registered import Registered
from .state import DecodingState

if TYPE_CHECKING:
    pass

__all__ = [
    "VisionMechanism", "GlimpseMechanism", "GlimpseResult", "GlimpseState", "reinforce_loss", "check_feature_map", "check_pixel_mask", "flatten_pixels", "unflatten_pixels",
    "pixel_heads", "unpixel_heads", "key_padding", "pooled_mean_max", "masked_max_pool2", "batch_norm",
]


def check_feature_map(x: Tensor, channels: int) -> None:
    """``x`` must be a floating-point ``(B, C, H, W)`` tensor with ``C == channels``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (batch, channels, height, width), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.shape[1] != channels:
        raise ValueError(f"x has {x.shape[1]} channels, the module was built for {channels}")
    if x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"empty feature map: height {x.shape[2]}, width {x.shape[3]}")


def check_pixel_mask(mask: Tensor, x: Tensor) -> None:
    """``mask`` must be bool ``(B, H, W)`` matching ``x (B, C, H, W)``."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"mask must be a bool tensor (True = padding pixel), got {got}")
    want = (x.shape[0], x.shape[2], x.shape[3])
    if tuple(mask.shape) != want:
        raise ValueError(f"mask must have shape (batch, height, width) = {want}, got {tuple(mask.shape)}")
    if mask.device != x.device:
        raise ValueError(f"device mismatch: x {x.device}, mask {mask.device}")


def flatten_pixels(x: Tensor) -> Tensor:
    """``(B, C, H, W) -> (B, H * W, C)``, pixels in row-major order."""
    return x.flatten(2).transpose(1, 2)


def unflatten_pixels(t: Tensor, height: int, width: int) -> Tensor:
    """``(B, H * W, C) -> (B, C, H, W)``, the inverse of :func:`flatten_pixels`."""
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], height, width)


def pixel_heads(t: Tensor, num_heads: int) -> Tensor:
    """``(B, h * d, H, W) -> (B, h, H * W, d)``: a 1x1 projection's channels split into heads, pixels as
    the positions of a sequence (row-major), ready for the sequence ops."""
    b, c, hh, ww = t.shape
    return t.reshape(b, num_heads, c // num_heads, hh * ww).transpose(2, 3)


def unpixel_heads(t: Tensor, height: int, width: int) -> Tensor:
    """``(B, h, H * W, d) -> (B, h * d, H, W)``, the inverse of :func:`pixel_heads`."""
    b, h, _, d = t.shape
    return t.transpose(2, 3).reshape(b, h * d, height, width)


def key_padding(mask: Tensor | None) -> Tensor | None:
    """A pixel mask ``(B, H, W)`` as the ``key_padding_mask`` ``(B, H * W)`` of the flattened pixels."""
    return None if mask is None else mask.flatten(1)


def pooled_mean_max(x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Global average and max pooling of ``x (B, C, H, W)`` over the **real** pixels (``mask`` True =
    padding): two ``(B, C)`` tensors. An image with no real pixel gives zeros (never NaN)."""
    if mask is None:
        return x.mean(dim=(2, 3)), x.amax(dim=(2, 3))
    pad = mask[:, None]
    count = (~mask).sum(dim=(1, 2)).clamp_min(1).to(x.dtype)[:, None]
    mean = x.masked_fill(pad, 0.0).sum(dim=(2, 3)) / count
    mx = x.masked_fill(pad, float("-inf")).amax(dim=(2, 3))
    return mean, torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))


def masked_max_pool2(x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """2x2 max pooling with stride 2 of ``x (B, C, H, W)`` over real pixels only, ``ceil`` sized (an odd
    edge keeps its last row / column as a 1-wide cell): returns the pooled map ``(B, C, ceil(H/2),
    ceil(W/2))`` and its mask (a cell is padding when all of its pixels are; such cells hold zeros).

    Because cells never straddle the top-left real region of a padded image and its padding, a padded
    image pools to the pooled crop plus padding cells."""
    hh, ww = x.shape[2], x.shape[3]
    ph, pw = hh % 2, ww % 2
    fill = x if mask is None else x.masked_fill(mask[:, None], float("-inf"))
    if ph or pw:
        fill = torch.nn.functional.pad(fill, (0, pw, 0, ph), value=float("-inf"))
    pooled = torch.nn.functional.max_pool2d(fill, 2)
    if mask is None:
        return pooled, None  # every cell holds at least one real pixel
    pad = torch.nn.functional.pad(mask, (0, pw, 0, ph), value=True)
    cell = pad.unflatten(1, (-1, 2)).unflatten(3, (-1, 2)).all(dim=4).all(dim=2)  # (B, H', W')
    return torch.where(cell[:, None], torch.zeros_like(pooled), pooled), cell


def batch_norm(bn: torch.nn.Module, t: Tensor, mask: Tensor | None, owner: str) -> Tensor:
    """``bn(t)`` for a module's optional BatchNorm (the papers' choice in several blocks). In eval mode it
    is a per-channel affine map; in training mode its statistics mix the images of the batch and would
    include padding pixels, so a padding mask is then a ``ValueError``."""
    if mask is not None and bn.training:
        raise ValueError(
            f"{owner}: its BatchNorm in training mode takes no padding mask (the batch statistics would "
            f"include padding pixels); use eval mode or the option without BatchNorm"
        )
    return bn(t)


class VisionMechanism(Registered):
    """Base class of the 2-D-only modules (kind ``"vision"``). See the module docstring.

    Subclasses define a frozen dataclass ``Options`` (every field with a default), ``forward`` and,
    where it differs from ``forward``, ``reference``. ``scale`` is ``None`` unless the user overrides
    the paper's score scale; a module without scores rejects it in its constructor.
    """


    def __init__(self, options: Any = None, *, channels: int, num_heads: int = 1, scale: float | None = None) -> None:
        super().__init__(options)
        if channels <= 0 or num_heads <= 0:
            raise ValueError(f"channels ({channels}) and num_heads ({num_heads}) must be positive")
        self.channels, self.num_heads, self.scale = channels, num_heads, scale

    def dims(self) -> str:
        return f"channels={self.channels}, heads={self.num_heads}"

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``x (B, C, H, W)``, ``mask (B, H, W)`` or ``None`` -> ``(B, C, H, W)`` (inputs validated)."""
        raise NotImplementedError

    def reference(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """The paper's formula, literally. Defaults to ``forward``; override where they differ."""
        return self.forward(x, mask)


class GlimpseMechanism(Registered):
    """Base class of the recurrent hard-attention modules of kind ``"vision"`` (Ba et al.'s glimpses):
    not a feature-map transform, so not :class:`fastattn.Attention2d`'s; callers go through
    :class:`fastattn.GlimpseAttention` (``facade``).

    ``forward(x, num_glimpses, generator=None, sample=None)`` reads an image ``x (B, C, H, W)`` at
    ``num_glimpses`` locations, each chosen from the glimpses before it, and returns a
    :class:`GlimpseResult`; ``step`` takes one glimpse after a
    state; ``reference`` is ``forward`` with the sensor written literally (explicit crops).
    """

    facade = "GlimpseAttention"

    def __init__(self, options: Any = None, *, channels: int) -> None:
        super().__init__(options)
        if channels <= 0:
            raise ValueError(f"channels ({channels}) must be positive")
        self.channels = channels

    def dims(self) -> str:
        return f"channels={self.channels}"


class GlimpseResult(NamedTuple):
    """``features (B, N, hidden)`` (``r1_n``), ``locations (B, N, 2)`` (where the sensor looked, clamped to
    ``[-1, 1]``), ``log_probs (B, N)`` (of the sampled, unclamped locations under the policy; gradient
    to the emission and context networks), ``baselines (B, N)``, ``means (B, N, 2)`` (the policy's
    means)."""

    features: Tensor
    locations: Tensor
    log_probs: Tensor
    baselines: Tensor
    means: Tensor


class GlimpseState(DecodingState):
    """The recurrent core's two LSTM states after ``length`` glimpses."""

    batched = ("h1", "c1", "h2", "c2")

    def __init__(self, h1: Tensor, c1: Tensor, h2: Tensor, c2: Tensor, length: int) -> None:
        self.h1, self.c1, self.h2, self.c2, self.length = h1, c1, h2, c2, length


def reinforce_loss(result: GlimpseResult, reward: Tensor) -> Tensor:
    """REINFORCE with a baseline: ``-mean_b sum_n (R - b_n) log pi(l_n)`` (the advantage held fixed) plus
    the baseline's squared error ``mean (b_n - R)^2``. ``reward`` is ``(B,)`` (one reward per episode,
    e.g. 1 for a correct classification) or ``(B, N)`` (the return from each glimpse on)."""
    if reward.dim() == 1:
        reward = reward[:, None].expand_as(result.log_probs)
    if reward.shape != result.log_probs.shape:
        raise ValueError(f"reward must be (B,) or (B, N) = {tuple(result.log_probs.shape)}, got {tuple(reward.shape)}")
    reward = reward.to(result.log_probs.dtype)
    advantage = (reward - result.baselines).detach()
    return -(advantage * result.log_probs).sum(1).mean() + (result.baselines - reward).pow(2).mean()
