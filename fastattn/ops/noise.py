"""Reproducible per-forward randomness from module buffers.

Some mechanisms draw fresh noise on every training forward (Gumbel noise of a soft sort, a sampled
attention index). Drawing it from the global RNG would make runs irreproducible and a saved module
forget where its stream stood, so the stream lives in two buffers (saved in the ``state_dict``): a
``seed`` drawn once at construction from the user's ``generator`` and a ``draws`` counter. Each draw
seeds a fresh ``torch.Generator`` with ``seed + draws`` and advances the counter::

    self.register_buffer("noise_seed", new_seed(generator))
    self.register_buffer("noise_draws", torch.zeros((), dtype=torch.long))
    g = next_generator(self.noise_seed, self.noise_draws, device)   # a new stream per call
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["new_seed", "next_generator"]


def new_seed(generator: torch.Generator | None = None) -> Tensor:
    """A long scalar seed drawn from ``generator`` (the global RNG when ``None``)."""
    return torch.randint(0, 2**62, (), generator=generator, dtype=torch.long)


def next_generator(seed: Tensor, draws: Tensor, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed + draws``; ``draws`` (a long scalar buffer) is
    incremented in place, so the next call gets the next stream."""
    g = torch.Generator(device=device)
    g.manual_seed(int(seed) + int(draws))
    draws.add_(1)
    return g
