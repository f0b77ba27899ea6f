"""Memory-compressed attention (Liu et al., 2018, "Generating Wikipedia by Summarizing Long Sequences",
arXiv:1801.10198).

Keys and values are shortened by a strided convolution with kernel = stride = ``c`` (the compression
factor, 3 in the paper), then the queries attend over the ``ceil(n / c)`` compressed nodes:
``out = softmax(s Q Conv_c(K)^T) Conv_c(V)``. The paper's decoder (T-DMCA) interleaves such layers with
local attention inside blocks of 256; ``mode="both"`` offers the two in one softmax, over the keys of the
query's own local block and the visible compressed nodes (a key may then be seen twice, directly and
through its node, as when the two kinds of layer are stacked).

* Blocks of ``c`` positions are counted from position 0 (block ``j`` covers ``[j c, j c + c - 1]``; a
  partial last block is zero-filled). Padded keys and values are zeroed before the convolution; a node
  whose block is all padding is masked.
* Causal: node ``j`` is visible to the query at position ``i`` only when ``j c + c - 1 <= i`` (the block
  has ended; :mod:`fastattn.ops.compress`); the local block is causally masked. Without the local part
  the first ``c - 1`` queries see no key at all and return zeros (no null key).
* Decoding (``step``): completed nodes, the fewer than ``c`` tokens of the incomplete block, and the raw
  tokens of the current local block (:class:`~fastattn.ops.compress.BlockMemory`); a block is convolved
  once its ``c``-th token arrives. Padding tokens are skipped, so each row of a padded batch decodes as if
  alone (in ``forward`` blocks sit at absolute positions, padding included).
* Efficient paths: flash attention over the nodes (the node's last position as its key position, dead
  nodes as a bias; non-causal with every node alive, torch's fused SDPA over the nodes), or the
  block-sparse engine (``SameBlock`` local part plus the nodes). O(n (n / c + w) d) time, O(n) memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from fastattn.core.base import Mechanism, repeat_kv
from fastattn.core.masks import Mask, masked_softmax
from fastattn.ops.compress import FNS, BlockMemory, block_compress, node_ends
from fastattn.ops.softmax.flash import flash_attention
from fastattn.ops.sparse.engine import block_sparse_attention
from fastattn.ops.sparse.nodes import Nodes
from fastattn.ops.sparse.patterns import Pattern, SameBlock
from fastattn.registry import register

__all__ = ["MemoryCompressedAttention"]

MODES = ("compressed", "both")


@register(
    "memory_compressed", complexity="O(n (n / c + w) d)", causal=True, decoding=True, padding=True,
    time_growth=2.0, memory_growth=1.0,
)
class MemoryCompressedAttention(Mechanism):
    """Softmax attention over keys and values compressed by a strided convolution (optionally beside a
    local block)."""

    native_gqa = True
    positional = True
    test_options: ClassVar[dict[str, Any]] = {"compression": 3, "mode": "both", "block": 8}
    heads_independent = False  # per-head compression taps
    deviations = (
        (
            "The strided convolution has one weight per (head, tap), shared by the feature channels (a learned "
            "weighted pooling of each block), not a full channel-mixing convolution: a sequence-level mechanism "
            "does not know the value width."
        ),
        (
            "mode='both' puts the local block and the compressed nodes in one softmax; the paper interleaves "
            "local and compressed layers."
        ),
    )

    @dataclass(frozen=True)
    class Options:
        compression: int = 3  # c: kernel = stride of the convolution (positions per node)
        mode: str = "compressed"  # "compressed" | "both" (local block + compressed nodes, one softmax)
        block: int = 256  # local block length (mode="both")
        fn: str = "conv"  # "conv" (learned taps) | "mean" | "max"

        def __post_init__(self) -> None:
            if self.compression < 1 or self.block < 1:
                raise ValueError(f"compression and block must be >= 1, got {self.compression}, {self.block}")
            if self.mode not in MODES:
                raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
            if self.fn not in FNS:
                raise ValueError(f"fn must be one of {FNS}, got {self.fn!r}")

    def __init__(self, options=None, *, head_dim: int, num_heads: int, num_kv_heads: int | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(options, head_dim=head_dim, num_heads=num_heads, num_kv_heads=num_kv_heads)
        c = self.options.compression
        self.k_taps = self.v_taps = None
        if self.options.fn == "conv":  # initialised as mean pooling
            self.k_taps = nn.Parameter(torch.full((self.num_kv_heads, c), 1.0 / c))
            self.v_taps = nn.Parameter(torch.full((self.num_kv_heads, c), 1.0 / c))

    # ---- pieces ---------------------------------------------------------------------------------
    def compress(self, k: Tensor, v: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Nodes ``(B, Hkv, m, .)`` of ``k`` and ``v`` and ``alive (B, m)``."""
        o = self.options
        nk, alive = block_compress(k, keep, o.compression, o.fn, self.k_taps)
        nv, _ = block_compress(v, keep, o.compression, o.fn, self.v_taps)
        return nk, nv, alive

    @staticmethod
    def _keep(mask: Mask) -> Tensor | None:
        return None if mask.key_padding is None else ~mask.key_padding

    # ---- the efficient path ---------------------------------------------------------------------
    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, dropout_p: float = 0.0) -> Tensor:
        mask.require_only("key_padding", "causal", op="memory_compressed")
        o = self.options
        groups = q.shape[1] // k.shape[1]
        nk, nv, alive = self.compress(k, v, self._keep(mask))
        nk, nv = repeat_kv(nk, groups), repeat_kv(nv, groups)
        ends = node_ends(nk.shape[2], o.compression, q.device)
        if o.mode == "compressed":
            if not mask.causal and bool(alive.all()):  # every query sees every node: torch's fused kernel
                return torch.nn.functional.scaled_dot_product_attention(q, nk, nv, scale=scale)
            dead = torch.zeros(alive.shape, dtype=q.dtype, device=q.device).masked_fill(~alive, float("-inf"))
            node_mask = Mask(
                q.shape[2], nk.shape[2], causal=mask.causal, q_start=mask.q_start,
                k_positions=ends.view(1, 1, -1), bias=dead[:, None, None, :],
            )
            return flash_attention(q, nk, nv, node_mask, scale)
        causal = mask.causal

        def allow(qpos: Tensor) -> Tensor:
            ok = ends <= qpos if causal else (ends >= 0) & (qpos >= 0)
            lead = (alive.shape[0], 1) + (1,) * (qpos.dim() - 1)
            return ok[None, None] & alive.view(*lead, -1)

        pattern = Pattern(o.block, (SameBlock(o.block),))
        return block_sparse_attention(
            q, repeat_kv(k, groups), repeat_kv(v, groups), mask, scale, pattern, nodes=Nodes(nk, nv, allow)
        )

    # ---- the formula ----------------------------------------------------------------------------
    def _literal_nodes(self, x: Tensor, keep: Tensor | None, taps: Tensor | None) -> Tensor:
        """``Conv_c`` written as its sum over taps: node ``j = sum_t w_t x_{j c + t}`` (padding zeroed)."""
        c = self.options.compression
        if self.options.fn != "conv":
            return block_compress(x, keep, c, self.options.fn)[0]
        if keep is not None:
            x = x * keep[:, None, :, None].to(x.dtype)
        n, m = x.shape[2], -(-x.shape[2] // c)
        out = x.new_zeros(x.shape[0], x.shape[1], m, x.shape[3])
        for j in range(m):
            for t in range(c):
                if j * c + t < n:
                    out[:, :, j] += taps[:, t, None].to(x.dtype) * x[:, :, j * c + t]
        return out

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
        o = self.options
        c, groups = o.compression, q.shape[1] // k.shape[1]
        keep = self._keep(mask)
        nk = repeat_kv(self._literal_nodes(k, keep, self.k_taps), groups)
        nv = repeat_kv(self._literal_nodes(v, keep, self.v_taps), groups)
        m, lk = nk.shape[2], k.shape[2]
        qpos = torch.arange(q.shape[2], device=q.device)[:, None] + mask.q_start  # (Lq, 1)
        real = torch.ones(q.shape[0], lk, dtype=torch.bool, device=q.device) if keep is None else keep
        ends = torch.tensor([j * c + c - 1 for j in range(m)], device=q.device)
        alive = torch.stack([real[:, j * c:(j + 1) * c].any(1) for j in range(m)], 1)  # (B, m)
        see_node = ((ends <= qpos) if mask.causal else torch.ones(q.shape[2], m, dtype=torch.bool, device=q.device))[None] & alive[:, None]
        keys, values, allowed = nk, nv, see_node[:, None]
        if o.mode == "both":
            kpos = torch.arange(lk, device=q.device)
            see = (kpos // o.block == qpos // o.block)[None] & real[:, None, :]
            if mask.causal:
                see = see & (kpos <= qpos)[None]
            keys = torch.cat([repeat_kv(k, groups), nk], 2)
            values = torch.cat([repeat_kv(v, groups), nv], 2)
            allowed = torch.cat([see, see_node], 2)[:, None]
        scores = scale * q @ keys.transpose(-1, -2)
        bias = torch.zeros(allowed.shape, dtype=q.dtype).masked_fill(~allowed, float("-inf"))
        return masked_softmax(scores, bias) @ values

    # ---- decoding -------------------------------------------------------------------------------
    def step(
        self, q: Tensor, k: Tensor, v: Tensor, state: Any, scale: float, key_padding_mask: Tensor | None = None
    ) -> tuple[Tensor, Any]:
        dtype = q.dtype
        q, k, v = self.upcast(q, k, v)
        o = self.options
        window = o.block if o.mode == "both" else 0
        if state is None and key_padding_mask is None and not torch.is_grad_enabled():
            # prefill: the parallel causal forward, and the state built from the same nodes
            out = self.forward(q, k, v, Mask(q.shape[2], k.shape[2], causal=True), scale)
            nk, nv, _ = self.compress(k, v, None)
            return out.to(dtype), BlockMemory.from_prefix(k, v, o.compression, window, nk, nv)
        if state is None:
            state = BlockMemory(k, v, o.compression, window)

        def compress(bk: Tensor, bv: Tensor) -> tuple[Tensor, Tensor]:
            nk, nv, _ = self.compress(bk, bv, None)
            return nk[:, :, 0], nv[:, :, 0]

        outs = []
        for t in range(q.shape[2]):
            real = torch.ones(q.shape[0], dtype=torch.bool, device=q.device)
            if key_padding_mask is not None:
                real = ~key_padding_mask[:, t]
            state = state.push(k[:, :, t], v[:, :, t], real, compress)
            outs.append(state.attend(q[:, :, t:t + 1], scale))
        return torch.cat(outs, 2).to(dtype), state
