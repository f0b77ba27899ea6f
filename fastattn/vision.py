"""``fastattn.Attention2d``: attention over a feature map ``(B, C, H, W) -> (B, C, H, W)`` with any
sequence mechanism or any 2-D-only module of the registry."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .core.base import Mechanism
from .core.vision import check_feature_map, check_pixel_mask, flatten_pixels, unflatten_pixels
from .registry import MethodSpec, get_method

__all__ = ["Attention2d"]


class SequenceOverPixels(nn.Module):
    """A sequence mechanism over the flattened pixels, in the non-local block's form::

        q, k, v = x W_q, x W_k, x W_v          (1x1 convolutions C -> inner_channels, split into heads)
        y = x + unflatten(attention(q, k, v) W_o)   (reprojection inner_channels -> C, residual)

    Pixels are the positions of the sequence (row-major); padding pixels are padding keys. The score
    scale is the mechanism's own (``head_dim ** -0.5`` for scaled dot-product attention) unless
    ``scale`` overrides it. There is no normalisation layer: the non-local block's batch norm is
    ``method="nonlocal"``'s, and a batch norm would make one image's output depend on the others.
    """

    def __init__(
        self, spec: MethodSpec, channels: int, *, num_heads: int, inner_channels: int | None,
        scale: float | None, generator: torch.Generator | None, options: dict[str, Any],
    ) -> None:
        super().__init__()
        inner = channels // 2 if inner_channels is None else inner_channels
        if inner <= 0 or inner % num_heads:
            what = f"inner_channels ({inner})" if inner_channels is not None else (
                f"the default inner_channels = channels // 2 = {inner}"
            )
            raise ValueError(f"{what} must be a positive multiple of num_heads ({num_heads}); pass inner_channels=")
        self.num_heads, self.inner_channels, self.scale = num_heads, inner, scale
        self.q_proj = nn.Linear(channels, inner)
        self.k_proj = nn.Linear(channels, inner)
        self.v_proj = nn.Linear(channels, inner)
        self.out_proj = nn.Linear(inner, channels)
        kwargs = {"generator": generator} if spec.randomized else {}
        self.attn: Mechanism = spec.cls(  # type: ignore[misc]
            spec.make_options(**options), head_dim=inner // num_heads, num_heads=num_heads,
            num_kv_heads=num_heads, **kwargs,
        )

    @property
    def aux_loss(self) -> Tensor:
        return self.attn.aux_loss

    def _heads(self, t: Tensor) -> Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.num_heads, -1).transpose(1, 2)

    def forward(self, x: Tensor, mask: Tensor | None = None, *, reference: bool = False) -> Tensor:
        b, _, hh, ww = x.shape
        t = flatten_pixels(x)
        q, k, v = (self._heads(p(t)) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = self.attn.run(
            q, k, v, key_padding_mask=None if mask is None else mask.flatten(1), scale=self.scale,
            reference=reference,
        )
        out = self.out_proj(out.transpose(1, 2).reshape(b, hh * ww, self.inner_channels))
        return x + unflatten_pixels(out, hh, ww)

    def reference(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.forward(x, mask, reference=True)


class Attention2d(nn.Module):
    """Attention over a feature map: ``y = m(x, mask=None)``, ``x (B, C, H, W) -> y (B, C, H, W)``,
    any ``H, W``.

    ``method`` is a registry id of kind ``"sequence"`` (run over the flattened pixels in the non-local
    block's form, see :class:`SequenceOverPixels`; ``inner_channels`` sets the width of ``q, k, v``,
    default ``channels // 2`` as in the non-local block) or of kind ``"vision"`` (a 2-D-only module
    such as ``ccnet``, with its own options). ``**options`` are the mechanism's options
    (``fastattn.get_method(method).options``); an unknown one is a ``ValueError``.

    Args:
        channels: ``C``.
        method: the mechanism (API default ``"nonlocal"``).
        num_heads: attention heads (must divide the mechanism's channel widths).
        scale: overrides the score scale; by default each mechanism follows its paper (scaled
            dot-product attention ``d ** -0.5``, criss-cross attention 1).
        inner_channels: sequence mechanisms only, see above.
        generator: random source of randomised mechanisms (drawn once, at construction).

    ``mask (B, H, W)`` bool marks padding pixels (True): they never influence the other pixels, and
    their own output is their input, unchanged. Mechanisms whose registry entry says ``padding=False``
    raise a ``ValueError`` when given one.

    Example:
        >>> m = fastattn.Attention2d(64, method="ccnet")        # recurrent criss-cross attention
        >>> y = m(torch.randn(2, 64, 33, 47))
        >>> m = fastattn.Attention2d(64, method="performer", num_heads=4, num_features=64)
        >>> y = m(torch.randn(2, 64, 33, 47))
    """

    def __init__(
        self,
        channels: int,
        method: str = "nonlocal",
        *,
        num_heads: int = 1,
        scale: float | None = None,
        inner_channels: int | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        spec = get_method(method)
        if not isinstance(channels, int) or channels <= 0 or not isinstance(num_heads, int) or num_heads <= 0:
            raise ValueError(f"channels ({channels}) and num_heads ({num_heads}) must be positive integers")
        if generator is not None and not spec.randomized:
            raise ValueError(f"method {method!r} draws no random numbers; it takes no generator")
        if getattr(spec, "level", None) == "layer":
            raise ValueError(
                f"method {method!r} is a layer-level mechanism (it owns its projections); "
                f"use fastattn.MultiheadAttention(..., method={method!r}) on the flattened pixels"
            )
        facade = getattr(spec.cls, "facade", None)
        if facade is not None:
            raise ValueError(
                f"method {method!r} is not a feature-map transform (it returns glimpse features, locations and "
                f"log-probabilities); use fastattn.{facade}(channels, method={method!r})"
            )
        self.spec, self.method, self.channels = spec, method, channels
        block: nn.Module
        if spec.kind == "sequence":
            block = SequenceOverPixels(
                spec, channels, num_heads=num_heads, inner_channels=inner_channels, scale=scale,
                generator=generator, options=options,
            )
        elif spec.kind == "vision":
            if inner_channels is not None:
                raise ValueError(
                    f"inner_channels applies to sequence mechanisms; {method!r} sets its widths through "
                    f"its own options: {sorted(spec.options)}"
                )
            kwargs = {"generator": generator} if spec.randomized else {}
            block = spec.cls(  # type: ignore[misc]
                spec.make_options(**options), channels=channels, num_heads=num_heads, scale=scale, **kwargs
            )
        else:
            raise ValueError(
                f"method {method!r} is a {spec.kind} mechanism; Attention2d takes sequence and vision "
                f"mechanisms (fastattn.AlignmentAttention takes seq2seq ones)"
            )
        if device is not None or dtype is not None:
            block = block.to(device=device, dtype=dtype)
        self.block = block

    @property
    def aux_loss(self) -> Tensor:
        """The mechanism's auxiliary loss from the last forward (zero where it defines none)."""
        return self.block.aux_loss  # type: ignore[return-value]

    def extra_repr(self) -> str:
        return f"channels={self.channels}, method={self.method!r}"

    def _check(self, x: Tensor, mask: Tensor | None) -> None:
        check_feature_map(x, self.channels)
        if mask is not None:
            if not self.spec.padding:
                raise ValueError(f"method {self.method!r} does not support a padding mask (registry padding=False)")
            check_pixel_mask(mask, x)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        self._check(x, mask)
        y = self.block(x, mask)
        return y if mask is None else torch.where(mask[:, None], x, y)

    def reference(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """The same module computed by the mechanism's literal reference (for tests and checks)."""
        self._check(x, mask)
        y = self.block.reference(x, mask)  # type: ignore[operator]
        return y if mask is None else torch.where(mask[:, None], x, y)
