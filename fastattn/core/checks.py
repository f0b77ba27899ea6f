"""Input validation shared by every entry point, the grouped-query head expansion and the ``Mask`` built
from a call's masks."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .masks import Mask

if TYPE_CHECKING:
    from ..registry import MethodSpec

__all__ = ["check_inputs", "check_key_padding", "check_table_length", "repeat_kv", "build_mask"]


def repeat_kv(x: Tensor, groups: int) -> Tensor:
    """``(B, Hkv, L, E) -> (B, Hkv * groups, L, E)``: each key/value head serves ``groups`` query heads."""
    if groups == 1:
        return x
    b, h, n, e = x.shape
    return x[:, :, None].expand(b, h, groups, n, e).reshape(b, h * groups, n, e)


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(map(str, t.shape)) + ")"


def check_inputs(
    spec: MethodSpec,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    is_causal: bool,
    dropout_p: float,
) -> None:
    """Raise a ``ValueError``/``TypeError`` naming the problem; return silently when all is well."""
    for name, t in (("query", q), ("key", k), ("value", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be 4-D (batch, heads, length, features), got shape {_shape(t)}"
            )
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"dtype mismatch: query {q.dtype}, key {k.dtype}, value {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"device mismatch: query {q.device}, key {k.device}, value {v.device}")
    b, h, lq, e = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"batch mismatch: query {_shape(q)}, key {_shape(k)}, value {_shape(v)}")
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(
            f"key {_shape(k)} and value {_shape(v)} must share heads and length (B, Hkv, Lk, .)"
        )
    hkv, lk = k.shape[1], k.shape[2]
    if h % hkv != 0:
        raise ValueError(
            f"head mismatch: query has {h} heads, which is not a multiple of the {hkv} key/value heads"
        )
    if k.shape[3] != e:
        raise ValueError(f"feature dimension mismatch: query has E={e}, key has E={k.shape[3]}")
    if lq == 0 or lk == 0:
        raise ValueError(f"empty sequence: query length {lq}, key length {lk}")
    check_key_padding(spec, key_padding_mask, b, lk)
    if attn_mask is not None:
        if not spec.attn_mask:
            raise ValueError(
                f"method {spec.name!r} does not support attn_mask (it would be ignored); "
                f"use key_padding_mask / is_causal, or a method with attn_mask support"
            )
        if not isinstance(attn_mask, Tensor) or not (
            attn_mask.dtype == torch.bool or attn_mask.is_floating_point()
        ):
            raise TypeError("attn_mask must be a bool (True = masked) or floating-point tensor")
        try:
            torch.broadcast_shapes(tuple(attn_mask.shape), (b, h, lq, lk))
        except RuntimeError:
            raise ValueError(
                f"attn_mask of shape {_shape(attn_mask)} does not broadcast to "
                f"(batch, heads, Lq, Lk) = ({b}, {h}, {lq}, {lk})"
            ) from None
        if attn_mask.dim() > 4:
            raise ValueError(f"attn_mask must have at most 4 dimensions, got {_shape(attn_mask)}")
    if is_causal:
        if not spec.causal:
            raise ValueError(
                f"method {spec.name!r} has no causal form; is_causal=True would leak the future. "
                f"Causal methods: see fastattn.methods() with causal=True"
            )
        if lq > lk:
            raise ValueError(f"is_causal needs query length <= key length, got {lq} > {lk}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0 and not spec.dropout:
        raise ValueError(f"method {spec.name!r} does not support attention dropout")


def check_key_padding(
    spec: MethodSpec, key_padding_mask: Tensor | None, batch: int, length: int, what: str = "(batch, key_length)"
) -> None:
    """``key_padding_mask`` is ``None`` or bool ``(batch, length)``, and the method honours padding."""
    if key_padding_mask is None:
        return
    if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
        got = key_padding_mask.dtype if isinstance(key_padding_mask, Tensor) else type(key_padding_mask)
        raise TypeError(f"key_padding_mask must be a bool tensor (True = padding), got {got}")
    if tuple(key_padding_mask.shape) != (batch, length):
        raise ValueError(
            f"key_padding_mask must have shape {what} = ({batch}, {length}), got {_shape(key_padding_mask)}"
        )
    if not spec.padding:
        raise ValueError(f"method {spec.name!r} does not support key_padding_mask")


def check_table_length(n: int, max_length: int, what: str) -> None:
    """A ``ValueError`` naming the option ``max_length`` when a length ``n`` exceeds a length-tied table
    (learned length projections, synthesized rows): never a silent slice past the table's end."""
    if n > max_length:
        raise ValueError(f"{what} {n} exceeds max_length={max_length}; build the mechanism with max_length >= {n}")


def build_mask(
    q: Tensor, k: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None, is_causal: bool
) -> Mask:
    bias = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            bias = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(
                attn_mask, float("-inf")
            )
        else:
            bias = attn_mask.to(q.dtype)
    return Mask(lq=q.shape[2], lk=k.shape[2], key_padding=key_padding_mask, causal=is_causal, bias=bias)
