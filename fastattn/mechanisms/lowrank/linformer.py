"""Linformer (Wang et al., 2020, arXiv:2006.04768): self-attention with linear complexity.

Keys and values are projected along the *length* by learned matrices ``E, F (k x n_max)``, sliced to
the key length ``n``: ``K' = E[:, :n] K``, ``V' = F[:, :n] V`` (``k x d`` each), then ordinary softmax
attention of the ``n`` queries over the ``k`` projected keys: ``out = softmax(s Q K'^T) V'``. O(n k d)
time and O(n k) memory.

* Sharing: ``share="headwise"`` (the paper's and the peer's default: one ``E``, one ``F`` for all heads),
  ``"key_value"`` (one matrix, ``E = F``, for all heads) or ``"none"`` (``E``, ``F`` per key/value head).
  With grouped-query heads the ``Hkv`` key/value heads are projected before they are repeated.
* ``max_length`` is ``n_max``: a key length beyond it is a ``ValueError`` naming the option (the table is
  never silently sliced past its end).
* Padding: padded keys and values are zeroed *before* the projection, so they never matter. The
  projection still mixes positions: a right-padded sequence equals the unpadded one with ``E[:, :n_valid]``,
  but left padding is not equivalent to a shorter sequence (the real tokens meet other columns of ``E``).
* No causal form (every projected key mixes the whole sequence): ``is_causal=True`` is refused; no decoding.
* Initialisation as the peer (``linformer==0.2.3``): uniform in ``(-1/sqrt(k), 1/sqrt(k))``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from fastattn.core.base import Mechanism, repeat_kv
from fastattn.core.checks import check_table_length
from fastattn.core.masks import Mask
from fastattn.ops.softmax.dense import dense_attention
from fastattn.registry import register

__all__ = ["Linformer"]

SHARES = ("headwise", "key_value", "none")


@register(
    "linformer", complexity="O(n k d), n <= max_length (length-tied E, F)", causal=False, decoding=False, padding=True,
    time_growth=1.0, memory_growth=1.0,
)
class Linformer(Mechanism):
    """Keys and values projected to ``k`` rows along the length by learned ``E, F``."""

    native_gqa = True
    test_options: ClassVar[dict[str, Any]] = {"k": 8, "max_length": 64}
    deviations = (
        (
            "Padding, which the paper does not define: padded keys and values are zeroed before the length "
            "projection (they never matter, but left padding is not equivalent to a shorter sequence)."
        ),
    )

    @dataclass(frozen=True)
    class Options:
        k: int = 256  # projected length
        max_length: int = 512  # n_max: the longest key sequence E and F cover
        share: str = "headwise"  # "headwise" | "key_value" | "none"

        def __post_init__(self) -> None:
            if self.k < 1 or self.max_length < 1:
                raise ValueError(f"k and max_length must be >= 1, got k={self.k}, max_length={self.max_length}")
            if self.share not in SHARES:
                raise ValueError(f"share must be one of {SHARES}, got {self.share!r}")

    def __init__(self, options=None, *, head_dim: int, num_heads: int, num_kv_heads: int | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(options, head_dim=head_dim, num_heads=num_heads, num_kv_heads=num_kv_heads)
        o = self.options
        shape = (o.k, o.max_length) if o.share != "none" else (self.num_kv_heads, o.k, o.max_length)
        bound = o.k ** -0.5
        self.e = nn.Parameter(torch.empty(shape).uniform_(-bound, bound))
        self.f = None if o.share == "key_value" else nn.Parameter(torch.empty(shape).uniform_(-bound, bound))

    def projections(self, n: int) -> tuple[Tensor, Tensor]:
        """``E[..., :n]`` and ``F[..., :n]`` as ``(1|Hkv, k, n)``."""
        check_table_length(n, self.options.max_length, "key length")
        e = self.e
        f = self.e if self.f is None else self.f
        if e.dim() == 2:
            e, f = e[None], f[None]
        return e[..., :n], f[..., :n]

    @staticmethod
    def _zero_padding(x: Tensor, mask: Mask) -> Tensor:
        keep = mask.key_keep(x.dtype)
        return x if keep is None else x * keep

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, dropout_p: float = 0.0) -> Tensor:
        mask.require_only("key_padding", op="linformer")
        e, f = self.projections(k.shape[2])
        k, v = self._zero_padding(k, mask), self._zero_padding(v, mask)
        kp = torch.einsum("hpn,bhnd->bhpd", e.to(k.dtype), k)  # on the Hkv heads, then repeated
        vp = torch.einsum("hpn,bhnd->bhpd", f.to(v.dtype), v)
        groups = q.shape[1] // k.shape[1]
        kp, vp = repeat_kv(kp, groups), repeat_kv(vp, groups)
        return dense_attention(q, kp, vp, Mask(q.shape[2], kp.shape[2]), scale)

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
        groups = q.shape[1] // k.shape[1]
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        e, f = self.projections(k.shape[2])
        if e.shape[0] > 1:  # per-head tables follow their key/value head
            e, f = repeat_kv(e[None], groups)[0], repeat_kv(f[None], groups)[0]
        if mask.key_padding is not None:
            real = (~mask.key_padding)[:, None, :, None].to(k.dtype)
            k, v = k * real, v * real
        k_proj = e.to(k.dtype) @ k  # E K: (B, H, k, d)
        v_proj = f.to(v.dtype) @ v  # F V
        return torch.softmax(scale * q @ k_proj.transpose(-1, -2), dim=-1) @ v_proj
