"""Random projections shared by the random-feature mechanisms (``performer``, ``rfa``): a base class
keeping the matrix as a registered buffer drawn from the ``generator`` given at construction, with an
explicit ``redraw`` (both from :class:`fastattn.ops.features.RandomProjection`, the Gaussian draw from
:func:`fastattn.ops.features.draw_gaussian_projection`)."""

from __future__ import annotations

import torch

from fastattn.ops.features import RandomProjection, draw_gaussian_projection  # written once in the ops layer
from .base import KernelMechanism

__all__ = ["draw_gaussian_projection", "RandomFeatureMechanism"]


class RandomFeatureMechanism(RandomProjection, KernelMechanism):
    """A kernel mechanism with a random ``(num_features, head_dim)`` matrix ``projection`` (a buffer, so
    ``state_dict`` reproduces it). ``Options`` must have ``num_features``; ``orthogonal`` is optional."""

    def __init__(self, options=None, *, head_dim: int, num_heads: int, num_kv_heads: int | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(options, head_dim=head_dim, num_heads=num_heads, num_kv_heads=num_kv_heads)
        self.init_projection(generator)
