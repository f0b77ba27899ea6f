"""``fastattn.AlignmentAttention``: a decoder's queries attend over an encoder's states (Bahdanau, Luong,
...), with any registered mechanism of kind ``"seq2seq"``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .core.alignment import AlignmentMechanism, AlignmentState
from .core.masks import Mask
from .registry import get_method

__all__ = ["AlignmentAttention", "AlignmentState"]


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


class AlignmentAttention(nn.Module):
    """Alignment attention: ``context, weights = a(query, keys, values=None, key_padding_mask=None)``.

    Args:
        query_dim: ``Dq``, the decoder state's width.
        key_dim: ``Dk``, the encoder state's width.
        method: a registry id of kind ``"seq2seq"`` (default ``"additive"``, Bahdanau).
        value_dim: ``Dv``; default ``key_dim`` (values default to the keys).
        **options: the mechanism's options (``fastattn.get_method(method).options``); an unknown one is
            a ``ValueError``.

    Forward:
        ``query (B, Lq, Dq)`` or ``(B, Dq)``; ``keys (B, Lk, Dk)``; ``values (B, Lk, Dv)`` (default: the
        keys); ``key_padding_mask`` bool ``(B, Lk)``, True = padding key. Returns ``context (B, Lq, Dv)``
        and ``weights (B, Lq, Lk)`` (``(B, Dv)`` and ``(B, Lk)`` for a 2-D query); each weight row sums
        to 1 over the real keys and is 0 on padding keys (all zeros when every key is padding).
        ``is_causal=True`` (mechanisms with ``causal=True``; self-attention use) lets query ``i`` see keys
        ``0 .. Lk - Lq + i`` only. Mechanisms that learn their queries (``structured``: ``query_free``)
        are called with ``query=None`` and return ``(B, r, Dv)`` and ``(B, r, Lk)`` for their ``r``
        queries. Mechanisms with ``normalized = False`` (``gmm_window``, luong's ``local-p``) return
        unnormalised rows, still 0 on padding.

    Decoding:
        ``context, weights, state = a.step(query_t, keys, state, key_padding_mask=None)`` with ``state =
        None`` at the first step (mechanisms with ``decoding=True``). The state holds the per-source work
        (e.g. Bahdanau's projected keys, computed once) and any position state; pass the same ``keys``
        at every step. ``state.select(index)`` reorders the batch for beam search.

    Example:
        >>> a = fastattn.AlignmentAttention(256, 512, method="additive")
        >>> enc = torch.randn(4, 37, 512)                     # encoder states (annotations)
        >>> context, weights = a(torch.randn(4, 256), enc)    # context (4, 512), weights (4, 37)
        >>> state = None
        >>> for s in decoder_states:                          # s (4, 256), one decoder step
        ...     context, weights, state = a.step(s, enc, state)
    """

    def __init__(
        self,
        query_dim: int,
        key_dim: int,
        method: str = "additive",
        *,
        value_dim: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        spec = get_method(method)
        if spec.kind != "seq2seq":
            raise ValueError(
                f"method {method!r} is a {spec.kind} mechanism; AlignmentAttention takes seq2seq ones "
                f"(sequence ones: fastattn.MultiheadAttention, vision ones: fastattn.Attention2d)"
            )
        value_dim = key_dim if value_dim is None else value_dim
        for name, d in (("query_dim", query_dim), ("key_dim", key_dim), ("value_dim", value_dim)):
            if not isinstance(d, int) or d <= 0:
                raise ValueError(f"{name} must be a positive integer, got {d!r}")
        self.spec, self.method = spec, method
        self.query_dim, self.key_dim, self.value_dim = query_dim, key_dim, value_dim
        mech: AlignmentMechanism = spec.cls(  # type: ignore[misc]
            spec.make_options(**options), query_dim=query_dim, key_dim=key_dim, value_dim=value_dim
        )
        if device is not None or dtype is not None:
            mech = mech.to(device=device, dtype=dtype)
        self.attn = mech

    @property
    def aux_loss(self) -> Tensor:
        """The mechanism's auxiliary loss from the last forward (zero where it defines none)."""
        return self.attn.aux_loss

    def extra_repr(self) -> str:
        return f"query_dim={self.query_dim}, key_dim={self.key_dim}, value_dim={self.value_dim}, method={self.method!r}"

    # ---- validation ---------------------------------------------------------------------------
    def _inputs(
        self, query: Tensor | None, keys: Tensor, values: Tensor | None, key_padding_mask: Tensor | None, is_causal: bool,
    ) -> tuple[Tensor | None, Tensor, bool, Mask]:
        for name, t in (("query", query), ("keys", keys), ("values", values)):
            if t is None:
                continue
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if not t.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if self.attn.query_free != (query is None):
            if query is None:
                raise ValueError(f"query is required: method {self.method!r} scores the queries it is given "
                                 f"(query=None is for methods that learn their queries, such as 'structured')")
            raise ValueError(f"method {self.method!r} learns its {self.attn.num_queries} queries: call it with "
                             f"query=None, got a query of shape {_shape(query)}")
        if keys.dim() != 3:
            raise ValueError(f"keys must be (batch, key_length, key_dim), got {_shape(keys)}")
        squeeze = query is not None and query.dim() == 2
        if query is None:  # the mechanism's learned queries: a stand-in for the shape checks, never used
            query = keys.new_empty(keys.shape[0], self.attn.num_queries, self.query_dim)
        if squeeze:
            query = query[:, None]
        if query.dim() != 3:
            raise ValueError(f"query must be (batch, length, query_dim) or (batch, query_dim), got {_shape(query)}")
        if values is None:
            if self.value_dim != self.key_dim:
                raise ValueError(
                    f"values default to the keys, but value_dim ({self.value_dim}) != key_dim ({self.key_dim}); "
                    f"pass values"
                )
            values = keys
        if values.dim() != 3:
            raise ValueError(f"values must be (batch, key_length, value_dim), got {_shape(values)}")
        b, lk = keys.shape[0], keys.shape[1]
        if query.shape[0] != b or values.shape[0] != b:
            raise ValueError(f"batch mismatch: query {_shape(query)}, keys {_shape(keys)}, values {_shape(values)}")
        if values.shape[1] != lk:
            raise ValueError(f"keys {_shape(keys)} and values {_shape(values)} must have the same length")
        for name, t, d in (("query", query, self.query_dim), ("keys", keys, self.key_dim),
                           ("values", values, self.value_dim)):
            if t.shape[-1] != d:
                raise ValueError(f"{name} has {t.shape[-1]} features, the module was built for {d}")
        if query.shape[1] == 0 or lk == 0:
            raise ValueError(f"empty sequence: query length {query.shape[1]}, key length {lk}")
        if not (query.dtype == keys.dtype == values.dtype):
            raise TypeError(f"dtype mismatch: query {query.dtype}, keys {keys.dtype}, values {values.dtype}")
        if not (query.device == keys.device == values.device):
            raise ValueError(f"device mismatch: query {query.device}, keys {keys.device}, values {values.device}")
        if key_padding_mask is not None:
            if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
                got = key_padding_mask.dtype if isinstance(key_padding_mask, Tensor) else type(key_padding_mask)
                raise TypeError(f"key_padding_mask must be a bool tensor (True = padding), got {got}")
            if _shape(key_padding_mask) != (b, lk):
                raise ValueError(
                    f"key_padding_mask must have shape (batch, key_length) = ({b}, {lk}), got {_shape(key_padding_mask)}"
                )
            if not self.spec.padding:
                raise ValueError(f"method {self.method!r} does not support key_padding_mask")
        if is_causal:
            if not self.spec.causal:
                raise ValueError(f"method {self.method!r} has no causal form; is_causal=True would leak the future")
            if query.shape[1] > lk:
                raise ValueError(f"is_causal needs query length <= key length, got {query.shape[1]} > {lk}")
        mask = Mask(lq=query.shape[1], lk=lk, key_padding=key_padding_mask, causal=is_causal)
        return (None if self.attn.query_free else query), values, squeeze, mask

    @staticmethod
    def _out(context: Tensor, weights: Tensor, squeeze: bool) -> tuple[Tensor, Tensor]:
        return (context[:, 0], weights[:, 0]) if squeeze else (context, weights)

    # ---- calls --------------------------------------------------------------------------------
    def forward(
        self, query: Tensor | None, keys: Tensor, values: Tensor | None = None, key_padding_mask: Tensor | None = None,
        *, is_causal: bool = False,
    ) -> tuple[Tensor, Tensor]:
        query, values, squeeze, mask = self._inputs(query, keys, values, key_padding_mask, is_causal)
        return self._out(*self.attn(query, keys, values, mask), squeeze)

    def reference(
        self, query: Tensor | None, keys: Tensor, values: Tensor | None = None, key_padding_mask: Tensor | None = None,
        *, is_causal: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """The same call computed by the mechanism's literal reference (for tests and checks)."""
        query, values, squeeze, mask = self._inputs(query, keys, values, key_padding_mask, is_causal)
        return self._out(*self.attn.reference(query, keys, values, mask), squeeze)

    def step(
        self, query_t: Tensor, keys: Tensor, state: AlignmentState | None = None,
        key_padding_mask: Tensor | None = None, *, values: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, AlignmentState]:
        """One decoder step: ``query_t (B, Dq)`` (or ``(B, T, Dq)``) over all of ``keys``; returns
        ``context, weights, state`` shaped like :meth:`forward`'s, and the state for the next step."""
        if not self.spec.decoding:
            raise ValueError(f"method {self.method!r} does not support step()")
        query_t, values, squeeze, mask = self._inputs(query_t, keys, values, key_padding_mask, False)
        if state is not None:
            if not isinstance(state, AlignmentState):
                raise TypeError(f"state must be None or the AlignmentState of the previous step, got {type(state).__name__}")
            if _shape(state.keys)[:2] != _shape(keys)[:2]:
                raise ValueError(
                    f"state was made for keys of batch and length {_shape(state.keys)[:2]}, got keys {_shape(keys)}; "
                    f"start a new state (None) for a new source"
                )
        context, weights, state = self.attn.step(query_t, keys, values, state, mask)
        return (*self._out(context, weights, squeeze), state)
