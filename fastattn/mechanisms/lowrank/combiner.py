"""Combiner: Full Attention Transformer with Sparse Computation Cost (Ren et al., 2021, arXiv:2107.05768),
the fixed-partition form (Combiner-Fixed; the authors' ``sqrt_fixed_full``).

The keys are cut into segments of ``b`` positions counted from position 0 (``b ~ sqrt(n)`` in the paper;
a fixed option here, so that decoding has fixed segments). Query ``i`` reaches

* every key of its own segment *directly*: logit ``s q_i . k_j``;
* every other segment ``r`` through its *abstraction*: logit ``s q_i . kbar_r`` with ``kbar_r =
  pool_{j in r} f(k_j)``, and value ``vbar_r = sum_{j in r} q(j | r) v_j``, ``q(j | r) =
  softmax_{j in r}(s qbar_r . k_j)``, ``qbar_r = pool_{j in r} f(q_j)``.

One softmax over the direct and the abstraction logits, so the implied attention is ``p(j | i) =
p(j | i)`` for ``j`` in the own segment and ``p(r | i) q(j | r)`` otherwise: every key is covered exactly
once (directly or through its one segment) and the row sums to 1 (:meth:`CombinerAttention.weights`
returns this matrix). ``f`` is ``identity`` or ``relu`` and ``pool`` is ``max``, ``mean`` or ``sum`` over
the segment's real (unpadded) positions (the paper's ``deepset`` pooling has parameters and is left out).
Every logit carries the usual ``1 / sqrt(d)`` scale.

* Partition: the authors' non-causal code does not mask a query's own segment among the abstractions
  (its keys are then reached twice, directly and through the abstraction); the paper's factorisation
  (and this implementation) excludes it: abstractions only for ``r != own``.
* Causal: the own segment is causally masked and abstractions only for ``r < own`` (a segment is
  summarised once complete). With ``b >= n`` there is one segment and Combiner is exact softmax.
* ``summary="queries"`` (the paper) pools the segment's queries, which needs the queries of every key
  position: self-attention with ``Lq == Lk`` (a ValueError otherwise). ``summary="keys"`` pools the
  segment's keys instead (a deviation; it allows ``Lq != Lk``).
* Padding: padded keys are excluded from the poolings and from ``q(j | r)``; a segment with no real key
  is masked. Decoding (``step``): the raw keys of the current segment, one ``(kbar_r, vbar_r)`` per
  completed segment (:class:`~fastattn.ops.compress.BlockMemory`, with the segment's queries in the
  buffer); padding tokens are skipped, so each row decodes as if alone.
* Efficient path: the block-sparse engine with ``SameBlock(b)`` and the abstractions as extra nodes.
  O(n (b + n / b) d) time, O(n d) memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from fastattn.core.base import Mechanism, repeat_kv
from fastattn.core.masks import Mask, masked_softmax
from fastattn.ops.compress import BlockMemory, block_compress, block_view
from fastattn.ops.sparse.engine import block_sparse_attention
from fastattn.ops.sparse.nodes import Nodes
from fastattn.ops.sparse.patterns import Pattern, SameBlock
from fastattn.registry import register

__all__ = ["CombinerAttention"]

POOLS = ("max", "mean", "sum")
MAPS = ("identity", "relu")
SUMMARIES = ("queries", "keys")


@register(
    "combiner", complexity="O(n (b + n / b) d)", causal=True, decoding=True, padding=True, weights=True,
    time_growth=2.0, memory_growth=1.0,
)
class CombinerAttention(Mechanism):
    """Exact attention inside a segment, one abstraction (pooled key, locally attended value) per other
    segment, in one softmax."""

    positional = True
    test_options: ClassVar[dict[str, Any]] = {"block": 8, "summary": "keys"}
    deviations = (
        "The segment length b is a fixed option (default 64), not sqrt(n), so that decoding keeps fixed segments.",
        "The parameter-free poolings only ({identity, relu}-{max, mean, sum}); the deepset pooling is left out.",
    )

    @dataclass(frozen=True)
    class Options:
        block: int = 64  # b: segment length
        pool: str = "max"  # "max" | "mean" | "sum" over a segment's real positions
        map: str = "identity"  # "identity" | "relu", applied before pooling
        summary: str = "queries"  # what qbar_r pools: the segment's "queries" (paper) or its "keys"

        def __post_init__(self) -> None:
            if self.block < 1:
                raise ValueError(f"block must be >= 1, got {self.block}")
            for name, value, allowed in (("pool", self.pool, POOLS), ("map", self.map, MAPS),
                                         ("summary", self.summary, SUMMARIES)):
                if value not in allowed:
                    raise ValueError(f"{name} must be one of {allowed}, got {value!r}")

    # ---- pieces ---------------------------------------------------------------------------------
    def _pool(self, x: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor]:
        x = F.relu(x) if self.options.map == "relu" else x
        return block_compress(x, keep, self.options.block, self.options.pool)

    def _summary_source(self, q: Tensor, k: Tensor) -> Tensor:
        if self.options.summary == "keys":
            return k
        if q.shape[2] != k.shape[2]:
            raise ValueError(
                f"combiner with summary='queries' pools each segment's queries: it needs Lq == Lk (self-attention), "
                f"got Lq={q.shape[2]}, Lk={k.shape[2]}; use summary='keys' otherwise"
            )
        return q

    def abstractions(self, qs: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, scale: float) -> tuple[Tensor, Tensor, Tensor]:
        """``kbar, vbar (B, H, m, .)`` and ``alive (B, m)`` of the ``m = ceil(Lk / b)`` segments; ``qs`` is
        what ``qbar`` pools (queries or keys, on the keys' positions)."""
        qbar, _ = self._pool(qs, keep)
        kbar, alive = self._pool(k, keep)
        kb, w = block_view(k, keep, self.options.block)  # (B, H, m, b, E), (B, 1, m, b, 1)
        vb, _ = block_view(v, keep, self.options.block)
        logits = scale * torch.einsum("bhme,bhmce->bhmc", qbar, kb)
        p = masked_softmax(logits, torch.zeros_like(w[..., 0]).masked_fill(w[..., 0] == 0, float("-inf")))
        return kbar, torch.einsum("bhmc,bhmcd->bhmd", p, vb), alive

    # ---- the efficient path ---------------------------------------------------------------------
    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, dropout_p: float = 0.0) -> Tensor:
        mask.require_only("key_padding", "causal", op="combiner")
        b = self.options.block
        keep = None if mask.key_padding is None else ~mask.key_padding
        kbar, vbar, alive = self.abstractions(self._summary_source(q, k), k, v, keep, scale)
        causal = mask.causal

        def allow(qpos: Tensor) -> Tensor:
            r = torch.arange(kbar.shape[2], device=qpos.device)
            own = torch.div(qpos, b, rounding_mode="floor")
            ok = r < own if causal else r != own
            lead = (alive.shape[0], 1) + (1,) * (qpos.dim() - 1)
            return ok[None, None] & alive.view(*lead, -1)

        return block_sparse_attention(q, k, v, mask, scale, Pattern(b, (SameBlock(b),)), nodes=Nodes(kbar, vbar, allow))

    # ---- the formula ----------------------------------------------------------------------------
    def _literal_pool(self, x: Tensor, real: Tensor) -> Tensor:
        """``pool_{j in r} f(x_j)`` segment by segment, over real positions; ``(B, H, m, E)``."""
        b, o = self.options.block, self.options
        x = F.relu(x) if o.map == "relu" else x
        m = -(-x.shape[2] // b)
        out = x.new_zeros(x.shape[0], x.shape[1], m, x.shape[3])
        for bi in range(x.shape[0]):
            for r in range(m):
                idx = [j for j in range(r * b, min((r + 1) * b, x.shape[2])) if real[bi, j]]
                if not idx:
                    continue
                seg = x[bi, :, idx]
                out[bi, :, r] = seg.amax(1) if o.pool == "max" else seg.mean(1) if o.pool == "mean" else seg.sum(1)
        return out

    def weights(self, q: Tensor, k: Tensor, mask: Mask, scale: float) -> Tensor:
        """The implied attention ``p(j | i)`` ``(B, H, Lq, Lk)``: the direct part on the own segment,
        ``p(r | i) q(j | r)`` on every other visible segment."""
        b = self.options.block
        lq, lk = q.shape[2], k.shape[2]
        real = torch.ones(q.shape[0], lk, dtype=torch.bool, device=q.device)
        if mask.key_padding is not None:
            real = ~mask.key_padding
        qs = self._summary_source(q, k)
        qbar, kbar = self._literal_pool(qs, real), self._literal_pool(k, real)
        m = kbar.shape[2]
        qpos = torch.arange(lq, device=q.device)[:, None] + mask.q_start
        kpos = torch.arange(lk, device=q.device)[None, :]
        seg_k, own = kpos // b, qpos // b
        direct = (seg_k == own)[None] & real[:, None, :]
        if mask.causal:
            direct = direct & (kpos <= qpos)[None]
        r = torch.arange(m, device=q.device)[None, :]
        alive = torch.stack([real[:, r0 * b:(r0 + 1) * b].any(1) for r0 in range(m)], 1)
        summ = ((r < own) if mask.causal else (r != own))[None] & alive[:, None, :]
        logits = torch.cat([scale * q @ k.transpose(-1, -2), scale * q @ kbar.transpose(-1, -2)], -1)
        allowed = torch.cat([direct, summ], -1)[:, None]
        p = masked_softmax(logits, torch.zeros(allowed.shape, dtype=q.dtype).masked_fill(~allowed, float("-inf")))
        p_direct, p_seg = p[..., :lk], p[..., lk:]
        # q(j | r): softmax over the real keys of segment r of s qbar_r . k_j
        inner = scale * qbar @ k.transpose(-1, -2)  # (B, H, m, Lk)
        member = (seg_k == r.transpose(0, 1))[None] & real[:, None, :]  # (B, m, Lk)
        q_jr = masked_softmax(inner, torch.zeros(member.shape, dtype=q.dtype).masked_fill(~member, float("-inf"))[:, None])
        return p_direct + p_seg @ q_jr

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
        return self.weights(q, k, mask, scale) @ v

    # ---- decoding -------------------------------------------------------------------------------
    def step(
        self, q: Tensor, k: Tensor, v: Tensor, state: Any, scale: float, key_padding_mask: Tensor | None = None
    ) -> tuple[Tensor, Any]:
        """The current segment's raw keys and one abstraction per completed segment; the buffer keeps the
        segment's keys and (``summary="queries"``) its queries until the segment is complete."""
        dtype = q.dtype
        q, k, v = self.upcast(q, k, v)
        b, e, groups = self.options.block, q.shape[3], q.shape[1] // k.shape[1]
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        kq = torch.cat([k, q if self.options.summary == "queries" else k], -1)
        if state is None:
            state = BlockMemory(kq, v, b, b)

        def compress(buf_kq: Tensor, buf_v: Tensor) -> tuple[Tensor, Tensor]:
            bk, bq = buf_kq[..., :e], buf_kq[..., e:]
            kbar, vbar, _ = self.abstractions(bq, bk, buf_v, None, scale)
            return torch.cat([kbar, kbar], -1)[:, :, 0], vbar[:, :, 0]

        outs = []
        for t in range(q.shape[2]):
            real = torch.ones(q.shape[0], dtype=torch.bool, device=q.device)
            if key_padding_mask is not None:
                real = ~key_padding_mask[:, t]
            state = state.push(kq[:, :, t], v[:, :, t], real, compress)
            node_ok = state.node_valid()
            just_done = (state.filled == 0) & real  # this token completed its own segment: not an abstraction
            last = torch.arange(node_ok.shape[1], device=q.device) == (state.nodes - 1)[:, None]
            node_ok = node_ok & ~(last & just_done[:, None])
            outs.append(state.attend(q[:, :, t:t + 1], scale, node_ok, key_width=e))
        return torch.cat(outs, 2).to(dtype), state
