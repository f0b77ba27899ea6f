"""Random projections shared by the random-feature mechanisms (``performer``, ``rfa``): the Gaussian
draw (i.i.d. or block-orthogonal) and a base class keeping the matrix as a registered buffer drawn from
the ``generator`` given at construction, with an explicit :meth:`RandomFeatureMechanism.redraw`."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import KernelMechanism

__all__ = ["draw_gaussian_projection", "RandomFeatureMechanism"]


def draw_gaussian_projection(
    m: int, d: int, *, orthogonal: bool, generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``(m, d)`` rows ``w_i ~ N(0, I_d)``; with ``orthogonal`` the rows of each block of ``d`` are
    exactly orthogonal (Haar-random orthogonal matrix with chi-distributed row norms)."""
    if not orthogonal:
        return torch.randn(m, d, generator=generator, dtype=torch.float64).to(dtype)
    g = torch.randn(math.ceil(m / d), d, d, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)  # sign fix: Haar-distributed
    w = q.transpose(-1, -2).reshape(-1, d)[:m]
    norms = torch.randn(m, d, generator=generator, dtype=torch.float64).norm(dim=1, keepdim=True)
    return (w * norms).to(dtype)


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
