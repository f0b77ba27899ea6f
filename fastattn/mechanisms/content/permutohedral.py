"""The Permutohedral Attention Module (Joutard et al., 2019, arXiv:1907.00641): "Permutohedral Attention
Module for Efficient Non-Local Neural Networks".

A non-local block whose pairwise weights are a Gaussian kernel of a learned low-dimensional embedding,
so that the whole aggregation is a Gaussian filter in feature space::

    f_i = LeakyReLU(W_f [x_i; s pos_i])          (d_f channels: the feature extractor, pixel coordinates
                                                   concatenated, scaled by s = position_scale)
    g_j = W_g x_j                                (the descriptor extractor, C_v channels)
    y_i = sum_j k(f_i, f_j) g_j / sum_j k(f_i, f_j),     k(f_i, f_j) = exp(-||f_i - f_j||^2 / 2)
    z_i = x_i + W_z y_i                          (W_z zero-initialised: the block starts as the identity)

Equivalently ``y = softmax(f f^T + bias_j) g`` with scale 1 and key bias ``-||f_j||^2 / 2`` (the
``||f_i||^2`` term is constant along a row and cancels): :meth:`PermutohedralAttention.exact` computes
that with the library's dense attention, ``O(N^2)``.

The module never forms the ``N x N`` kernel: numerator and normaliser (the filter of ``[g; 1]``) are
computed by Gaussian filtering on the permutohedral lattice (:mod:`fastattn.ops.permutohedral`: splat,
blur, slice), ``O(N d_f (C_v + d_f))`` plus the lattice points. The lattice only approximates the
Gaussian (a few percent at ``refine = 1``); ``refine`` makes the lattice finer and the approximation
converge to the exact kernel, at ``refine^2`` times the blur passes. The efficient path scatters and
gathers (:func:`~fastattn.ops.permutohedral.lattice_filter`); the reference
(:meth:`PermutohedralAttention.reference`) is the same lattice filter as dense splat, blur and slice
matrices. Gradients with respect to ``f`` flow through the barycentric weights (the exact gradient of
the approximate filter; the simplex each pixel falls in is piecewise constant).

Padding (``mask``): padding pixels are not splatted, so they neither give nor receive. Pixel
coordinates are absolute (row, column) indices, so a padded image equals its crop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastattn.core.masks import Mask
from fastattn.core.vision import VisionMechanism, flatten_pixels, key_padding, unflatten_pixels
from fastattn.ops.permutohedral import lattice_filter, lattice_filter_dense
from fastattn.ops.softmax.dense import dense_attention
from fastattn.registry import register

__all__ = ["PermutohedralAttention"]

_MAX_FEATURE_DIM = 8  # the lattice grows quickly with the dimension


@register(
    "permutohedral", complexity="O(HW d_f (C + d_f))", causal=False, decoding=False, padding=True,
    time_growth=1.0, memory_growth=1.0,
)
class PermutohedralAttention(VisionMechanism):
    """Gaussian-kernel non-local block filtered on the permutohedral lattice (see the module docstring)."""

    test_options = {"feature_dim": 2}
    deviations = (
        (
            "Lattice blur on the closure of the occupied points (the exact binomial blur of the infinite "
            "lattice, not one truncated to occupied points); feature gradient = autograd through the "
            "barycentric weights; option refine (finer lattice) not in the paper."
        ),
    )

    @dataclass(frozen=True)
    class Options:
        feature_dim: int = 3  # d_f, the embedding the Gaussian kernel acts on (at most 8)
        value_channels: int | None = None  # C_v (default: channels)
        position_scale: float = 0.1  # s: pixel (row, column) indices concatenated to x, times s; 0 = none
        refine: int = 1  # lattice refinement: 1 = the standard lattice; larger approaches the exact Gaussian

        def __post_init__(self) -> None:
            if not 1 <= self.feature_dim <= _MAX_FEATURE_DIM:
                raise ValueError(f"feature_dim must be in [1, {_MAX_FEATURE_DIM}], got {self.feature_dim}")
            if self.value_channels is not None and self.value_channels < 1:
                raise ValueError(f"value_channels must be positive, got {self.value_channels}")
            if self.position_scale < 0:
                raise ValueError(f"position_scale must be >= 0, got {self.position_scale}")
            if self.refine < 1:
                raise ValueError(f"refine must be >= 1, got {self.refine}")

    def __init__(self, options=None, *, channels: int, num_heads: int = 1, scale: float | None = None) -> None:
        if scale is not None or num_heads != 1:
            raise ValueError("permutohedral has a fixed Gaussian kernel and no heads; do not pass scale= or num_heads=")
        super().__init__(options, channels=channels, num_heads=num_heads, scale=scale)
        o = self.options
        cv = o.value_channels or channels
        extra = 2 if o.position_scale > 0 else 0
        self.features = nn.Conv2d(channels + extra, o.feature_dim, 1)
        self.values = nn.Conv2d(channels, cv, 1)
        self.out = nn.Conv2d(cv, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def embed(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``f (B, HW, d_f)`` and ``[g; 1] (B, HW, C_v + 1)``, pixels row-major."""
        b, _, hh, ww = x.shape
        inp = x
        if self.options.position_scale > 0:
            rows = torch.arange(hh, dtype=x.dtype, device=x.device)[:, None].expand(hh, ww)
            cols = torch.arange(ww, dtype=x.dtype, device=x.device)[None, :].expand(hh, ww)
            pos = torch.stack([rows, cols])[None].expand(b, -1, -1, -1) * self.options.position_scale
            inp = torch.cat([x, pos], dim=1)
        f = flatten_pixels(nn.functional.leaky_relu(self.features(inp), 0.01))
        g = flatten_pixels(self.values(x))
        return f, torch.cat([g, torch.ones_like(g[..., :1])], dim=-1)

    def _out(self, x: Tensor, filtered: Tensor) -> Tensor:
        y = filtered[..., :-1] / filtered[..., -1:].clamp_min(torch.finfo(filtered.dtype).tiny)
        return x + self.out(unflatten_pixels(y, x.shape[2], x.shape[3]))

    @staticmethod
    def _keep(mask: Tensor | None) -> Tensor | None:
        return None if mask is None else ~mask.flatten(1)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        f, g1 = self.embed(x)
        return self._out(x, lattice_filter(f, g1, self._keep(mask), self.options.refine))

    def reference(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        f, g1 = self.embed(x)
        return self._out(x, lattice_filter_dense(f, g1, self._keep(mask), self.options.refine))

    def exact(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """The block with the exact Gaussian kernel (what the lattice approximates), as softmax attention
        with ``q = k = f``, scale 1 and key bias ``-||f_j||^2 / 2``; ``O(N^2)``."""
        f, g1 = self.embed(x)
        n = f.shape[1]
        bias = (-0.5 * f.square().sum(-1))[:, None, None, :]  # (B, 1, 1, N)
        y = dense_attention(f[:, None], f[:, None], g1[:, None, :, :-1], Mask(n, n, key_padding=key_padding(mask)),
                            1.0, extra_bias=bias)[:, 0]
        return x + self.out(unflatten_pixels(y, x.shape[2], x.shape[3]))
