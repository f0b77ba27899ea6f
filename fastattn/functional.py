"""``fastattn.attention``: every parameter-free mechanism behind one call."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor

from .core.base import Mechanism, check_inputs
from .core.dispatch import check_backend_name
from .registry import MethodSpec, get_method

__all__ = ["attention", "clear_cache"]

CACHE_SIZE = 32
_MODULES: OrderedDict[tuple, Mechanism] = OrderedDict()


def clear_cache() -> None:
    """Forget the mechanism modules :func:`attention` keeps between calls."""
    _MODULES.clear()


def _build(spec: MethodSpec, opts: Any, query: Tensor, key: Tensor, generator: torch.Generator | None) -> Mechanism:
    kwargs = {"generator": generator} if spec.randomized else {}
    mech = spec.cls(  # type: ignore[misc]
        opts, head_dim=query.shape[-1], num_heads=query.shape[1], num_kv_heads=key.shape[1], **kwargs
    ).to(query.device)
    if any(True for _ in mech.parameters()):  # an option that adds learned parts (e.g. rfa's gate)
        raise ValueError(
            f"method {spec.name!r} with options {opts} has learned parameters; "
            f"use fastattn.MultiheadAttention(..., method={spec.name!r})"
        )
    return mech


def _module(spec: MethodSpec, opts: Any, query: Tensor, key: Tensor, generator: torch.Generator | None) -> Mechanism:
    """The mechanism module for this call. Deterministic mechanisms are built once per (method, options,
    heads, key/value heads, head dim, device) and kept in a small LRU (so their caches, e.g. sparse
    plans, survive across calls); randomised ones draw anew on every call."""
    if spec.randomized:
        return _build(spec, opts, query, key, generator)
    cache_key = (spec.name, opts, query.shape[1], key.shape[1], query.shape[-1], str(query.device))
    try:
        mech = _MODULES.pop(cache_key)
    except KeyError:
        mech = _build(spec, opts, query, key, None)
    except TypeError:  # options holding an unhashable value: nothing to cache on
        return _build(spec, opts, query, key, None)
    _MODULES[cache_key] = mech
    while len(_MODULES) > CACHE_SIZE:
        _MODULES.popitem(last=False)
    return mech


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
    backend: str = "auto",
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
        generator: random source of randomised mechanisms (features, hashes, random blocks). A
            randomised mechanism draws its random parts anew on **every** call: from ``generator`` when
            given (so re-seeding it reproduces a call), else from torch's global generator (so two calls
            differ unless ``torch.manual_seed`` is reset). To keep one draw across calls, build the
            mechanism once (``fastattn.MultiheadAttention`` or ``fastattn.get_method(m).cls``).
        backend: ``"auto"`` (default), ``"torch"`` (the efficient implementation) or ``"reference"``
            (the paper's formula; no dropout); see :mod:`fastattn.core.dispatch`. A backend that cannot
            take the call is a ``ValueError`` listing why, per backend.
        **options: the mechanism's own options (``fastattn.get_method(m).options`` lists them).

    Returns:
        ``(B, H, Lq, Ev)``.

    Deterministic mechanisms are built once per (method, options, heads, head dim, device) and reused
    from a small cache (:func:`clear_cache` empties it); the inputs are validated once per call.

    Example:
        >>> q = k = v = torch.randn(2, 4, 100, 32)
        >>> fastattn.attention(q, k, v, "flash", is_causal=True, block_q=64).shape
        torch.Size([2, 4, 100, 32])
    """
    spec = get_method(method)
    if spec.kind != "sequence":
        facade = getattr(spec.cls, "facade", None) or {"vision": "Attention2d", "seq2seq": "AlignmentAttention"}.get(
            spec.kind, "its own module"
        )
        raise ValueError(f"method {method!r} is a {spec.kind} mechanism; use fastattn.{facade}(..., method={method!r})")
    if not spec.functional:
        raise ValueError(
            f"method {method!r} has learned parameters; use fastattn.MultiheadAttention(..., method={method!r})"
        )
    if generator is not None and not spec.randomized:
        raise ValueError(f"method {method!r} draws no random numbers; it takes no generator")
    check_backend_name(backend)
    opts = spec.make_options(**options)
    check_inputs(
        spec, query, key, value, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
        is_causal=is_causal, dropout_p=dropout_p,
    )
    return _module(spec, opts, query, key, generator).run_checked(
        query, key, value, key_padding_mask=key_padding_mask, is_causal=is_causal, scale=scale,
        attn_mask=attn_mask, dropout_p=dropout_p, backend=backend,
    )
