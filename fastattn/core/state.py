"""Decoding states: what ``step`` carries from one call to the next."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["KVCache"]


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
