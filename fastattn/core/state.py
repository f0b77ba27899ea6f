"""Decoding states: what ``step`` carries from one call to the next.

Every state is a :class:`DecodingState`: it knows how many positions it has seen (``length``, padding
included), can reorder or subset its batch (``select``: beam search keeps the best continuations) and
move to a device (``to``). The default state of softmax-family mechanisms is :class:`KVCache`; kernel
mechanisms carry a constant-size :class:`~fastattn.ops.linear.engine.LinearState`, windowed patterns a
:class:`~fastattn.mechanisms.sparse.base.PrunedCache`.
"""

from __future__ import annotations

import copy
from typing import ClassVar, Sequence, TypeVar

import torch
from torch import Tensor

__all__ = ["DecodingState", "KVCache", "PositionState", "StackedState", "batch_index"]

S = TypeVar("S", bound="DecodingState")


def batch_index(index: Tensor | Sequence[int] | int, batch: int, device: torch.device) -> Tensor:
    """``index`` as a 1-D long tensor of batch rows (a bool tensor selects where True; an int is one
    row, the batch axis kept); a ``ValueError`` for anything else or a row outside ``[0, batch)``."""
    idx = torch.as_tensor(index, device=device)
    if idx.dim() == 0 and not idx.is_floating_point() and idx.dtype != torch.bool:
        idx = idx.reshape(1)
    if idx.dtype == torch.bool:
        if idx.shape != (batch,):
            raise ValueError(f"a bool batch index must have shape ({batch},), got {tuple(idx.shape)}")
        idx = idx.nonzero().flatten()
    if idx.dim() != 1 or idx.is_floating_point() or idx.is_complex():
        raise ValueError(
            f"select needs a 1-D integer (or bool) index of batch rows, got {tuple(idx.shape)} {idx.dtype}"
        )
    idx = idx.long()
    if idx.numel() and (int(idx.min()) < -batch or int(idx.max()) >= batch):
        raise ValueError(f"batch index out of range for a batch of {batch}: {idx.tolist()}")
    return idx % batch if idx.numel() else idx


class DecodingState:
    """What every decoding state offers: ``length`` (an attribute or property: positions seen so far,
    padding positions included), :meth:`select` and :meth:`to`. Subclasses name their batch-first
    tensors in ``batched``; ``select`` indexes those along dimension 0 and ``to`` moves every tensor
    attribute."""

    batched: ClassVar[tuple[str, ...]] = ()
    length: int

    @property
    def batch_size(self) -> int:
        return getattr(self, self.batched[0]).shape[0]

    def _map(self: S, batched, other) -> S:
        new = copy.copy(self)
        for name, value in vars(self).items():
            if isinstance(value, Tensor):
                setattr(new, name, batched(value) if name in self.batched else other(value))
        return new

    def select(self: S, index: Tensor | Sequence[int] | int) -> S:
        """The state of batch rows ``index`` (in that order; rows may repeat): reorders or subsets the
        batch, e.g. the surviving hypotheses of a beam search. The original state is unchanged."""
        first = getattr(self, self.batched[0])
        idx = batch_index(index, first.shape[0], first.device)
        return self._map(lambda t: t.index_select(0, idx.to(t.device)), lambda t: t)

    def to(self: S, device: torch.device | str) -> S:
        """The state on ``device``."""
        return self._map(lambda t: t.to(device), lambda t: t.to(device))


class _KVBuffer:
    """Key/value (and padding) storage with spare capacity, shared by the caches of one decoding
    stream; ``filled`` is the length of the newest cache written into it."""

    def __init__(self, k: Tensor, v: Tensor, pad: Tensor | None, capacity: int) -> None:
        b, h, n = k.shape[:3]
        self.k = k.new_empty(b, h, capacity, k.shape[3])
        self.v = v.new_empty(b, h, capacity, v.shape[3])
        self.k[:, :, :n], self.v[:, :, :n] = k, v
        self.pad = None
        if pad is not None:
            self.pad = pad.new_zeros(b, capacity)
            self.pad[:, :n] = pad
        self.filled = n


class KVCache(DecodingState):
    """Decoding state of softmax-family mechanisms: keys and values seen so far ``(B, Hkv, L, E)``
    (``k``, ``v``) and, once any token was padding, which of them are (``key_padding``, bool ``(B, L)``,
    True = padding; ``None`` when none is). Later queries never see a padding key.

    :meth:`append` writes new tokens into spare capacity (doubling when full), so decoding ``n`` tokens
    copies O(n) elements in all rather than the whole cache per token. A cache never changes once
    made: appending to one that is not the newest of its buffer (a second continuation of the same
    prefix, as in beam search) copies it into a fresh buffer first. Under autograd (inputs that
    require grad) appending concatenates instead, so gradients flow to every cached token."""

    batched = ("k", "v", "key_padding")

    def __init__(
        self, k: Tensor, v: Tensor, key_padding: Tensor | None = None, _buffer: _KVBuffer | None = None
    ) -> None:
        self.k, self.v, self.key_padding, self._buffer = k, v, key_padding, _buffer

    @property
    def length(self) -> int:
        return self.k.shape[2]

    def append(self, k: Tensor, v: Tensor, key_padding: Tensor | None = None) -> KVCache:
        """The cache extended by ``k``, ``v`` ``(B, Hkv, T, E)`` whose padding is ``key_padding``
        (bool ``(B, T)``, or ``None``: no padding)."""
        n, t = self.length, k.shape[2]
        pad = self.key_padding
        if pad is not None or key_padding is not None:
            old = pad if pad is not None else torch.zeros(k.shape[0], n, dtype=torch.bool, device=k.device)
            new = key_padding
            if new is None:
                new = torch.zeros(k.shape[0], t, dtype=torch.bool, device=k.device)
        if torch.is_grad_enabled() and any(x.requires_grad for x in (k, v, self.k, self.v)):
            full_pad = None if pad is None and key_padding is None else torch.cat([old, new], dim=1)
            return KVCache(torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2), full_pad)
        buf = self._buffer
        if (
            buf is None or buf.filled != n or buf.k.shape[2] < n + t or buf.k.dtype != k.dtype
            or (buf.pad is None) != (pad is None and key_padding is None)
        ):
            buf = _KVBuffer(self.k, self.v, None if pad is None and key_padding is None else old,
                            capacity=max(2 * n, n + t, 16))
        buf.k[:, :, n:n + t], buf.v[:, :, n:n + t] = k, v
        if buf.pad is not None:
            buf.pad[:, n:n + t] = new
        buf.filled = n + t
        full_pad = None if buf.pad is None else buf.pad[:, :n + t]
        return KVCache(buf.k[:, :, :n + t], buf.v[:, :, :n + t], full_pad, buf)

    def select(self, index: Tensor | Sequence[int]) -> KVCache:
        out = super().select(index)
        out._buffer = None
        return out

    def to(self, device: torch.device | str) -> KVCache:
        out = super().to(device)
        out._buffer = None
        return out


class StackedState(DecodingState):
    """The decoding state of a layer made of sub-layers run one after the other (each decodes its own
    input): one state per sub-layer, in order. ``length`` is the first one's; ``select`` and ``to``
    apply to every one."""

    def __init__(self, states: Sequence[DecodingState]) -> None:
        self.states = tuple(states)

    @property
    def length(self) -> int:  # type: ignore[override]
        return self.states[0].length

    @property
    def batch_size(self) -> int:
        return self.states[0].batch_size

    def select(self, index: Tensor | Sequence[int] | int) -> StackedState:
        return StackedState([s.select(index) for s in self.states])

    def to(self, device: torch.device | str) -> StackedState:
        return StackedState([s.to(device) for s in self.states])


class PositionState(DecodingState):
    """The state of a token-wise (stateless) layer: nothing but the positions seen, ``length``, and a
    ``(B,)`` placeholder that carries the batch through ``select``."""

    batched: ClassVar[tuple[str, ...]] = ("rows",)

    def __init__(self, rows: Tensor, length: int) -> None:
        self.rows, self.length = rows, length

    @classmethod
    def advance(cls, state: "PositionState | None", batch: int, new: int, device: torch.device) -> "PositionState":
        """``state`` after ``new`` more positions (a fresh state of ``batch`` rows when ``None``)."""
        if state is None:
            return cls(torch.zeros(batch, dtype=torch.long, device=device), new)
        if state.batch_size != batch:
            raise ValueError(f"the state holds {state.batch_size} rows, the new tokens {batch}")
        return cls(state.rows, state.length + new)
