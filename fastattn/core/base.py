"""The one class every mechanism derives from, and the input checks every call goes through.

A mechanism is an ``nn.Module`` holding its options and whatever state it owns (random features,
learned projections) as parameters or buffers. It implements, on heads-first tensors
``q (B, H, Lq, E)``, ``k (B, H, Lk, E)``, ``v (B, H, Lk, Ev)`` and a :class:`~fastattn.core.masks.Mask`:

* :meth:`Mechanism.forward` -- the efficient implementation users run;
* :meth:`Mechanism.reference` -- the paper's formula written literally (dense, readable, float64-safe);
* optionally :meth:`Mechanism.weights` (the attention matrix) and :meth:`Mechanism.step` (decoding).

Callers never call ``forward`` directly: :meth:`Mechanism.run` validates the inputs, applies the
half-precision policy (``half_precision``), expands grouped-query key/value heads (unless the class sets
``native_gqa``), builds the ``Mask`` and hands the call to a backend (:mod:`fastattn.core.dispatch`:
``"torch"`` runs ``forward``, ``"reference"`` runs ``reference``). ``fastattn.attention`` and
``fastattn.MultiheadAttention`` both go through it.

Decoding (:meth:`Mechanism.step`) takes the new tokens' ``key_padding_mask`` (e.g. the left padding of
a batch of prompts) and returns a :class:`~fastattn.core.state.DecodingState`; each row of a padded
batch decodes as if it were alone, without its padding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from .checks import build_mask, check_inputs, repeat_kv
from .dispatch import Call, choose_backend
from .masks import Mask
from .registered import Registered
from .state import DecodingState, KVCache

if TYPE_CHECKING:
    pass

__all__ = ["Mechanism", "KVCache", "DecodingState", "check_inputs", "repeat_kv", "build_mask"]

_HALF = (torch.float16, torch.bfloat16)


class Mechanism(Registered):
    """Base class of every attention mechanism. See the module docstring for the contract."""

    native_gqa: ClassVar[bool] = False  # True: forward receives k/v with Hkv heads, not expanded
    # How float16/bfloat16 calls are computed: "upcast" -- ``run`` (and the shipped ``step``s) cast q, k, v
    # to float32 before dispatch and the output back, so implementations only ever see float32/float64;
    # "native" -- the mechanism's implementations take half inputs and accumulate in float32 themselves.
    half_precision: ClassVar[str] = "upcast"
    # True when outputs depend on absolute token positions (position-based sparse patterns, recurrences
    # over the keys): the default ``step`` then decodes rows with different padding separately, so that
    # every row's positions start at its first real token. False: masking padded keys is enough.
    positional: ClassVar[bool] = False
    # True when the output is a discontinuous function of the inputs (content-based selection: a token
    # changes bucket or cluster under rounding), so half-precision checks compare per-row medians.
    discontinuous: ClassVar[bool] = False
    # True when the heads are independent and alike: each head's output depends on that head's q, k, v
    # only, by the same rule in every head (no per-head parameters, buffers, patterns or decays, no
    # normalisation across heads), so a module of fewer heads with the same buffers computes any subset
    # of the heads. Ulysses sequence parallelism (head sharding) requires it. A class whose heads differ
    # declares False (a property where its options decide).
    heads_independent: ClassVar[bool] = True
    # The layer ``MultiheadAttention(method=<this id>)`` builds, where the paper's layer does more than
    # project, attend and project back (a gate computed from the layer input, two attention stages with
    # their own projections): a :class:`~fastattn.core.layer.ProjectedAttention` subclass taking the same
    # ``Options(core=<this id>, core_options=...)``. ``None``: the standard layer. The id stays
    # sequence-level (and functional where it owns no parameters); the layer contract suite also runs
    # on these layers, with ``layer_test_options``.
    layer_form: ClassVar[type | None] = None
    layer_test_options: ClassVar[dict[str, Any] | None] = None  # None: the class's test_options

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.half_precision not in ("upcast", "native"):
            raise TypeError(f"{cls.__name__}.half_precision must be 'upcast' or 'native', got {cls.half_precision!r}")

    def __init__(
        self,
        options: Any = None,
        *,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(options)
        self.head_dim = head_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads

    def dims(self) -> str:
        return f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}"

    # ---- to implement ---------------------------------------------------------------------------
    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, dropout_p: float = 0.0) -> Tensor:
        raise NotImplementedError

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
        """The paper's formula, literally. Defaults to ``forward``; override where they differ."""
        return self.forward(q, k, v, mask, scale)

    def weights(self, q: Tensor, k: Tensor, mask: Mask, scale: float) -> Tensor | None:
        """The attention matrix ``(B, H, Lq, Lk)`` where the mechanism has one, else ``None``."""
        return None

    def step(
        self, q: Tensor, k: Tensor, v: Tensor, state: Any, scale: float, key_padding_mask: Tensor | None = None
    ) -> tuple[Tensor, Any]:
        """Decode ``T`` new tokens (``q, k, v`` of length ``T``, k/v with Hkv heads) given ``state``
        (``None`` at the start); ``key_padding_mask`` bool ``(B, T)`` marks which new tokens are padding
        (their keys are never seen by later queries; the outputs at padding positions are unspecified).
        Returns the outputs ``(B, H, T, Ev)`` and the new :class:`~fastattn.core.state.DecodingState`.

        Default: a :class:`~fastattn.core.state.KVCache` (carrying the padding of its keys) and the causal
        forward of the new queries over it."""
        cache = KVCache(k, v, key_padding_mask) if state is None else state.append(k, v, key_padding_mask)
        if cache.key_padding is None or not self.positional:
            out = self.run(q, cache.k, cache.v, key_padding_mask=cache.key_padding, is_causal=True, scale=scale)
        else:
            out = self._step_by_padding(q, cache, scale)
        return out, cache

    def _step_by_padding(self, q: Tensor, cache: KVCache, scale: float) -> Tensor:
        """The causal forward of positional mechanisms over a padded cache: rows that share a padding
        pattern run together, on their real tokens only (so positions count from each row's first real
        token); padding queries get zeros."""
        assert cache.key_padding is not None
        t = q.shape[2]
        patterns, which = torch.unique(cache.key_padding, dim=0, return_inverse=True)
        out: Tensor | None = None
        for g in range(patterns.shape[0]):
            rows = (which == g).nonzero().flatten()
            real = ~patterns[g]
            new = real[-t:]
            if not bool(new.any()):
                continue
            o = self.run(
                q.index_select(0, rows)[:, :, new], cache.k.index_select(0, rows)[:, :, real],
                cache.v.index_select(0, rows)[:, :, real], is_causal=True, scale=scale,
            )
            if out is None:
                out = o.new_zeros(q.shape[0], q.shape[1], t, o.shape[3])
            part = o.new_zeros(rows.shape[0], q.shape[1], t, o.shape[3])
            part[:, :, new] = o
            out = out.index_copy(0, rows, part)
        if out is None:  # every new token of every row is padding
            out = q.new_zeros(*q.shape[:3], cache.v.shape[3])
        return out

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
        backend: str = "auto",
    ) -> Tensor:
        """Validate, then compute with the chosen backend (``reference=True`` is ``backend="reference"``)."""
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
        if reference:
            if backend not in ("auto", "reference"):
                raise ValueError(f"reference=True contradicts backend={backend!r}")
            backend = "reference"
        return self.run_checked(
            q, k, v, key_padding_mask=key_padding_mask, is_causal=is_causal, scale=scale,
            attn_mask=attn_mask, dropout_p=dropout_p, backend=backend,
        )

    def run_checked(
        self, q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Tensor | None, is_causal: bool,
        scale: float | None, attn_mask: Tensor | None, dropout_p: float, backend: str,
    ) -> Tensor:
        """:meth:`run` after validation (inputs already checked by the caller, e.g. ``fastattn.attention``):
        choose the backend, apply the half-precision policy, expand grouped-query heads, build the mask."""
        chosen = choose_backend(
            backend, self.spec,
            Call(device=q.device, dtype=q.dtype, dropout_p=dropout_p, attn_mask=attn_mask is not None),
        )
        scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
        dtype = q.dtype
        q, k, v = self.upcast(q, k, v)
        if not self.native_gqa:
            groups = q.shape[1] // k.shape[1]
            k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        mask = build_mask(q, k, key_padding_mask, attn_mask, is_causal)
        return chosen.run(self, q, k, v, mask, scale, dropout_p).to(dtype)

    def upcast(self, *xs: Tensor) -> tuple[Tensor, ...]:
        """The inputs as the implementations see them under the class's ``half_precision`` policy:
        float16/bfloat16 become float32 under ``"upcast"``; anything else is returned as is."""
        if self.half_precision == "native":
            return xs
        return tuple(x.float() if x.dtype in _HALF else x for x in xs)

    def attention_weights(
        self, q: Tensor, k: Tensor, *, key_padding_mask: Tensor | None = None, is_causal: bool = False,
        scale: float | None = None, attn_mask: Tensor | None = None,
    ) -> Tensor | None:
        if not self.spec.weights:
            return None
        scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
        dtype = q.dtype
        q, k = self.upcast(q, k)
        if not self.native_gqa:
            k = repeat_kv(k, q.shape[1] // k.shape[1])
        w = self.weights(q, k, build_mask(q, k, key_padding_mask, attn_mask, is_causal), scale)
        return None if w is None else w.to(dtype)
