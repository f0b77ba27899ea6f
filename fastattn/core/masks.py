"""Masks as small objects that say what they are, and the masked softmax every mechanism shares.

Conventions (one for the whole library):

* ``key_padding_mask`` is bool ``(B, Lk)``; **True marks a padding key** that must be ignored
  (as in ``torch.nn.MultiheadAttention``).
* A boolean ``attn_mask`` also uses **True = may not attend**; a float ``attn_mask`` is added to the
  scores. Both are turned into one additive ``bias`` here.
* Causal masking is aligned bottom-right: with ``Lq`` queries and ``Lk`` keys, query ``i`` sits at
  absolute position ``Lk - Lq + i`` and sees keys ``0 .. Lk - Lq + i``. For ``Lq == Lk`` this is the
  usual lower triangle; for ``Lq < Lk`` it is what incremental decoding over a cache needs.
* A query row whose keys are all masked returns zeros, never NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Mask", "finite_or_zero", "masked_softmax", "safe_rowmax", "softmax_stats", "NEG_INF"]

NEG_INF = float("-inf")


@dataclass(frozen=True)
class Mask:
    """Everything that restricts which keys a query may see, for one call.

    ``lq``/``lk``: query and key lengths. ``key_padding``: bool ``(B, Lk)``, True = ignore.
    ``causal``: bottom-right aligned causal mask. ``bias``: float, broadcastable to ``(B, H, Lq, Lk)``.
    """

    lq: int
    lk: int
    key_padding: Tensor | None = None
    causal: bool = False
    bias: Tensor | None = None

    @property
    def offset(self) -> int:
        """Absolute position of query 0 under the causal alignment (``Lk - Lq``)."""
        return self.lk - self.lq

    @property
    def is_trivial(self) -> bool:
        return self.key_padding is None and not self.causal and self.bias is None

    def query_positions(self, device: torch.device, q0: int = 0, q1: int | None = None) -> Tensor:
        q1 = self.lq if q1 is None else q1
        return torch.arange(q0, q1, device=device) + self.offset

    # ----- dense / blockwise views -------------------------------------------------------------
    def allowed(
        self, device: torch.device, q0: int = 0, q1: int | None = None, k0: int = 0, k1: int | None = None
    ) -> Tensor | None:
        """Bool ``(B|1, 1, q1-q0, k1-k0)``, True where attending is allowed (causal and padding only;
        ``bias`` is separate). ``None`` when nothing is masked in this block."""
        q1 = self.lq if q1 is None else q1
        k1 = self.lk if k1 is None else k1
        out = None
        if self.causal and k1 - 1 > q0 + self.offset:  # some key in the block is in some query's future
            qpos = torch.arange(q0, q1, device=device)[:, None] + self.offset
            kpos = torch.arange(k0, k1, device=device)[None, :]
            out = (kpos <= qpos)[None, None]
        if self.key_padding is not None:
            keep = ~self.key_padding[:, None, None, k0:k1]
            out = keep if out is None else out & keep
        return out

    def additive(
        self, dtype: torch.dtype, device: torch.device,
        q0: int = 0, q1: int | None = None, k0: int = 0, k1: int | None = None,
    ) -> Tensor | None:
        """Float bias for the block (``-inf`` where masked, plus the user's ``bias``), or ``None``."""
        q1 = self.lq if q1 is None else q1
        k1 = self.lk if k1 is None else k1
        allowed = self.allowed(device, q0, q1, k0, k1)
        out = None
        if allowed is not None:
            out = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, NEG_INF)
        if self.bias is not None:
            b = self.bias  # broadcast dimensions (size 1) are kept whole, the others sliced
            b = b if b.dim() < 2 or b.shape[-2] == 1 else b[..., q0:q1, :]
            b = (b if b.shape[-1] == 1 else b[..., k0:k1]).to(dtype)
            out = b if out is None else out + b
        return out

    def block_is_empty(self, q0: int, q1: int, k0: int) -> bool:
        """True when causal masking hides every key from ``k0`` on from every query in ``[q0, q1)``."""
        return self.causal and k0 > q1 - 1 + self.offset

    def key_keep(self, dtype: torch.dtype) -> Tensor | None:
        """``(B, 1, Lk, 1)`` with 1 for real keys and 0 for padding keys (for kernel mechanisms
        that remove padding by zeroing the keys' features)."""
        if self.key_padding is None:
            return None
        return (~self.key_padding)[:, None, :, None].to(dtype)


def safe_rowmax(scores: Tensor, dim: int = -1) -> Tensor:
    """Max over ``dim`` (kept) with all-masked (``-inf``) rows replaced by 0, detached."""
    return finite_or_zero(scores.detach().amax(dim=dim, keepdim=True))


def finite_or_zero(x: Tensor) -> Tensor:
    """``x`` with its infinite entries replaced by 0."""
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def softmax_stats(scores: Tensor) -> tuple[Tensor, Tensor]:
    """Row max (see :func:`safe_rowmax`) and ``exp(scores - max)`` for a safe softmax."""
    m = safe_rowmax(scores)
    return m, torch.exp(scores - m)


def masked_softmax(scores: Tensor, bias: Tensor | None = None, dim: int = -1) -> Tensor:
    """Softmax over ``dim`` after adding ``bias`` (``-inf`` = masked). All-masked rows give zeros.

    Half-precision scores are computed in float32 and cast back.
    """
    orig = scores.dtype
    if orig in (torch.float16, torch.bfloat16):
        scores = scores.float()
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    if dim != -1:
        scores = scores.transpose(dim, -1)
    _, e = softmax_stats(scores)
    denom = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(denom > 0, denom, torch.ones_like(denom))
    if dim != -1:
        p = p.transpose(dim, -1)
    return p.to(orig)
