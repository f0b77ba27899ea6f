"""Content-based permutations of a sequence, per (batch, head), that remember where every token came from.

Mechanisms that group tokens by content (hash buckets, cluster ids: reformer, routing) sort each
(batch, head) row of the sequence by a key, attend within the sorted order (e.g. in chunks), and put
the results back. Causality and padding must still be decided on the *original* positions, so a
:class:`Permutation` carries them::

    perm = sort_by(bucket)                      # bucket (B, H, L): any comparable key, ties stable
    qs, ks, vs = perm.sort(q), perm.sort(k), perm.sort(v)
    pos = perm.positions                        # (B, H, L): original position of each sorted slot
    pad = perm.sort(key_padding_mask[:, None])  # (B, H, L): padding, in sorted order
    allowed = (pos[..., :, None] >= pos[..., None, :]) & ~pad[..., None, :]   # causal on original positions
    out = perm.unsort(attend(qs, ks, vs, allowed))

Sorting is a gather along the length axis and unsorting the gather by the inverse permutation, both
differentiable in the tensors moved (the key itself is discrete). O(L log L) for the sort, O(L d) for
each move.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Permutation", "sort_by"]


def _take(x: Tensor, index: Tensor) -> Tensor:
    """``x`` gathered along axis 2 by ``index (B, H, L)``; ``x (B|1, H|1, L, ...)`` broadcasts over
    the batch and head axes of ``index``."""
    B, H, L = index.shape
    if x.dim() < 3 or x.shape[2] != L:
        raise ValueError(f"expected a tensor (B, H, {L}, ...) to permute along its length, got {tuple(x.shape)}")
    if x.shape[0] not in (1, B) or x.shape[1] not in (1, H):
        raise ValueError(f"a tensor {tuple(x.shape)} does not broadcast over the permutation's (B, H) = ({B}, {H})")
    rest = x.shape[3:]
    x = x.expand(B, H, L, *rest)
    return torch.gather(x, 2, index.view(B, H, L, *(1,) * len(rest)).expand(B, H, L, *rest))


@dataclass(frozen=True)
class Permutation:
    """A permutation of the length axis per (batch, head), ``(B, H, L)`` long tensors:

    * ``order[b, h, i]``: the original index of the token in sorted slot ``i``;
    * ``inverse[b, h, j]``: the sorted slot of original index ``j``;
    * ``positions[b, h, i]``: the original (absolute) position of sorted slot ``i`` -- ``order`` plus
      whatever positions were given to :func:`sort_by` (an offset, per-row positions).
    """

    order: Tensor
    inverse: Tensor
    positions: Tensor

    def sort(self, x: Tensor) -> Tensor:
        """``x (B|1, H|1, L, ...)`` in sorted order, ``(B, H, L, ...)`` (differentiable)."""
        return _take(x, self.order)

    def unsort(self, y: Tensor) -> Tensor:
        """``y (B|1, H|1, L, ...)`` in sorted order back in the original order (differentiable)."""
        return _take(y, self.inverse)


def sort_by(key: Tensor, positions: Tensor | None = None) -> Permutation:
    """The stable sort of each ``(batch, head)`` row of ``key (B, H, L)`` (bucket or cluster ids, or any
    real key): tokens with equal keys keep their original order. ``positions``: the original positions
    of the tokens, ``(L,)`` or broadcastable to ``(B, H, L)`` (default ``0 .. L-1``), carried into
    :attr:`Permutation.positions`."""
    if key.dim() != 3:
        raise ValueError(f"key must be (B, H, L), got {tuple(key.shape)}")
    if key.is_complex():
        raise ValueError("key must be real (it is sorted)")
    B, H, L = key.shape
    order = torch.sort(key, dim=-1, stable=True).indices
    slots = torch.arange(L, device=key.device).expand(B, H, L)
    inverse = torch.empty_like(order).scatter_(-1, order, slots)
    if positions is None:
        pos = order
    else:
        if positions.dtype.is_floating_point or positions.dtype == torch.bool:
            raise ValueError(f"positions must be an integer tensor, got {positions.dtype}")
        try:
            full = positions.to(key.device).expand(B, H, L)
        except RuntimeError:
            raise ValueError(f"positions {tuple(positions.shape)} do not broadcast to {(B, H, L)}") from None
        pos = torch.gather(full, -1, order)
    return Permutation(order, inverse, pos)
