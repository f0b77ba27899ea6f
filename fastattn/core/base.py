"""The one class every mechanism derives from, and the input checks every call goes through.

A mechanism is an ``nn.Module`` holding its options and whatever state it owns (random features,
learned projections) as parameters or buffers. It implements, on heads-first tensors
``q (B, H, Lq, E)``, ``k (B, H, Lk, E)``, ``v (B, H, Lk, Ev)`` and a :class:`~fastattn.core.masks.Mask`:

* :meth:`Mechanism.forward` -- the efficient implementation users run;
* :meth:`Mechanism.reference` -- the paper's formula written literally (dense, readable, float64-safe);
* optionally :meth:`Mechanism.weights` (the attention matrix) and :meth:`Mechanism.step` (decoding).

Callers never call ``forward`` directly: :meth:`Mechanism.run` validates the inputs, expands
grouped-query key/value heads (unless the class sets ``native_gqa``), builds the ``Mask`` and
dispatches. ``fastattn.attention`` and ``fastattn.MultiheadAttention`` both go through ``run``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..registry import MethodSpec
from .masks import Mask

__all__ = ["Mechanism", "KVCache", "check_inputs", "repeat_kv", "build_mask"]


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
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            got = key_padding_mask.dtype if isinstance(key_padding_mask, Tensor) else type(key_padding_mask)
            raise TypeError(f"key_padding_mask must be a bool tensor (True = padding), got {got}")
        if tuple(key_padding_mask.shape) != (b, lk):
            raise ValueError(
                f"key_padding_mask must have shape (batch, key_length) = ({b}, {lk}), "
                f"got {_shape(key_padding_mask)}"
            )
        if not spec.padding:
            raise ValueError(f"method {spec.name!r} does not support key_padding_mask")
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


class _KVBuffer:
    """Key/value storage with spare capacity, shared by the caches of one decoding stream; ``filled``
    is the length of the newest cache written into it."""

    def __init__(self, k: Tensor, v: Tensor, capacity: int) -> None:
        b, h, n = k.shape[:3]
        self.k = k.new_empty(b, h, capacity, k.shape[3])
        self.v = v.new_empty(b, h, capacity, v.shape[3])
        self.k[:, :, :n], self.v[:, :, :n] = k, v
        self.filled = n


class KVCache:
    """Decoding state of softmax-family mechanisms: keys and values seen so far ``(B, Hkv, L, E)``
    (``k``, ``v``).

    :meth:`append` writes new tokens into spare capacity (doubling when full), so decoding ``n`` tokens
    copies O(n) elements in all rather than the whole cache per token. A cache never changes once
    made: appending to one that is not the newest of its buffer (a second continuation of the same
    prefix, as in beam search) copies it into a fresh buffer first. Under autograd (inputs that
    require grad) appending concatenates instead, so gradients flow to every cached token."""

    def __init__(self, k: Tensor, v: Tensor, _buffer: _KVBuffer | None = None) -> None:
        self.k, self.v, self._buffer = k, v, _buffer

    @property
    def length(self) -> int:
        return self.k.shape[2]

    def append(self, k: Tensor, v: Tensor) -> KVCache:
        """The cache extended by ``k``, ``v`` ``(B, Hkv, T, E)``."""
        n, t = self.length, k.shape[2]
        if torch.is_grad_enabled() and any(x.requires_grad for x in (k, v, self.k, self.v)):
            return KVCache(torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2))
        buf = self._buffer
        if buf is None or buf.filled != n or buf.k.shape[2] < n + t or buf.k.dtype != k.dtype:
            buf = _KVBuffer(self.k, self.v, capacity=max(2 * n, n + t, 16))
        buf.k[:, :, n:n + t], buf.v[:, :, n:n + t] = k, v
        buf.filled = n + t
        return KVCache(buf.k[:, :, :n + t], buf.v[:, :, :n + t], buf)


class Mechanism(nn.Module):
    """Base class of every attention mechanism. See the module docstring for the contract."""

    spec: ClassVar[MethodSpec]
    native_gqa: ClassVar[bool] = False  # True: forward receives k/v with Hkv heads, not expanded
    # Options the contract tests use so that small inputs still exercise the interesting paths
    # (several blocks/chunks at length 61, few features, ...).
    test_options: ClassVar[dict[str, Any]] = {}
    # Where the mechanism knowingly departs from its paper (or the authors' code): one short sentence
    # each; the README's "Deviations from the papers" section is generated from these.
    deviations: ClassVar[tuple[str, ...]] = ()

    @dataclass(frozen=True)
    class Options:
        pass

    def __init__(
        self,
        options: Any = None,
        *,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if options is None:
            options = self.spec.make_options()
        elif isinstance(options, dict):
            options = self.spec.make_options(**options)
        self.options = options
        self.head_dim = head_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        self.aux_loss: Tensor = torch.zeros(())

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(self.options).items())
        return f"{self.spec.name}: heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}" + (
            f", {opts}" if opts else ""
        )

    # ---- to implement ---------------------------------------------------------------------------
    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, dropout_p: float = 0.0) -> Tensor:
        raise NotImplementedError

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
        """The paper's formula, literally. Defaults to ``forward``; override where they differ."""
        return self.forward(q, k, v, mask, scale)

    def weights(self, q: Tensor, k: Tensor, mask: Mask, scale: float) -> Tensor | None:
        """The attention matrix ``(B, H, Lq, Lk)`` where the mechanism has one, else ``None``."""
        return None

    def step(self, q: Tensor, k: Tensor, v: Tensor, state: Any, scale: float) -> tuple[Tensor, Any]:
        """Decode ``T`` new tokens (``q, k, v`` of length ``T``, k/v with Hkv heads) given ``state``
        (``None`` at the start). Default: a KV cache and the causal forward over it."""
        cache = KVCache(k, v) if state is None else state.append(k, v)
        out = self.run(q, cache.k, cache.v, is_causal=True, scale=scale)
        return out, cache

    # ---- the single entry point -----------------------------------------------------------------
    def run(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
        scale: float | None = None,
        attn_mask: Tensor | None = None,
        dropout_p: float = 0.0,
        reference: bool = False,
    ) -> Tensor:
        """Validate, expand grouped-query heads, build the mask and dispatch to the implementation."""
        check_inputs(
            self.spec, q, k, v, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
            is_causal=is_causal, dropout_p=dropout_p,
        )
        if q.shape[1] != self.num_heads or k.shape[1] != self.num_kv_heads:
            raise ValueError(
                f"this {self.spec.name!r} module was built for {self.num_heads} query / "
                f"{self.num_kv_heads} key-value heads, got {q.shape[1]} / {k.shape[1]}"
            )
        if q.shape[3] != self.head_dim:
            raise ValueError(f"this module was built for head_dim={self.head_dim}, got {q.shape[3]}")
        scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
        if not self.native_gqa:
            groups = q.shape[1] // k.shape[1]
            k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        mask = build_mask(q, k, key_padding_mask, attn_mask, is_causal)
        if reference:
            return self.reference(q, k, v, mask, scale)
        return self.forward(q, k, v, mask, scale, dropout_p)

    def attention_weights(
        self, q: Tensor, k: Tensor, *, key_padding_mask: Tensor | None = None, is_causal: bool = False,
        scale: float | None = None, attn_mask: Tensor | None = None,
    ) -> Tensor | None:
        if not self.spec.weights:
            return None
        scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
        if not self.native_gqa:
            k = repeat_kv(k, q.shape[1] // k.shape[1])
        return self.weights(q, k, build_mask(q, k, key_padding_mask, attn_mask, is_causal), scale)
