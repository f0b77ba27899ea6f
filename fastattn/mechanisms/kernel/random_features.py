"""Random projections shared by the random-feature mechanisms (``performer``, ``rfa``): the Gaussian
draw (i.i.d. or block-orthogonal) and a base class keeping the matrix as a registered buffer drawn from
the ``generator`` given at construction, with an explicit :meth:`RandomFeatureMechanism.redraw`."""

from __future__ import annotations

import torch

from fastattn.ops.features import draw_gaussian_projection  # written once in the ops layer
from .base import KernelMechanism

__all__ = ["draw_gaussian_projection", "RandomFeatureMechanism"]


class RandomFeatureMechanism(KernelMechanism):
    """A kernel mechanism with a random ``(num_features, head_dim)`` matrix ``projection`` (a buffer, so
    ``state_dict`` reproduces it). ``Options`` must have ``num_features``; ``orthogonal`` is optional."""

    def __init__(self, options=None, *, head_dim: int, num_heads: int, num_kv_heads: int | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(options, head_dim=head_dim, num_heads=num_heads, num_kv_heads=num_kv_heads)
        self._generator = generator
        self.register_buffer("projection", torch.empty(self.options.num_features, head_dim))
        self.redraw(generator)

    @torch.no_grad()
    def redraw(self, generator: torch.Generator | None = None) -> None:
        """Draw a fresh random matrix into the ``projection`` buffer (from ``generator``, else the one
        given at construction, else torch's global generator)."""
        g = generator if generator is not None else self._generator
        w = draw_gaussian_projection(self.options.num_features, self.head_dim,
                                     orthogonal=getattr(self.options, "orthogonal", False), generator=g)
        self.projection.copy_(w.to(self.projection))
