"""Block compression of keys and values into memory nodes, their causal visibility, and the decoding
buffer of a block not yet complete.

A sequence of ``n`` positions is cut into blocks of ``c`` consecutive positions counted from position 0
(block ``j`` covers ``[j c, j c + c - 1]``; the last block may be partial and is zero-filled on the
right). Each block becomes one *memory node* by

* ``"conv"``: a strided convolution with kernel = stride = ``c`` whose weights act on the positions of
  the block, one weight per (head, tap) shared by the feature channels (``taps (H, c)``);
* ``"mean"``: the mean over the block's real (unpadded) positions;
* ``"max"``: the channel-wise max over the block's real positions;
* ``"sum"``: the sum over the block's real positions.

Padding positions are zeroed (or excluded) before compressing; a node whose block holds no real position
is *dead* (``alive`` False) and must be masked. Causal rule: node ``j`` is visible to the query at
absolute position ``i`` only when its block has ended, ``j c + c - 1 <= i`` -- i.e. the node sits at the
absolute position of its last token (:func:`node_ends`) and the ordinary causal test ``kpos <= qpos``
applies. The partial last block therefore never reaches a causal query.

:class:`BlockMemory` is the decoding state of such mechanisms: completed nodes per row, the tokens of the
incomplete block (fewer than ``c``) and, optionally, the current local block of raw keys; it counts only
real tokens, so each row of a padded batch decodes as if it were alone.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from fastattn.core.checks import repeat_kv
from fastattn.core.masks import masked_softmax
from fastattn.core.state import DecodingState

__all__ = ["FNS", "BlockMemory", "block_compress", "block_view", "node_ends", "span_means"]

FNS = ("conv", "mean", "max", "sum")


def span_means(x: Tensor, keep: Tensor, p: int) -> tuple[Tensor, Tensor]:
    """Mean of ``x (B, H, L, D)`` over spans of ``p`` positions where ``keep (B, L)``; and which
    spans have any kept position ``(B, L / p)``."""
    blocks, w = block_view(x, keep, p)
    cnt = w.sum(3)
    return blocks.sum(3) / cnt.clamp(min=1), cnt[:, 0, :, 0] > 0


def block_view(x: Tensor, keep: Tensor | None, c: int) -> tuple[Tensor, Tensor]:
    """``x (B, H, L, D)`` with padding zeroed, right-filled with zeros to ``m = ceil(L / c)`` blocks and
    viewed as ``(B, H, m, c, D)``; and the keep weights ``(B, 1, m, c, 1)`` (1 real, 0 padding/fill)."""
    b, _, n, _ = x.shape
    m = -(-n // c)
    w = torch.ones(b, n, dtype=x.dtype, device=x.device) if keep is None else keep.to(x.dtype)
    w = F.pad(w, (0, m * c - n))[:, None, :, None]
    xs = F.pad(x, (0, 0, 0, m * c - n)) * w
    return xs.view(b, x.shape[1], m, c, x.shape[3]), w.view(b, 1, m, c, 1)


def block_compress(
    x: Tensor, keep: Tensor | None, c: int, fn: str, taps: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Compress ``x (B, H, L, D)`` into ``m = ceil(L / c)`` nodes ``(B, H, m, D)`` by ``fn`` (see the module
    docstring; ``"conv"`` needs ``taps (H, c)``); ``keep (B, L)`` marks real positions (None: all).
    Returns the nodes and ``alive (B, m)`` (the block has a real position)."""
    if fn not in FNS:
        raise ValueError(f"compression must be one of {FNS}, got {fn!r}")
    if c < 1:
        raise ValueError(f"the block length (compression factor) must be >= 1, got {c}")
    blocks, w = block_view(x, keep, c)
    alive = w[:, 0, :, :, 0].sum(-1) > 0
    if fn == "mean":
        return blocks.sum(3) / w.sum(3).clamp(min=1), alive
    if fn == "sum":
        return blocks.sum(3), alive
    if fn == "max":
        filled = blocks.masked_fill(w == 0, float("-inf")).amax(3)
        return filled.masked_fill(~alive[:, None, :, None], 0.0), alive
    if taps is None or taps.shape != (x.shape[1], c):
        got = None if taps is None else tuple(taps.shape)
        raise ValueError(f"conv compression needs taps of shape (heads, c) = ({x.shape[1]}, {c}), got {got}")
    return torch.einsum("bhmcd,hc->bhmd", blocks, taps.to(x.dtype)), alive


def node_ends(m: int, c: int, device: torch.device) -> Tensor:
    """Absolute position of the last token of each of ``m`` blocks of ``c``: ``(m,)`` long. A node is
    causally visible to a query at position ``i`` iff its end is ``<= i``."""
    return torch.arange(1, m + 1, device=device) * c - 1


class BlockMemory(DecodingState):
    """Decoding state of block-compressed memories, per batch row (rows may hold different numbers of
    real tokens: padding tokens are skipped, so each row decodes as if alone).

    * ``node_k (B, H, M, E)``, ``node_v (B, H, M, Ev)``, ``nodes (B,)``: the completed nodes (the first
      ``nodes[b]`` slots of row ``b`` are real);
    * ``buf_k (B, H, c, E)``, ``buf_v``, ``filled (B,)``: the tokens of the incomplete block;
    * ``loc_k (B, H, w, E)``, ``loc_v``, ``local (B,)``: the raw tokens of the current local block of
      ``w`` positions (``w = 0``: no local part);
    * ``seen (B,)``: real tokens so far; ``length``: positions so far, padding included.
    """

    batched: ClassVar[tuple[str, ...]] = (
        "node_k", "node_v", "nodes", "buf_k", "buf_v", "filled", "loc_k", "loc_v", "local", "seen",
    )

    def __init__(self, k: Tensor, v: Tensor, c: int, window: int) -> None:
        b, h = k.shape[:2]
        new = lambda n, x: x.new_zeros(b, h, n, x.shape[3])
        count = lambda: torch.zeros(b, dtype=torch.long, device=k.device)
        self.c, self.window, self.length = c, window, 0
        self.node_k, self.node_v, self.nodes = new(16, k), new(16, v), count()  # spare slots, grown on demand
        self.buf_k, self.buf_v, self.filled = new(c, k), new(c, v), count()
        self.loc_k, self.loc_v, self.local = new(window, k), new(window, v), count()
        self.seen = count()

    @classmethod
    def from_prefix(cls, k: Tensor, v: Tensor, c: int, window: int, node_k: Tensor, node_v: Tensor) -> BlockMemory:
        """The state after a prefix ``k, v (B, H, T, .)`` without padding whose complete blocks were already
        compressed into ``node_k, node_v (B, H, >= T // c, .)`` (a prefill run in one parallel call)."""
        s = cls(k, v, c, window)
        t = k.shape[2]
        full, rest = t // c, t % c
        cap = max(16, full)
        s.node_k = F.pad(node_k[:, :, :full], (0, 0, 0, cap - full))
        s.node_v = F.pad(node_v[:, :, :full], (0, 0, 0, cap - full))
        s.buf_k[:, :, :rest], s.buf_v[:, :, :rest] = k[:, :, full * c:], v[:, :, full * c:]
        s.nodes.fill_(full)
        s.filled.fill_(rest)
        if window:
            start = (t - 1) // window * window  # the local block of the last token
            s.loc_k[:, :, :t - start], s.loc_v[:, :, :t - start] = k[:, :, start:], v[:, :, start:]
            s.local.fill_(t - start)
        s.seen.fill_(t)
        s.length = t
        return s

    @staticmethod
    def _put(store: Tensor, index: Tensor, rows: Tensor, x: Tensor) -> Tensor:
        """``store (B, H, S, D)`` with ``x (B, H, D)`` written at slot ``index[b]`` of the rows ``rows``."""
        at = F.one_hot(index.clamp(max=store.shape[2] - 1), store.shape[2]).bool() & rows[:, None]
        return torch.where(at[:, None, :, None], x[:, :, None, :], store)

    def push(self, k: Tensor, v: Tensor, real: Tensor, compress) -> BlockMemory:
        """The state after one token ``k (B, H, E)``, ``v (B, H, Ev)`` in the rows ``real (B,)`` (the
        others see padding and are unchanged). ``compress(buf_k, buf_v) -> (node_k, node_v)`` turns a
        full buffer ``(B, H, c, .)`` into one node ``(B, H, .)``."""
        s = BlockMemory.__new__(BlockMemory)
        vars(s).update(vars(self))
        s.length = self.length + 1
        if s.window:
            restart = real & (self.seen % s.window == 0)
            local = torch.where(restart, torch.zeros_like(self.local), self.local)
            s.loc_k = self._put(self.loc_k, local, real, k)
            s.loc_v = self._put(self.loc_v, local, real, v)
            s.local = local + real.long()
        s.buf_k = self._put(self.buf_k, self.filled, real, k)
        s.buf_v = self._put(self.buf_v, self.filled, real, v)
        s.filled = self.filled + real.long()
        s.seen = self.seen + real.long()
        done = s.filled == s.c
        if bool(done.any()):
            nk, nv = compress(s.buf_k, s.buf_v)
            if int(s.nodes[done].max()) >= s.node_k.shape[2]:  # grow the node store
                grow = max(16, s.node_k.shape[2])
                s.node_k = F.pad(s.node_k, (0, 0, 0, grow))
                s.node_v = F.pad(s.node_v, (0, 0, 0, grow))
            s.node_k = self._put(s.node_k, s.nodes, done, nk)
            s.node_v = self._put(s.node_v, s.nodes, done, nv)
            s.nodes = s.nodes + done.long()
            s.filled = torch.where(done, torch.zeros_like(s.filled), s.filled)
        return s

    def node_valid(self) -> Tensor:
        """``(B, M)``: which node slots hold a completed node."""
        return torch.arange(self.node_k.shape[2], device=self.nodes.device) < self.nodes[:, None]

    def local_valid(self) -> Tensor:
        """``(B, w)``: which local slots hold a token of the current local block."""
        return torch.arange(self.window, device=self.local.device) < self.local[:, None]

    def attend(self, q: Tensor, scale: float, node_valid: Tensor | None = None, key_width: int | None = None) -> Tensor:
        """Softmax attention of one query per row ``q (B, H, 1, E)`` over the local tokens and the
        completed nodes (``node_valid (B, M)`` narrows the nodes; ``key_width``: the keys are the first
        ``key_width`` channels of the stored keys). Stored heads are repeated to ``q``'s heads.
        Returns ``(B, H, 1, Ev)``."""
        groups = q.shape[1] // self.loc_k.shape[1]
        keys = torch.cat([self.loc_k, self.node_k], 2)[..., :key_width]
        values = torch.cat([self.loc_v, self.node_v], 2)
        nodes = self.node_valid() if node_valid is None else node_valid
        valid = torch.cat([self.local_valid(), nodes], 1)
        scores = scale * q @ repeat_kv(keys, groups).transpose(-1, -2)
        bias = torch.zeros(valid.shape, dtype=scores.dtype, device=q.device).masked_fill(~valid, float("-inf"))
        return masked_softmax(scores, bias[:, None, None, :]) @ repeat_kv(values, groups)
