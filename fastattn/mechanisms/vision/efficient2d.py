"""The efficient attention module (Shen et al., 2018/2021, arXiv:1812.01243): "Efficient Attention:
Attention with Linear Complexities" -- the drop-in replacement of the non-local block.

1x1 convolutions give keys and queries (``key_channels``) and values (``value_channels``) over the
pixels, split into ``num_heads`` heads (the paper's ``head_count``). Per head, efficient attention
(the sequence mechanism ``efficient``, :mod:`fastattn.mechanisms.kernel.efficient`, whose math this
module reuses)::

    E = rho_q(Q) (rho_k(K)^T V)

with ``normalization="softmax"`` (the default): ``rho_q`` a softmax over each query's channels and
``rho_k`` a softmax over the **positions** for each key channel (padding pixels take no share); or
``normalization="scaling"``: ``rho_q(Y) = rho_k(Y) = Y / sqrt(N)`` (``N`` real pixels), which makes the
module *exactly* the non-local block's dot-product form ``(Q K^T / N) V``. The heads are concatenated,
reprojected by a 1x1 convolution (``value_channels -> channels``) and added to the input (residual).

The ``d_k x d_v`` context ``rho_k(K)^T V`` is formed first: ``O(HW d_k d_v)`` time and ``O(HW (d_k +
d_v))`` memory, linear in the number of pixels. The reference (:meth:`EfficientAttention2d.reference`)
forms the ``HW x HW`` matrix ``rho_q(Q) rho_k(K)^T`` first, the other association.

Defaults: ``key_channels = value_channels = channels // 2`` (the non-local block's width; the paper
sets them per network), PyTorch's default initialisation of the four convolutions (as the authors' code;
zeroing the reprojection makes the module the identity). Multiple heads are in the authors' code, not
the paper. There is no score scale (the paper has none): ``scale=`` is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from fastattn.core.vision import VisionMechanism, key_padding, pixel_heads, unpixel_heads
from fastattn.registry import get_method, register

__all__ = ["EfficientAttention2d"]


@register(
    "efficient2d", complexity="O(HW d_k d_v)", causal=False, decoding=False, padding=True,
    time_growth=1.0, memory_growth=1.0,
)
class EfficientAttention2d(VisionMechanism):
    """Efficient attention over the pixels with reprojection and residual (see the module docstring)."""

    @dataclass(frozen=True)
    class Options:
        key_channels: int | None = None  # channels of Q and K (default channels // 2)
        value_channels: int | None = None  # channels of V (default channels // 2)
        normalization: str = "softmax"  # "softmax" | "scaling"

        def __post_init__(self) -> None:
            get_method("efficient").make_options(normalization=self.normalization)  # validates it
            for name in ("key_channels", "value_channels"):
                value = getattr(self, name)
                if value is not None and (not isinstance(value, int) or value < 1):
                    raise ValueError(f"{name} must be a positive integer, got {value!r}")

    def __init__(self, options=None, *, channels: int, num_heads: int = 1, scale: float | None = None) -> None:
        if scale is not None:
            raise ValueError("efficient2d has no score scale (the paper uses none); do not pass scale=")
        super().__init__(options, channels=channels, num_heads=num_heads, scale=scale)
        opt = self.options
        dk = channels // 2 if opt.key_channels is None else opt.key_channels
        dv = channels // 2 if opt.value_channels is None else opt.value_channels
        if dk < 1 or dv < 1 or dk % num_heads or dv % num_heads:
            raise ValueError(
                f"efficient2d: key_channels ({dk}) and value_channels ({dv}) must be positive multiples of "
                f"num_heads ({num_heads}); pass key_channels= / value_channels="
            )
        self.key_channels, self.value_channels = dk, dv
        self.keys = nn.Conv2d(channels, dk, 1)
        self.queries = nn.Conv2d(channels, dk, 1)
        self.values = nn.Conv2d(channels, dv, 1)
        self.reprojection = nn.Conv2d(dv, channels, 1)
        spec = get_method("efficient")
        self.attn = spec.cls(  # type: ignore[misc]
            spec.make_options(normalization=opt.normalization), head_dim=dk // num_heads, num_heads=num_heads
        )

    def dims(self) -> str:
        return f"{super().dims()}, key_channels={self.key_channels}, value_channels={self.value_channels}"

    def forward(self, x: Tensor, mask: Tensor | None = None, *, reference: bool = False) -> Tensor:
        q, k, v = (pixel_heads(p(x), self.num_heads) for p in (self.queries, self.keys, self.values))
        out = self.attn.run(q, k, v, key_padding_mask=key_padding(mask), reference=reference)
        return x + self.reprojection(unpixel_heads(out, x.shape[2], x.shape[3]))

    def reference(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.forward(x, mask, reference=True)
