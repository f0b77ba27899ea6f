"""``fastattn.attention``: every parameter-free mechanism behind one call."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .core.base import check_inputs
from .registry import get_method

__all__ = ["attention"]


def attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    method: str = "softmax",
    *,
    key_padding_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    generator: torch.Generator | None = None,
    **options: Any,
) -> Tensor:
    """Attention of ``query`` over ``key``/``value`` with the chosen mechanism.

    Args:
        query: ``(B, H, Lq, E)``.
        key: ``(B, Hkv, Lk, E)`` with ``H % Hkv == 0`` (grouped-query heads).
        value: ``(B, Hkv, Lk, Ev)``.
        method: a registry id (``fastattn.methods()``), default exact ``"softmax"``.
        key_padding_mask: bool ``(B, Lk)``, True marks padding keys, which are ignored.
        is_causal: causal masking aligned bottom-right (query ``i`` sees keys ``<= Lk - Lq + i``);
            a ``ValueError`` for mechanisms without a causal form.
        scale: score scale, default ``E ** -0.5``.
        attn_mask: (extension; mechanisms with ``attn_mask=True``) bool with True = may not attend,
            or float added to the scores; broadcastable to ``(B, H, Lq, Lk)``.
        dropout_p: dropout on the attention weights (mechanisms with ``dropout=True``).
        generator: random source of randomised mechanisms (features, hashes, random blocks).
        **options: the mechanism's own options (``fastattn.get_method(m).options`` lists them).

    Returns:
        ``(B, H, Lq, Ev)``.

    Example:
        >>> q = k = v = torch.randn(2, 4, 100, 32)
        >>> fastattn.attention(q, k, v, "flash", is_causal=True, block_q=64).shape
        torch.Size([2, 4, 100, 32])
    """
    spec = get_method(method)
    if spec.kind != "sequence":
        facade = {"vision": "Attention2d", "seq2seq": "AlignmentAttention"}.get(spec.kind, "its own module")
        raise ValueError(f"method {method!r} is a {spec.kind} mechanism; use fastattn.{facade}(..., method={method!r})")
    if not spec.functional:
        raise ValueError(
            f"method {method!r} has learned parameters; use fastattn.MultiheadAttention(..., method={method!r})"
        )
    if generator is not None and not spec.randomized:
        raise ValueError(f"method {method!r} draws no random numbers; it takes no generator")
    opts = spec.make_options(**options)
    check_inputs(
        spec, query, key, value, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
        is_causal=is_causal, dropout_p=dropout_p,
    )
    kwargs = {"generator": generator} if spec.randomized else {}
    mech = spec.cls(  # type: ignore[misc]
        opts, head_dim=query.shape[-1], num_heads=query.shape[1], num_kv_heads=key.shape[1], **kwargs
    ).to(query.device)
    if any(True for _ in mech.parameters()):  # an option that adds learned parts (e.g. rfa's gate)
        raise ValueError(
            f"method {method!r} with options {options} has learned parameters; "
            f"use fastattn.MultiheadAttention(..., method={method!r})"
        )
    return mech.run(
        query, key, value, key_padding_mask=key_padding_mask, is_causal=is_causal, scale=scale,
        attn_mask=attn_mask, dropout_p=dropout_p,
    )
