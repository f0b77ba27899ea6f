"""The decoding state of linear attention: what ``step`` carries from one call to the next."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LinearState"]


@dataclass(frozen=True)
class LinearState:
    """Constant-size state of causal linear attention after ``length`` tokens:
    ``kv = S = sum_s w_s k'_s v_s^T`` ``(B, H, D, Ev)`` and the normaliser ``z = sum_s w_s k'_s``
    ``(B, H, D)`` (None for unnormalised attention), ``w_s`` the product of the gates after ``s``.

    The same protocol as the KV caches of :mod:`fastattn.core.state`: ``length``, :meth:`select`
    (reorder or pick batch rows, for beam search) and :meth:`to`."""

    kv: Tensor
    z: Tensor | None = None
    length: int = 0

    def select(self, index: Tensor | int | slice) -> LinearState:
        """The state of the batch rows ``index`` (a tensor of row indices, an int or a slice); an int
        keeps the batch axis."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return LinearState(self.kv[index], None if self.z is None else self.z[index], self.length)

    def to(self, device: torch.device | str) -> LinearState:
        return LinearState(self.kv.to(device), None if self.z is None else self.z.to(device), self.length)
