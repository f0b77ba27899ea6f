"""BigBird (Zaheer et al., 2020, arXiv:2007.14062): block window + global blocks + random blocks (ITC).

On blocks of ``b`` tokens, query block ``t`` attends to

* the window blocks ``t - w .. t + w`` (``window_blocks = 2 w + 1``),
* the global blocks, whose tokens also attend to every key (global tokens, ITC): as in the authors'
  code, the first and the last block by default (``global_blocks = g``: the first ``ceil(g / 2)`` and
  the last ``floor(g / 2)`` blocks); ``global_at="start"`` takes the first ``g`` blocks instead,
* ``random_blocks`` key blocks drawn uniformly without replacement among the blocks that are neither
  in its window nor global -- for each head separately, as in the authors' code (``per_head=False``
  shares one draw across the heads).

The random draws are an integer buffer ``random_table`` ``(H or 1, max_blocks, r)`` of uniform 31-bit
integers (integers, so that ``.half()`` or ``.bfloat16()`` cannot change the graph), drawn from
``generator`` at construction and on :meth:`redraw`; they are saved in ``state_dict`` and mapped to
blocks for each length, so a model always uses the same graph. Queries are the last ``Lq`` positions
of the key sequence (``Lq <= Lk``). O(n b (2 w + 1 + g + r) d) time and memory. Non-causal (as in the
paper's encoder).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fastattn.core.masks import Mask
from fastattn.registry import register
from .base import PatternMechanism, check_positive
from fastattn.ops.sparse.engine import block_sparse_attention
from fastattn.ops.sparse.plan import cached_plan
from fastattn.ops.sparse.reference import pattern_reference
from fastattn.ops.sparse.patterns import BlockWindow, Pattern, RandomBlocks

_BITS = 31  # the random table holds integers uniform in [0, 2^31)


def pick_random_blocks(u: Tensor, nkb: int, radius: int, is_global: Tensor | int) -> Tensor:
    """Map uniform integers ``u (nqb, r)`` in ``[0, 2^31)`` to distinct key blocks per query block,
    outside the window ``t - radius .. t + radius`` and the global blocks (``is_global``, bool ``(nkb,)``,
    or an int ``g``: the first ``g`` blocks); ``-1`` where fewer remain."""
    nqb, r = u.shape
    if isinstance(is_global, int):
        is_global = torch.arange(nkb, device=u.device) < is_global
    t = torch.arange(nqb, device=u.device)[:, None]
    kb = torch.arange(nkb, device=u.device)[None, :]
    free = ((kb - t).abs() > radius) & ~is_global.to(u.device)[None, :]
    out = torch.full((nqb, r), -1, dtype=torch.long, device=u.device)
    for j in range(r):
        count = free.sum(1)
        kth = torch.minimum((u[:, j].long() * count) >> _BITS, (count - 1).clamp(min=0))  # index among the free
        pick = torch.searchsorted(free.long().cumsum(1), (kth + 1)[:, None]).squeeze(1)
        ok = count > 0
        out[:, j] = torch.where(ok, pick, torch.full_like(pick, -1))
        free[ok, pick[ok]] = False
    return out


@register(
    "bigbird", complexity="O(n b (w + g + r) d)", causal=False, decoding=False, padding=True,
    randomized=True,
    time_growth=1.0, memory_growth=1.0,
)
class BigBirdAttention(PatternMechanism):
    """Window + global + random blocks (see module docstring)."""

    test_options = {"block": 4, "window_blocks": 3, "global_blocks": 2, "random_blocks": 2, "max_blocks": 64}

    @dataclass(frozen=True)
    class Options:
        block: int = 64
        window_blocks: int = 3  # odd: the own block and (window_blocks - 1) / 2 on each side
        global_blocks: int = 2  # global blocks (see global_at)
        random_blocks: int = 3
        max_blocks: int = 2048  # rows of the random table: longest sequence = block * max_blocks
        global_at: str = "ends"  # "ends": first and last blocks (authors' code) | "start": the first ones
        per_head: bool = True  # random blocks drawn per head (authors' code) or shared by all heads

        def __post_init__(self) -> None:
            check_positive(block=self.block, window_blocks=self.window_blocks, max_blocks=self.max_blocks)
            if self.window_blocks % 2 == 0:
                raise ValueError(f"window_blocks must be odd, got {self.window_blocks}")
            if self.global_blocks < 0 or self.random_blocks < 0:
                raise ValueError("global_blocks and random_blocks must be >= 0")
            if self.global_at not in ("ends", "start"):
                raise ValueError(f"global_at must be 'ends' or 'start', got {self.global_at!r}")
            if not isinstance(self.per_head, bool):
                raise ValueError(f"per_head must be a bool, got {self.per_head!r}")

    def __init__(self, options=None, *, generator: torch.Generator | None = None, **kw) -> None:
        super().__init__(options, **kw)
        o = self.options
        tables = self.num_heads if o.per_head else 1
        self.register_buffer("random_table", torch.empty(tables, o.max_blocks, o.random_blocks, dtype=torch.long))
        self.redraw(generator)

    @property
    def heads_independent(self) -> bool:  # type: ignore[override]
        """``per_head=True`` draws each head's random blocks separately."""
        return not self.options.per_head

    @torch.no_grad()
    def redraw(self, generator: torch.Generator | None = None) -> None:
        """Draw new random blocks (uniform integers in ``random_table``)."""
        table = torch.randint(0, 1 << _BITS, self.random_table.shape, generator=generator)
        self.random_table.copy_(table.to(self.random_table.device))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        key = prefix + "random_table"
        old = state_dict.get(key)
        if old is not None and old.is_floating_point():  # a table of uniforms from an older version
            old = (old.double() * (1 << _BITS)).long().clamp_(0, (1 << _BITS) - 1)
            if old.dim() == 2:
                old = old[None].expand(self.random_table.shape[0], -1, -1).contiguous()
            state_dict[key] = old
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def global_block_ids(self, nkb: int, device: torch.device) -> Tensor:
        g, b = self.options.global_blocks, torch.arange(nkb, device=device)
        if self.options.global_at == "start":
            return b < g
        return (b < (g + 1) // 2) | (b >= nkb - g // 2)

    def head_pattern(self, head: int, lq: int, lk: int, device: torch.device) -> Pattern:
        """The pattern of head ``head`` (every head's, with ``per_head=False``)."""
        o = self.options
        if lq > lk:
            raise ValueError(f"bigbird needs query length <= key length (queries are the last Lq of the "
                             f"Lk positions), got {lq} > {lk}")
        nkb = -(-lk // o.block)
        if nkb > o.max_blocks:
            raise ValueError(
                f"bigbird: length {lk} needs {nkb} blocks > max_blocks={o.max_blocks}; raise max_blocks"
            )
        radius = o.window_blocks // 2
        is_global = self.global_block_ids(nkb, device)
        u = self.random_table[head if o.per_head else 0, :nkb].to(device)
        table = pick_random_blocks(u, nkb, radius, is_global)
        pos = torch.arange(lk, device=device)
        glob = pos[is_global[pos // o.block]]
        return Pattern(o.block, (BlockWindow(radius), RandomBlocks(table)), global_keys=glob, global_queries=glob)

    def pattern(self, lq: int, lk: int, device: torch.device) -> Pattern:
        if self.options.per_head:
            raise ValueError("bigbird with per_head=True has one pattern per head: use head_pattern(head, ...)")
        return self.head_pattern(0, lq, lk, device)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, dropout_p: float = 0.0) -> Tensor:
        if not self.options.per_head:
            return super().forward(q, k, v, mask, scale, dropout_p)
        outs = []
        for h in range(q.shape[1]):
            pat = self.head_pattern(h, mask.lq, mask.lk, q.device)
            plan = cached_plan(pat, mask.lq, mask.lk, mask.causal, q.device)
            sl = slice(h, h + 1)
            outs.append(block_sparse_attention(q[:, sl], k[:, sl], v[:, sl], mask, scale, pat, plan=plan))
        return torch.cat(outs, 1)

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
        if not self.options.per_head:
            return super().reference(q, k, v, mask, scale)
        return torch.cat([
            pattern_reference(q[:, h:h + 1], k[:, h:h + 1], v[:, h:h + 1], mask, scale,
                              self.head_pattern(h, mask.lq, mask.lk, q.device))
            for h in range(q.shape[1])
        ], 1)

    def dense_mask(self, lq: int, lk: int, causal: bool = False, device: torch.device | str = "cpu") -> Tensor:
        """The pattern as bool ``(Lq, Lk)`` -- ``(H, Lq, Lk)`` with ``per_head=True`` -- True = may attend."""
        if causal:
            raise ValueError("bigbird has no causal form")
        dev = torch.device(device)
        qpos = torch.arange(lk - lq, lk, device=dev)[:, None]
        kpos = torch.arange(lk, device=dev)[None, :]
        masks = [self.head_pattern(h, lq, lk, dev).dense(qpos, kpos) for h in range(self.random_table.shape[0])]
        return torch.stack(masks) if self.options.per_head else masks[0]
