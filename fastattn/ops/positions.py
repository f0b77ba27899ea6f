"""Relative-position biases shared by mechanisms: ALiBi's head slopes."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["alibi_slopes"]


def alibi_slopes(num_heads: int) -> Tensor:
    """ALiBi's head slopes ``(H,)`` (float64): ``2^(-8 (h + 1) / H)`` for ``H`` a power of two; otherwise
    those of the largest power of two ``p < H``, then every other slope of ``2 p`` heads."""
    def geometric(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]

    p = 2 ** math.floor(math.log2(num_heads))
    out = geometric(p)
    if p < num_heads:
        out += geometric(2 * p)[0::2][: num_heads - p]
    return torch.tensor(out, dtype=torch.float64)
