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
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from .checks import build_mask, check_inputs, repeat_kv
from .masks import Mask
from .state import KVCache

if TYPE_CHECKING:
    from ..registry import MethodSpec

__all__ = ["Mechanism", "KVCache", "check_inputs", "repeat_kv", "build_mask"]


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
