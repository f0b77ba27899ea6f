"""Compressive Transformer (Rae et al., 2019, arXiv:1911.05507), the attention layer with its memories;
memory construction checked against ``compressive-transformer-pytorch==0.4.0``.

A layer-level mechanism, inherently causal (``is_causal=True`` is required). The input is processed in
segments of ``n_s`` positions (from position 0). A query of segment ``g`` attends, in one softmax, to

* the **compressed memory** (the last ``n_cm`` compressed slots),
* the **memory** (the ``n_m`` hidden states before the segment, Transformer-XL's memory),
* the segment itself, causally.

Memories are the layer's inputs (hidden states), stop-gradient, projected with the current ``W_k, W_v``
(as in the peer). When segment ``g`` is complete, the oldest ``n_s`` memories are evicted and compressed
by ``f_c``, a 1-D convolution with kernel = stride = ``c`` over the hidden states (the paper's best
``f_c``; initialised as mean pooling), into ``n_s / c`` compressed slots appended to the compressed
memory (FIFO, the oldest dropped). The compressed memory is stop-gradient for the task loss: ``f_c`` is
trained by the attention-reconstruction loss alone, ``aux_loss`` = the mean over the segment's (real)
queries, heads and channels of ``(attn(q, old_mem) - attn(q, f_c(old_mem)))^2`` with ``q``, the old
memories and the attention projections detached (computed in training mode, over every compression of
the call; zero in eval mode, as in the peer).

* **State, not hidden attributes.** ``forward`` starts from empty memories. Memories carried across calls
  (consecutive segments of a long text, decoding) travel in the :class:`CompressiveState` that ``step``
  takes and returns: the memories, the compressed memories and the partial segment (tokens not yet
  forming a full segment), so ``step`` over chunks of any size equals the forward over the prefix.
* **Efficient forward.** The memories of every segment are functions of the input, so all segments run
  at once: the compressed slots of the whole input (blocks of ``c`` at fixed positions), and per segment
  the gathered ``[n_cm slots, n_m memories, n_s tokens]`` under torch's fused SDPA kernel with a boolean
  mask (causal inside the segment, padding). O(n (n_cm + n_m + n_s) D) time, O(n D) memory (the mask:
  ``n (n_cm + n_m + n_s)`` bytes). The reference is the paper's recurrence
  literally: segment by segment, FIFO memories, compression at each segment boundary.
* Padding: padded tokens are never attended to (memories carry their padding), a compressed slot with no
  real token is masked, and the reconstruction loss ignores padded queries and memories. ``step`` with a
  ``key_padding_mask`` decodes each row as if alone (rows with padding are advanced one by one).
* Cross-attention (``context`` given): the segments, memories and compression run over the context;
  queries sit at the last ``Lq`` context positions (``Lq <= Lk``). The aux loss then weighs every query.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastattn.core.base import repeat_kv
from fastattn.core.layer import LayerMechanism
from fastattn.core.masks import Mask, masked_softmax
from fastattn.core.state import DecodingState
from fastattn.ops.softmax.fused import fused_attention
from fastattn.registry import register

__all__ = ["CompressiveAttention", "CompressiveState"]


class CompressiveState(DecodingState):
    """Memories of the compressive layer, per batch row (fixed sizes; oldest first):

    * ``mem_k (B, n_m, kdim)``, ``mem_v (B, n_m, vdim)``, ``mem_ok (B, n_m)``: the memory (hidden states);
    * ``cmem_k (B, n_cm, kdim)``, ``cmem_v``, ``cmem_ok``: the compressed memory;
    * ``seg_k (B, n_s, kdim)``, ``seg_v``, ``seg_ok``: the partial segment, its first ``filled`` slots
      used (``filled (B,)``); ``length``: positions seen.
    """

    batched: ClassVar[tuple[str, ...]] = (
        "mem_k", "mem_v", "mem_ok", "cmem_k", "cmem_v", "cmem_ok", "seg_k", "seg_v", "seg_ok", "filled",
    )

    def __init__(self, **tensors: Any) -> None:
        self.length = tensors.pop("length", 0)
        for name in self.batched:
            setattr(self, name, tensors[name])

    @classmethod
    def empty(cls, b: int, kdim: int, vdim: int, sizes: tuple[int, int, int], like: Tensor) -> CompressiveState:
        n_s, n_m, n_cm = sizes
        z = lambda n, d: like.new_zeros(b, n, d)
        f = lambda n: torch.zeros(b, n, dtype=torch.bool, device=like.device)
        return cls(mem_k=z(n_m, kdim), mem_v=z(n_m, vdim), mem_ok=f(n_m), cmem_k=z(n_cm, kdim), cmem_v=z(n_cm, vdim),
                   cmem_ok=f(n_cm), seg_k=z(n_s, kdim), seg_v=z(n_s, vdim), seg_ok=f(n_s),
                   filled=torch.zeros(b, dtype=torch.long, device=like.device))

    def replace(self, **changes: Any) -> CompressiveState:
        fields = {name: getattr(self, name) for name in self.batched}
        fields["length"] = self.length
        fields.update(changes)
        return CompressiveState(**fields)

    @staticmethod
    def stack(rows: list[CompressiveState]) -> CompressiveState:
        fields = {name: torch.cat([getattr(r, name) for r in rows], 0) for name in CompressiveState.batched}
        return CompressiveState(length=rows[0].length, **fields)


@register(
    "compressive", complexity="O(n (n_s + n_m + n_cm) D)", causal=True, decoding=True, padding=True, level="layer",
    time_growth=1.0, memory_growth=1.0,
)
class CompressiveAttention(LayerMechanism):
    """Causal attention over a compressed memory, a memory and the current segment."""

    test_options: ClassVar[dict[str, Any]] = {"segment": 4, "memory": 4, "compressed_memory": 4, "compression": 2}
    deviations = (
        "No relative positional logits (the layer is position-free; add positions outside, or use a core with them).",
        "f_c is the strided convolution only (no pooling, dilated or most-used variants).",
        "n_cm's default (512) is of the order the paper reports; its exact value could not be checked against the PDF.",
    )

    @dataclass(frozen=True)
    class Options:
        segment: int = 512  # n_s: positions per segment
        memory: int = 512  # n_m: memories (hidden states before the segment)
        compressed_memory: int = 512  # n_cm: compressed memory slots
        compression: int = 4  # c: kernel = stride of f_c (paper: 4 on WikiText-103, 3 on Enwik8)

        def __post_init__(self) -> None:
            if self.segment < 1 or self.compression < 1 or self.memory < 0 or self.compressed_memory < 0:
                raise ValueError("segment and compression must be >= 1, memory and compressed_memory >= 0")
            if self.segment % self.compression or self.memory % self.compression:
                raise ValueError(
                    f"segment ({self.segment}) and memory ({self.memory}) must be multiples of compression "
                    f"({self.compression}): evicted memories are compressed in whole blocks"
                )

    def __init__(self, options: Any, config, *, generator: torch.Generator | None = None) -> None:
        super().__init__(options, config, generator=generator)
        fk = {"device": config.device, "dtype": config.dtype}
        d, kv_dim, c = config.embed_dim, self.num_kv_heads * self.head_dim, self.options.compression
        self.q_proj = nn.Linear(d, d, bias=config.bias, **fk)
        self.k_proj = nn.Linear(config.kdim, kv_dim, bias=config.bias, **fk)
        self.v_proj = nn.Linear(config.vdim, kv_dim, bias=config.bias, **fk)
        self.out_proj = nn.Linear(d, d, bias=config.bias, **fk)
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(lin.weight)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        self.compress_k = self._conv(config.kdim, c, fk)
        # values of another width need their own f_c (same inputs otherwise: one f_c)
        self.compress_v = self._conv(config.vdim, c, fk) if config.vdim != config.kdim else None
        if config.dropout > 0:
            raise ValueError("compressive has no attention dropout; use dropout=0")

    @staticmethod
    def _conv(dim: int, c: int, fk: dict) -> nn.Conv1d:
        conv = nn.Conv1d(dim, dim, c, stride=c, **fk)
        with torch.no_grad():  # mean pooling
            conv.weight.copy_(torch.eye(dim, **fk)[:, :, None].expand(dim, dim, c) / c)
            conv.bias.zero_()
        return conv

    @property
    def requires_causal(self) -> bool:
        return True

    @property
    def sizes(self) -> tuple[int, int, int]:
        o = self.options
        return o.segment, o.memory, o.compressed_memory

    # ---- pieces ---------------------------------------------------------------------------------
    def _heads(self, x: Tensor, n: int) -> Tensor:
        b, length, _ = x.shape
        return x.view(b, length, n, self.head_dim).transpose(1, 2)

    def _kv(self, hk: Tensor, hv: Tensor) -> tuple[Tensor, Tensor]:
        """Per-head keys and values ``(B, H, L, d)`` of hidden states (repeated to the query heads)."""
        g = self.num_heads // self.num_kv_heads
        return (repeat_kv(self._heads(self.k_proj(hk), self.num_kv_heads), g),
                repeat_kv(self._heads(self.v_proj(hv), self.num_kv_heads), g))

    def compress(self, hk: Tensor, hv: Tensor, ok: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``f_c`` over hidden states ``(B, L, .)`` (``L`` a multiple of ``c``; padding zeroed first):
        ``(B, L / c, .)`` slots and which hold a real token."""
        c = self.options.compression
        w = ok.to(hk.dtype)[..., None]
        ck = self.compress_k((hk * w).transpose(1, 2)).transpose(1, 2)
        cv = (self.compress_v or self.compress_k)((hv * w).transpose(1, 2)).transpose(1, 2)
        return ck, cv, ok.view(ok.shape[0], -1, c).any(-1)

    def _check(self, attn_mask: Tensor | None, is_causal: bool, x: Tensor, context: Tensor | None) -> None:
        if attn_mask is not None:
            raise ValueError("compressive does not support attn_mask (it would be ignored); use key_padding_mask")
        if not is_causal:
            raise ValueError("compressive attention has no causal form to drop: it is segment-recurrent, call it with is_causal=True")
        if context is not None and x.shape[1] > context.shape[1]:
            raise ValueError(f"compressive needs Lq <= Lk (queries at the last context positions), got {x.shape[1]} > {context.shape[1]}")

    @staticmethod
    def _attend(q: Tensor, k: Tensor, v: Tensor, ok: Tensor, scale: float) -> Tensor:
        """Dense softmax of ``q (B, H, Lq, d)`` over ``k, v (B, H, Lk, d)`` with bool ``ok (B, 1|Lq, Lk)``."""
        bias = torch.zeros(ok.shape, dtype=q.dtype, device=q.device).masked_fill(~ok, float("-inf"))
        return masked_softmax(scale * q @ k.transpose(-1, -2), bias[:, None]) @ v

    # ---- the efficient path ---------------------------------------------------------------------
    def forward(
        self, x: Tensor, context: Tensor | None = None, value: Tensor | None = None, *,
        key_padding_mask: Tensor | None = None, attn_mask: Tensor | None = None, is_causal: bool = False,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        self._check(attn_mask, is_causal, x, context)
        hk = x if context is None else context
        hv = hk if value is None else value
        b, lq, lk = x.shape[0], x.shape[1], hk.shape[1]
        n_s, n_m, n_cm = self.sizes
        c = self.options.compression
        keep = torch.ones(b, lk, dtype=torch.bool, device=x.device) if key_padding_mask is None else ~key_padding_mask
        g_count = -(-lk // n_s)
        total = g_count * n_s
        pad = total - lk
        # compressed slots of the whole (detached) input at fixed blocks of c, and their keys / values
        okp = F.pad(keep, (0, pad), value=False)
        hkd, hvd = F.pad(hk.detach(), (0, 0, 0, pad)), F.pad(hv.detach(), (0, 0, 0, pad))
        ck, cv, c_ok = self.compress(hkd, hvd, okp)
        nk, nv = self._kv(ck.detach(), cv.detach())
        mk, mv = self._kv(hkd, hvd)  # memories: detached hidden states, current projections
        sk, sv = self._kv(F.pad(hk, (0, 0, 0, pad)), F.pad(hv, (0, 0, 0, pad)))  # the segment's own tokens
        starts = torch.arange(g_count, device=x.device) * n_s
        node_idx = (starts[:, None] - n_m) // c - n_cm + torch.arange(n_cm, device=x.device)  # (G, n_cm)
        mem_idx = starts[:, None] - n_m + torch.arange(n_m, device=x.device)  # (G, n_m)
        seg_idx = starts[:, None] + torch.arange(n_s, device=x.device)  # (G, n_s)
        gather = self._gather
        keys = torch.cat([gather(nk, node_idx), gather(mk, mem_idx), gather(sk, seg_idx)], 3)
        values = torch.cat([gather(nv, node_idx), gather(mv, mem_idx), gather(sv, seg_idx)], 3)
        ok = torch.cat([
            c_ok[:, node_idx.clamp(min=0)] & (node_idx >= 0), okp[:, mem_idx.clamp(min=0)] & (mem_idx >= 0),
            okp[:, seg_idx],
        ], 2)  # (B, G, S)
        q = self._queries(x, lk, total)
        qs = q.view(b, self.num_heads, g_count, n_s, self.head_dim).permute(0, 2, 1, 3, 4)
        t = keys.shape[3]
        # slots [n_cm + n_m memories, n_s tokens]; queries bottom-right: the memories are always visible
        mask = Mask(n_s, t, causal=True, key_padding=~ok.reshape(b * g_count, t))
        flat = lambda z: z.reshape(b * g_count, self.num_heads, z.shape[3], z.shape[4])
        out = fused_attention(flat(qs), flat(keys), flat(values), mask, self.head_dim ** -0.5)
        out = out.view(b, g_count, self.num_heads, n_s, self.head_dim).permute(0, 2, 1, 3, 4).reshape(b, self.num_heads, total, -1)
        out = out[:, :, lk - lq: lk]
        self.aux_loss = self._aux(q.detach(), mk, mv, ck, cv, c_ok, okp, keep, lq, lk) if self.training else x.new_zeros(())
        return self.out_proj(out.transpose(1, 2).reshape(b, lq, self.embed_dim)), None

    def _queries(self, x: Tensor, lk: int, total: int) -> Tensor:
        """Queries ``(B, H, total, d)`` at their key positions (the last ``Lq`` of ``Lk``), zero elsewhere."""
        lq = x.shape[1]
        q = self._heads(self.q_proj(x), self.num_heads)
        return F.pad(q, (0, 0, lk - lq, total - lk))

    @staticmethod
    def _gather(t: Tensor, idx: Tensor) -> Tensor:
        """``t (B, H, L, d)`` at positions ``idx (G, S)`` (negative: any, masked by the caller) -> ``(B, G, H, S, d)``."""
        return t[:, :, idx.clamp(min=0)].permute(0, 2, 1, 3, 4)

    def _aux(
        self, q: Tensor, mk: Tensor, mv: Tensor, ck: Tensor, cv: Tensor, c_ok: Tensor, okp: Tensor, keep: Tensor,
        lq: int, lk: int,
    ) -> Tensor:
        """The reconstruction loss of every compression of the call, all at once. After complete segment
        ``g`` (start ``s``) the memories at ``[s - n_m, s - n_m + n_s)`` are evicted; their compressed slots
        are the whole input's at the same blocks of ``c`` (``ck, cv``, trainable ``f_c``). With the
        detached queries ``q (B, H, total, d)`` and memory keys / values ``mk, mv`` (current projections of
        the detached input) and the compressed ones projected by detached weights, the loss is the mean of
        ``(attn(q, old) - attn(q, f_c(old)))^2`` over the real queries of the segments that evict any real
        memory (in any row), heads and channels."""
        n_s, n_m, _ = self.sizes
        c, dev = self.options.compression, q.device
        starts = torch.arange(lk // n_s, device=dev) * n_s
        mem_idx = starts[:, None] - n_m + torch.arange(n_s, device=dev)  # (G, n_s): the evicted memories
        used = (okp[:, mem_idx.clamp(min=0)] & (mem_idx >= 0)).any(2).any(0)
        starts, mem_idx = starts[used], mem_idx[used]
        if not starts.numel():
            return q.new_zeros(())
        seg_idx = starts[:, None] + torch.arange(n_s, device=dev)
        node_idx = (starts[:, None] - n_m) // c + torch.arange(n_s // c, device=dev)
        old_ok = okp[:, mem_idx.clamp(min=0)] & (mem_idx >= 0)  # (B, G, n_s)
        node_ok = c_ok[:, node_idx.clamp(min=0)] & (node_idx >= 0)  # (B, G, n_s / c)
        q_real = keep if lq == lk else torch.ones(keep.shape[0], lq, dtype=torch.bool, device=dev)
        q_ok = F.pad(q_real, (lk - lq, 0), value=False)[:, seg_idx]  # (B, G, n_s)

        def project(h: Tensor, lin: nn.Linear) -> Tensor:  # detached weights: f_c is trained alone
            bias = None if lin.bias is None else lin.bias.detach()
            out = self._heads(F.linear(h, lin.weight.detach(), bias), self.num_kv_heads)
            return repeat_kv(out, self.num_heads // self.num_kv_heads)

        b, g = q.shape[0], starts.shape[0]
        flat = lambda z: z.reshape(b * g, self.num_heads, z.shape[3], z.shape[4])
        qs, s = flat(self._gather(q, seg_idx)), self.head_dim ** -0.5
        with torch.no_grad():
            mask = Mask(n_s, n_s, key_padding=~old_ok.reshape(b * g, -1))
            exact = fused_attention(qs, flat(self._gather(mk, mem_idx)), flat(self._gather(mv, mem_idx)), mask, s)
        nk, nv = self._gather(project(ck, self.k_proj), node_idx), self._gather(project(cv, self.v_proj), node_idx)
        mask = Mask(n_s, nk.shape[3], key_padding=~node_ok.reshape(b * g, -1))
        approx = fused_attention(qs, flat(nk), flat(nv), mask, s)
        w = q_ok.reshape(b * g, 1, n_s, 1).to(q.dtype)
        return ((exact - approx) ** 2 * w).sum() / (w.sum() * self.num_heads * self.head_dim).clamp(min=1)

    # ---- the recurrence (reference and decoding) ------------------------------------------------
    def _advance(
        self, xq: Tensor, hk: Tensor, hv: Tensor, keep: Tensor, state: CompressiveState
    ) -> tuple[Tensor, CompressiveState]:
        """The paper's recurrence over new key positions ``hk, hv (B, T, .)`` (``keep (B, T)``) after
        ``state`` (every row at the same point of its segment); ``xq (B, Tq, D)`` the queries of the last
        ``Tq`` positions. Returns the head outputs ``(B, H, Tq, d)`` and the new state."""
        n_s = self.options.segment
        s = self.head_dim ** -0.5
        t_total, tq = hk.shape[1], xq.shape[1]
        q_all = self._queries(xq, t_total, t_total)
        filled = int(state.filled[0]) if state.filled.numel() else 0
        outs, t = [], 0
        while t < t_total:
            take = min(n_s - filled, t_total - t)
            seg_k, seg_v, seg_ok = state.seg_k.clone(), state.seg_v.clone(), state.seg_ok.clone()
            seg_k[:, filled:filled + take] = hk[:, t:t + take]
            seg_v[:, filled:filled + take] = hv[:, t:t + take]
            seg_ok[:, filled:filled + take] = keep[:, t:t + take]
            ck, cv = self._kv(state.cmem_k, state.cmem_v)
            mk, mv = self._kv(state.mem_k, state.mem_v)
            sk, sv = self._kv(seg_k[:, :filled + take], seg_v[:, :filled + take])
            k, v = torch.cat([ck, mk, sk], 2), torch.cat([cv, mv, sv], 2)
            qpos = torch.arange(filled, filled + take, device=hk.device)[:, None]
            causal = torch.arange(filled + take, device=hk.device)[None, :] <= qpos  # (take, filled + take)
            ok = torch.cat([state.cmem_ok[:, None].expand(-1, take, -1), state.mem_ok[:, None].expand(-1, take, -1),
                            seg_ok[:, None, :filled + take] & causal[None]], 2)
            outs.append(self._attend(q_all[:, :, t:t + take], k, v, ok, s))
            filled += take
            t += take
            state = state.replace(seg_k=seg_k, seg_v=seg_v, seg_ok=seg_ok, length=state.length + take,
                                  filled=torch.full_like(state.filled, filled))
            if filled == n_s:  # the segment is complete: evict the oldest n_s memories, compress them
                new_k = torch.cat([state.mem_k, seg_k.detach()], 1)
                new_v = torch.cat([state.mem_v, seg_v.detach()], 1)
                new_ok = torch.cat([state.mem_ok, seg_ok], 1)
                old_k, old_v, old_ok = new_k[:, :n_s], new_v[:, :n_s], new_ok[:, :n_s]
                comp_k, comp_v, comp_ok = self.compress(old_k, old_v, old_ok)
                state = state.replace(
                    mem_k=new_k[:, n_s:], mem_v=new_v[:, n_s:], mem_ok=new_ok[:, n_s:],
                    cmem_k=torch.cat([state.cmem_k, comp_k.detach()], 1)[:, comp_k.shape[1]:],
                    cmem_v=torch.cat([state.cmem_v, comp_v.detach()], 1)[:, comp_k.shape[1]:],
                    cmem_ok=torch.cat([state.cmem_ok, comp_ok], 1)[:, comp_k.shape[1]:],
                    seg_k=torch.zeros_like(seg_k), seg_v=torch.zeros_like(seg_v),
                    seg_ok=torch.zeros_like(seg_ok), filled=torch.zeros_like(state.filled),
                )
                filled = 0
        out = torch.cat(outs, 2)[:, :, t_total - tq:]
        return out, state

    def _empty(self, hk: Tensor, hv: Tensor) -> CompressiveState:
        return CompressiveState.empty(hk.shape[0], hk.shape[2], hv.shape[2], self.sizes, hk)

    def reference(
        self, x: Tensor, context: Tensor | None = None, value: Tensor | None = None, *,
        key_padding_mask: Tensor | None = None, attn_mask: Tensor | None = None, is_causal: bool = False,
    ) -> Tensor:
        """The paper's recurrence: segment by segment from empty memories, FIFO memory, compression of the
        evicted memories at each segment boundary (no aux loss)."""
        self._check(attn_mask, is_causal, x, context)
        hk = x if context is None else context
        hv = hk if value is None else value
        keep = torch.ones(hk.shape[:2], dtype=torch.bool, device=x.device) if key_padding_mask is None else ~key_padding_mask
        out, _ = self._advance(x, hk, hv, keep, self._empty(hk, hv))
        return self.out_proj(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], self.embed_dim))

    def step(self, x: Tensor, state: Any, *, key_padding_mask: Tensor | None = None) -> tuple[Tensor, Any]:
        """Continue the recurrence over ``x (B, T, D)`` from ``state`` (``None``: empty memories). Rows with
        padding, or rows at different points of their segments, advance one by one over their real tokens."""
        if state is None:
            state = self._empty(x, x)
        b = x.shape[0]
        uniform = bool((state.filled == state.filled[0]).all())
        if key_padding_mask is None and uniform:
            keep = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
            out, state = self._advance(x, x, x, keep, state)
            return self.out_proj(out.transpose(1, 2).reshape(b, x.shape[1], self.embed_dim)), state
        heads = x.new_zeros(b, self.num_heads, x.shape[1], self.head_dim)
        rows = []
        for i in range(b):
            real = torch.ones(x.shape[1], dtype=torch.bool, device=x.device) if key_padding_mask is None else ~key_padding_mask[i]
            row = state.select([i])
            if bool(real.any()):
                xi = x[i:i + 1, real]
                out, row = self._advance(xi, xi, xi, torch.ones(xi.shape[:2], dtype=torch.bool, device=x.device), row)
                heads[i:i + 1, :, real] = out
            rows.append(row)
        length = state.length + x.shape[1]
        state = CompressiveState.stack(rows)
        state.length = length
        return self.out_proj(heads.transpose(1, 2).reshape(b, x.shape[1], self.embed_dim)), state
