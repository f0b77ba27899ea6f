"""The non-local block (Wang et al., 2018, arXiv:1711.07971): "Non-local Neural Networks".

``y_i = (1 / C(x)) sum_j f(x_i, x_j) g(x_j)`` over every pixel ``j`` of the feature map, then
``z = W_z y + x`` (residual). ``g``, ``theta``, ``phi`` are 1x1 convolutions to ``C / reduction``
channels (``reduction = 2`` in the paper); ``W_z`` is a 1x1 convolution back to ``C``. Pairwise
functions (option ``f``):

* ``"embedded_gaussian"`` (default, the paper's main form): ``f = exp(theta(x_i) . phi(x_j))``,
  ``C(x) = sum_j f``: a softmax over positions **without** the ``1 / sqrt(d)`` of scaled dot-product
  attention (``scale=`` overrides the score scale, default 1);
* ``"gaussian"``: ``f = exp(x_i . x_j)`` on the input itself (no ``theta`` / ``phi``);
* ``"dot"``: ``f = theta(x_i) . phi(x_j)``, ``C(x) = N``, the number of (real, sub-sampled) keys.

(The paper's concatenation form is not implemented.) ``subsample=True`` max-pools ``phi`` and ``g`` 2x2
(stride 2) after their convolutions, as the paper does to cut the keys by 4; an odd edge keeps a 1-wide
last cell (``ceil``), and a cell of padding pixels only is a padding key.

Normalisation of ``W_z y`` (option ``norm``): the paper puts a BatchNorm after ``W_z`` with its scale
initialised to 0, so the block starts as the identity (``norm="batch"``). BatchNorm in training mode
mixes the statistics of the images of a batch -- one image's output depends on the others, and on
padding pixels -- so the default is ``norm="none"``: ``W_z`` itself is initialised to zero, which starts
the block as the identity in the same way (the paper's alternative for its no-BN variants). In eval mode
the BatchNorm is a per-channel affine map and the block is batch-independent again. ``norm="batch"``
refuses a padding mask in training mode (its statistics would include padding pixels).

Efficient path (:meth:`NonLocal.forward`): the (embedded) Gaussian forms run the exact tiled softmax op
(:func:`~fastattn.ops.softmax.flash.flash_attention`: online softmax over ``block x block`` tiles,
recomputing backward), so no ``HW x HW`` tensor is stored: ``O((HW)^2 C)`` time, ``O(HW C)`` memory.
The dot form is linear attention without normaliser, ``theta (phi^T g) / N``
(:func:`~fastattn.ops.linear.engine.linear_attention`), ``O(HW C^2)``. Reference
(:meth:`NonLocal.reference`): the dense ``HW x HW`` formula.

Multi-head (an extension; the paper has one head): the ``C / reduction`` channels of ``theta, phi, g``
are split into ``num_heads`` groups, each with its own softmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastattn.core.masks import Mask
from fastattn.core.vision import VisionMechanism, batch_norm, key_padding, masked_max_pool2, pixel_heads, unpixel_heads
from fastattn.ops.features import real_key_count
from fastattn.ops.linear.engine import linear_attention
from fastattn.ops.softmax.dense import dense_attention
from fastattn.ops.softmax.flash import flash_attention
from fastattn.registry import register

__all__ = ["NonLocal"]

_PAIRWISE = ("embedded_gaussian", "gaussian", "dot")
_NORMS = ("none", "batch")


@register(
    "nonlocal", complexity="O((HW)^2 C) time, O(HW C) memory", causal=False, decoding=False, padding=True,
    time_growth=2.0, memory_growth=1.0,
)
class NonLocal(VisionMechanism):
    """The non-local block (see the module docstring)."""

    test_options = {"block": 8}  # several softmax tiles at the tests' 5 x 7 maps
    deviations = (
        (
            "No BatchNorm after W_z by default (norm='none', W_z zero-initialised, the block starts as the "
            "identity as with the paper's zero-scale BN); norm='batch' is the paper's, batch-dependent in training."
        ),
        "The concatenation pairwise function is not implemented; sub-sampling pools odd edges as 1-wide cells.",
    )

    @dataclass(frozen=True)
    class Options:
        f: str = "embedded_gaussian"  # "embedded_gaussian" | "gaussian" | "dot"
        reduction: int = 2  # theta / phi / g channels = channels // reduction
        subsample: bool = False  # 2x2 max pooling of phi and g (keys / 4)
        norm: str = "none"  # "none" (W_z zero-initialised) | "batch" (BN after W_z, scale 0)
        block: int = 1024  # softmax tile size of the efficient path

        def __post_init__(self) -> None:
            if self.f not in _PAIRWISE:
                raise ValueError(f"f must be one of {_PAIRWISE}, got {self.f!r}")
            if self.norm not in _NORMS:
                raise ValueError(f"norm must be one of {_NORMS}, got {self.norm!r}")
            if self.reduction < 1 or self.block < 1:
                raise ValueError(f"reduction ({self.reduction}) and block ({self.block}) must be >= 1")

    def __init__(self, options=None, *, channels: int, num_heads: int = 1, scale: float | None = None) -> None:
        super().__init__(options, channels=channels, num_heads=num_heads, scale=scale)
        opt = self.options
        inner = channels // opt.reduction
        if inner < 1 or inner % num_heads:
            raise ValueError(
                f"nonlocal: inner channels = channels ({channels}) // reduction ({opt.reduction}) = {inner} "
                f"must be a positive multiple of num_heads ({num_heads})"
            )
        if opt.f == "gaussian" and channels % num_heads:
            raise ValueError(f"nonlocal: f='gaussian' splits the channels ({channels}) into num_heads ({num_heads})")
        self.inner = inner
        if opt.f != "gaussian":
            self.theta = nn.Conv2d(channels, inner, 1)
            self.phi = nn.Conv2d(channels, inner, 1)
        self.g = nn.Conv2d(channels, inner, 1)
        self.w_z = nn.Conv2d(inner, channels, 1)
        if opt.norm == "batch":
            self.bn = nn.BatchNorm2d(channels)
            nn.init.zeros_(self.bn.weight)
        else:
            nn.init.zeros_(self.w_z.weight)
            nn.init.zeros_(self.w_z.bias)

    @property
    def score_scale(self) -> float:
        return 1.0 if self.scale is None else float(self.scale)

    def embed(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Mask]:
        """``theta, phi, g`` as heads over pixels ``(B, h, N, d)`` and the keys' mask (sub-sampled)."""
        gaussian = self.options.f == "gaussian"
        theta = x if gaussian else self.theta(x)
        phi = x if gaussian else self.phi(x)
        g, kmask = self.g(x), mask
        if self.options.subsample:
            phi, kmask = masked_max_pool2(phi, mask)
            g, _ = masked_max_pool2(g, mask)
        q, k, v = (pixel_heads(t, self.num_heads) for t in (theta, phi, g))
        return q, k, v, Mask(q.shape[2], k.shape[2], key_padding=key_padding(kmask))

    def _out(self, y: Tensor, x: Tensor, mask: Tensor | None) -> Tensor:
        z = self.w_z(unpixel_heads(y, x.shape[2], x.shape[3]))
        if self.options.norm == "batch":
            z = batch_norm(self.bn, z, mask, "nonlocal (norm='batch')")
        return x + z

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        q, k, v, m = self.embed(x, mask)
        if self.options.f == "dot":
            n = real_key_count(m, k.shape[0], k.shape[2], k.dtype, k.device).clamp_min(1.0)
            y = linear_attention(q * self.score_scale, k / n, v, m, normalize=False)
        else:
            y = flash_attention(q, k, v, m, self.score_scale, block_q=self.options.block, block_k=self.options.block)
        return self._out(y, x, mask)

    def reference(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        q, k, v, m = self.embed(x, mask)
        if self.options.f == "dot":
            f = torch.matmul(q, k.transpose(-1, -2)) * self.score_scale  # (B, h, HW, N)
            if m.key_padding is not None:
                f = f.masked_fill(m.key_padding[:, None, None, :], 0.0)
            n = (~m.key_padding).sum(-1).clamp_min(1) if m.key_padding is not None else torch.tensor(k.shape[2])
            y = torch.matmul(f / n.to(f.dtype).reshape(-1, 1, 1, 1), v)
        else:
            y = dense_attention(q, k, v, m, self.score_scale)
        return self._out(y, x, mask)
