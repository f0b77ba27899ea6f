"""BigBird (Zaheer et al., 2020, arXiv:2007.14062): block window + global blocks + random blocks (ITC).

On blocks of ``b`` tokens, query block ``t`` attends to

* the window blocks ``t - w .. t + w`` (``window_blocks = 2 w + 1``),
* the first ``global_blocks`` blocks, whose tokens also attend to every key (global tokens, ITC),
* ``random_blocks`` key blocks drawn uniformly without replacement among the blocks that are neither
  in its window nor global.

The random draws are a buffer ``random_table`` of uniforms (one row per query block, up to
``max_blocks`` blocks), drawn from ``generator`` at construction and on :meth:`redraw`; they are saved
in ``state_dict`` and mapped to blocks for each length, so a model always uses the same graph.
O(n b (2 w + 1 + g + r) d) time and memory. Non-causal (as in the paper's encoder).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fastattn.registry import register
from .base import PatternMechanism, check_positive
from fastattn.ops.sparse.patterns import BlockWindow, Pattern, RandomBlocks


def pick_random_blocks(u: Tensor, nkb: int, radius: int, n_global: int) -> Tensor:
    """Map uniforms ``u (nqb, r)`` to distinct key blocks per query block, outside the window
    ``t - radius .. t + radius`` and the first ``n_global`` blocks; ``-1`` where fewer remain."""
    nqb, r = u.shape
    t = torch.arange(nqb, device=u.device)[:, None]
    kb = torch.arange(nkb, device=u.device)[None, :]
    free = ((kb - t).abs() > radius) & (kb >= n_global)
    out = torch.full((nqb, r), -1, dtype=torch.long, device=u.device)
    for j in range(r):
        count = free.sum(1)
        kth = torch.minimum((u[:, j] * count).long(), (count - 1).clamp(min=0))  # index among the free
        pick = torch.searchsorted(free.long().cumsum(1), (kth + 1)[:, None]).squeeze(1)
        ok = count > 0
        out[:, j] = torch.where(ok, pick, torch.full_like(pick, -1))
        free[ok, pick[ok]] = False
    return out


@register(
    "bigbird", complexity="O(n b (w + g + r) d)", causal=False, decoding=False, padding=True,
    randomized=True,
)
class BigBirdAttention(PatternMechanism):
    """Window + global + random blocks (see module docstring)."""

    test_options = {"block": 4, "window_blocks": 3, "global_blocks": 1, "random_blocks": 2, "max_blocks": 64}

    @dataclass(frozen=True)
    class Options:
        block: int = 64
        window_blocks: int = 3  # odd: the own block and (window_blocks - 1) / 2 on each side
        global_blocks: int = 2  # the first blocks are global tokens
        random_blocks: int = 3
        max_blocks: int = 2048  # rows of the random table: longest sequence = block * max_blocks

        def __post_init__(self) -> None:
            check_positive(block=self.block, window_blocks=self.window_blocks, max_blocks=self.max_blocks)
            if self.window_blocks % 2 == 0:
                raise ValueError(f"window_blocks must be odd, got {self.window_blocks}")
            if self.global_blocks < 0 or self.random_blocks < 0:
                raise ValueError("global_blocks and random_blocks must be >= 0")

    def __init__(self, options=None, *, generator: torch.Generator | None = None, **kw) -> None:
        super().__init__(options, **kw)
        o = self.options
        self.register_buffer("random_table", torch.empty(o.max_blocks, o.random_blocks))
        self.redraw(generator)

    @torch.no_grad()
    def redraw(self, generator: torch.Generator | None = None) -> None:
        """Draw new random blocks (uniforms in ``random_table``)."""
        table = torch.rand(self.random_table.shape, generator=generator)
        self.random_table.copy_(table.to(self.random_table.device))

    def pattern(self, lq: int, lk: int, device: torch.device) -> Pattern:
        o = self.options
        nkb = -(-lk // o.block)
        if nkb > o.max_blocks:
            raise ValueError(
                f"bigbird: length {lk} needs {nkb} blocks > max_blocks={o.max_blocks}; raise max_blocks"
            )
        radius = o.window_blocks // 2
        table = pick_random_blocks(self.random_table[:nkb].to(device), nkb, radius, o.global_blocks)
        glob = torch.arange(min(o.global_blocks * o.block, lk), device=device)
        return Pattern(
            o.block, (BlockWindow(radius), RandomBlocks(table)),
            global_keys=glob, global_queries=glob,
        )
