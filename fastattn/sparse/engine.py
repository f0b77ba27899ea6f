"""The block-sparse engine: one implementation of every pattern in :mod:`fastattn.sparse.patterns`.

For a :class:`~fastattn.sparse.patterns.Pattern` with block size ``b``, queries and keys are padded to
multiples of ``b`` and viewed as ``(B, H, blocks, b, E)``. Each query block then sees up to four key
*sources*, whose scores are concatenated and normalised by one softmax (a key is never counted twice):

1. **gathered blocks**: the key blocks named by the pattern's layout (constant offsets such as a sliding
   window are taken as shifted slices, other blocks by ``index_select``), one batched matmul;
2. **the column part**: keys at the same offset of every block, a matmul in the transposed layout;
3. **global keys**: a few positions every query sees;
4. **extra nodes**: keys/values that are not sequence positions (memory, relay, summary tokens).

Rows of global queries (which see every key) are computed densely and written over their rows.
Time and memory are O(n * (keys per query)) -- no ``n x n`` tensor exists. Rows with every key masked
return zeros. :func:`dense_pattern_attention` is the literal dense form used by the references and by
decoding over a (bounded) cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.dense import dense_attention
from ..core.masks import Mask, masked_softmax
from ..core.online import compute_dtype
from .patterns import Pattern

__all__ = [
    "Nodes", "block_sparse_attention", "dense_pattern_attention", "pattern_reference", "index_attention",
    "index_mask",
]


@dataclass
class Nodes:
    """Extra keys/values ``(B, H, m, E)`` / ``(B, H, m, Ev)`` the queries may see; ``allow(qpos)``
    (``qpos`` with a trailing singleton axis) gives the bool mask (see :meth:`mask`); None = all."""

    k: Tensor
    v: Tensor
    allow: Callable[[Tensor], Tensor] | None = None

    def mask(self, qpos: Tensor) -> Tensor:
        """Bool ``(B|1, 1, *qpos.shape[:-1], m)``; ``allow`` may return it with or without the two
        leading (batch, head) axes."""
        m = self.k.shape[2]
        if self.allow is None:
            return torch.ones(1, 1, *qpos.shape[:-1], m, dtype=torch.bool, device=qpos.device)
        out = self.allow(qpos)
        if out.dim() == qpos.dim():
            out = out[None, None]
        return out.expand(*out.shape[:2], *qpos.shape[:-1], m)


def _fl(x: Tensor, d: int) -> Tensor:
    return torch.div(x, d, rounding_mode="floor")


def _pad_len(x: Tensor, before: int, after: int) -> Tensor:
    return x if before == after == 0 else F.pad(x, (0, 0, before, after))


def _gather_blocks(kb: Tensor, idx: Tensor, valid: Tensor, qblk: Tensor) -> list[Tensor]:
    """Per layout column, the gathered key blocks ``(B, H, nqb, b, E)``: a shifted slice where the
    column is ``qblk + d`` for a constant ``d``, else ``index_select``."""
    nkb = kb.shape[2]
    diffs = idx - qblk[:, None]
    const = [bool((diffs[valid[:, s], s] == diffs[valid[:, s], s][:1]).all()) if valid[:, s].any() else True
             for s in range(idx.shape[1])]
    shifts = [int(diffs[valid[:, s], s][0]) if valid[:, s].any() else 0 for s in range(idx.shape[1])]
    t0, nqb = int(qblk[0]), len(qblk)
    lo = min([0] + [t0 + d for d, c in zip(shifts, const) if c])
    hi = max([nkb] + [t0 + d + nqb for d, c in zip(shifts, const) if c])
    padded = F.pad(kb, (0, 0, 0, 0, -lo, hi - nkb)) if (lo < 0 or hi > nkb) else kb
    S = idx.shape[1]
    if all(const) and shifts == list(range(shifts[0], shifts[0] + S)):
        # a band of consecutive blocks: one unfold (a single kernel forward and backward)
        a = t0 + shifts[0] - lo
        win = padded[:, :, a:a + nqb + S - 1].unfold(2, S, 1)  # (B, H, nqb, b, E, S)
        return [win.permute(0, 1, 2, 5, 3, 4).reshape(*kb.shape[:2], nqb, S * kb.shape[3], kb.shape[4])]
    out = []
    for s in range(idx.shape[1]):
        if const[s]:
            a = t0 + shifts[s] - lo
            out.append(padded[:, :, a:a + nqb])
        else:
            out.append(kb.index_select(2, idx[:, s]))
    return out


@dataclass
class Plan:
    """Everything about one call that does not depend on the tensors' values: the query/key block
    geometry, the gathered layout and the bool masks of each key source (without key padding).
    Reusable across calls with the same lengths (see ``cache`` in :func:`block_sparse_attention`)."""

    t0: int
    lpad: int
    nqb: int
    nkb: int
    qblk: Tensor
    idx: Tensor
    valid: Tensor
    block_kpos: Tensor | None = None  # (nqb, 1, S*b)
    block_allowed: Tensor | None = None  # (nqb, b, S*b)
    column_kpos: Tensor | None = None  # (1, b, nkb)
    column_allowed: Tensor | None = None  # (nqb, b, nkb)
    gk: Tensor | None = None  # (g,)
    global_allowed: Tensor | None = None  # (nqb, b, g)
    gq: Tensor | None = None  # global queries inside the call, relative to query 0


def make_plan(pattern: Pattern, lq: int, lk: int, causal: bool, device: torch.device) -> Plan:
    bs = pattern.block
    off = lk - lq
    t0 = off // bs
    lpad = off - t0 * bs
    nqb, nkb = -(-(lpad + lq) // bs), -(-lk // bs)
    qblk = t0 + torch.arange(nqb, device=device)
    ar = torch.arange(bs, device=device)
    qpos = (qblk[:, None] * bs + ar)[:, :, None]  # (nqb, bs, 1)
    gk = pattern.global_keys
    is_gk = None
    if gk is not None:
        gk = gk.to(device)
        gk = gk[(gk >= 0) & (gk < lk)]
        if gk.numel():
            is_gk = torch.zeros(nkb * bs, dtype=torch.bool, device=device)
            is_gk[gk] = True
        else:
            gk = None

    def restrict(allowed: Tensor, kpos: Tensor) -> Tensor:
        allowed = allowed & (kpos < lk)
        if causal:
            allowed = allowed & (kpos <= qpos)
        if is_gk is not None:
            allowed = allowed & ~is_gk[kpos.clamp(max=nkb * bs - 1)]
        return allowed

    idx, valid, full = pattern.layout(qblk, nkb, causal)
    plan = Plan(t0, lpad, nqb, nkb, qblk, idx, valid)
    if idx.shape[1]:
        S = idx.shape[1]
        kpos = (idx[:, :, None] * bs + ar).reshape(nqb, 1, S * bs)
        tok = pattern.allow(qpos, kpos)
        allowed = full.repeat_interleave(bs, 1)[:, None, :]
        allowed = allowed if tok is None else allowed | tok
        plan.block_kpos = kpos
        plan.block_allowed = restrict(allowed & valid.repeat_interleave(bs, 1)[:, None, :], kpos)
    if pattern.column is not None:
        kpos = torch.arange(nkb, device=device)[None, None, :] * bs + ar[None, :, None]
        covered = torch.zeros(nqb, nkb, dtype=torch.bool, device=device)
        if idx.shape[1]:
            rows = torch.arange(nqb, device=device)[:, None].expand_as(idx)
            covered[rows[valid], idx[valid]] = True
        plan.column_kpos = kpos
        plan.column_allowed = restrict(pattern.column.allow(qpos, kpos) & ~covered[:, None, :], kpos)
    if gk is not None:
        kpos = gk[None, None, :]
        allowed = (kpos <= qpos) if causal else torch.ones(1, 1, 1, dtype=torch.bool, device=device)
        plan.gk, plan.global_allowed = gk, allowed.expand(nqb, bs, gk.numel())
    gq = pattern.global_queries
    if gq is not None:
        gq = gq.to(device)
        gq = gq[(gq >= off) & (gq < off + lq)] - off
        plan.gq = gq if gq.numel() else None
    return plan


def block_sparse_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, pattern: Pattern, nodes: Nodes | None = None,
    plan: Plan | None = None,
) -> Tensor:
    """Sparse attention of ``q (B, H, Lq, E)`` over ``k, v (B, H, Lk, .)`` under ``pattern`` (and the
    causal / key-padding ``mask``), optionally with extra ``nodes``. ``plan`` (from :func:`make_plan`
    with the same pattern, lengths and causality) skips rebuilding the masks. Returns ``(B, H, Lq, Ev)``."""
    B, H, Lq, E = q.shape
    Lk, Ev = k.shape[2], v.shape[3]
    bs, dev = pattern.block, q.device
    if plan is None:
        plan = make_plan(pattern, Lq, Lk, mask.causal, dev)
    nqb, nkb, lpad = plan.nqb, plan.nkb, plan.lpad
    dt = compute_dtype(q.dtype)
    q_, k_, v_ = q.to(dt), k.to(dt), v.to(dt)
    qb = _pad_len(q_ * scale, lpad, nqb * bs - lpad - Lq).view(B, H, nqb, bs, E)
    kb = _pad_len(k_, 0, nkb * bs - Lk).view(B, H, nkb, bs, E)
    vb = _pad_len(v_, 0, nkb * bs - Lk).view(B, H, nkb, bs, Ev)
    kp = mask.key_padding
    kp_pad = None if kp is None else F.pad(kp, (0, nkb * bs - Lk), value=True)

    def with_padding(allowed: Tensor, kpos: Tensor) -> Tensor:
        allowed = allowed[None, None]
        if kp_pad is not None:
            allowed = allowed & ~kp_pad[:, kpos][:, None]
        return allowed

    scores, allows, apply = [], [], []
    # 1. gathered blocks
    if plan.block_allowed is not None:
        kg = torch.cat(_gather_blocks(kb, plan.idx, plan.valid, plan.qblk), dim=3)  # (B, H, nqb, S*bs, E)
        vg = torch.cat(_gather_blocks(vb, plan.idx, plan.valid, plan.qblk), dim=3)
        scores.append(torch.matmul(qb, kg.transpose(-1, -2)))
        allows.append(with_padding(plan.block_allowed, plan.block_kpos))
        apply.append(lambda p, vg=vg: torch.matmul(p, vg))
    # 2. column part: query (t, r) and key (u, r), transposed layout
    if plan.column_allowed is not None:
        s = torch.matmul(qb.transpose(2, 3), kb.transpose(2, 3).transpose(-1, -2))  # (B, H, bs, nqb, nkb)
        scores.append(s.transpose(2, 3))
        allows.append(with_padding(plan.column_allowed, plan.column_kpos.clamp(max=nkb * bs - 1)))
        vt = vb.transpose(2, 3)
        apply.append(lambda p, vt=vt: torch.matmul(p.transpose(2, 3), vt).transpose(2, 3))
    # 3. global keys
    if plan.gk is not None:
        gk = plan.gk
        kG, vG = k_[:, :, gk][:, :, None], v_[:, :, gk][:, :, None]
        scores.append(torch.matmul(qb, kG.transpose(-1, -2)))
        allows.append(with_padding(plan.global_allowed, gk[None, None, :]))
        apply.append(lambda p, vG=vG: torch.matmul(p, vG))
    # 4. extra nodes
    if nodes is not None:
        qpos = (plan.qblk[:, None] * bs + torch.arange(bs, device=dev))[:, :, None]
        nk, nv = nodes.k.to(dt)[:, :, None], nodes.v.to(dt)[:, :, None]
        scores.append(torch.matmul(qb, nk.transpose(-1, -2)))
        allows.append(nodes.mask(qpos))
        apply.append(lambda p, nv=nv: torch.matmul(p, nv))
    if not scores:
        raise ValueError("the pattern lets no query see any key")

    sizes = [s.shape[-1] for s in scores]
    s = scores[0] if len(scores) == 1 else torch.cat(scores, dim=-1)
    if len(allows) == 1:
        allowed = allows[0]
    else:
        lead = torch.broadcast_shapes(*[a.shape[:-1] for a in allows])
        allowed = torch.cat([a.expand(*lead, a.shape[-1]) for a in allows], dim=-1)
    dead = ~allowed.any(-1, keepdim=True)
    bias = torch.zeros(allowed.shape, dtype=dt, device=dev).masked_fill_(~(allowed | dead), float("-inf"))
    s = s.add_(bias)  # in place (no matmul saves its output); the backward of an add is free
    p = torch.softmax(s, dim=-1)
    parts = [p] if len(sizes) == 1 else torch.split(p, sizes, dim=-1)
    out = apply[0](parts[0])
    for f, pp in zip(apply[1:], parts[1:]):
        out = out + f(pp)
    if bool(dead.any()):
        out = out.masked_fill(dead, 0.0)
    out = out.reshape(B, H, nqb * bs, Ev)[:, :, lpad:lpad + Lq]
    # global queries: dense rows over all keys
    if plan.gq is not None:
        off = Lk - Lq
        rows = dense_pattern_attention(
            q_[:, :, plan.gq], k_, v_, plan.gq + off, torch.arange(Lk, device=dev), scale, pattern,
            causal=mask.causal, key_padding=kp, nodes=nodes,
        )
        out = out.index_copy(2, plan.gq, rows)
    return out.to(q.dtype)


def dense_pattern_attention(
    q: Tensor, k: Tensor, v: Tensor, qpos: Tensor, kpos: Tensor, scale: float, pattern: Pattern, *,
    causal: bool, key_padding: Tensor | None = None, nodes: Nodes | None = None,
) -> Tensor:
    """Dense masked softmax with the literal pattern (``Pattern.dense``) on the given absolute query and
    key positions; the reference, and decoding over a cache whose keys sit at ``kpos``."""
    allowed = pattern.dense(qpos[:, None], kpos[None, :])
    if causal:
        allowed = allowed & (kpos[None, :] <= qpos[:, None])
    allowed = allowed[None, None]
    if key_padding is not None:
        allowed = allowed & ~key_padding[:, None, None, :]
    if nodes is not None:
        na = nodes.mask(qpos[:, None])
        shape = torch.broadcast_shapes(allowed.shape[:-1], na.shape[:-1])
        allowed = torch.cat([allowed.expand(*shape, -1), na.expand(*shape, -1)], dim=-1)
        k = torch.cat([k, nodes.k.to(k.dtype)], dim=2)
        v = torch.cat([v, nodes.v.to(v.dtype)], dim=2)
    bias = torch.zeros(allowed.shape, dtype=compute_dtype(q.dtype), device=q.device).masked_fill(
        ~allowed, float("-inf")
    )
    dt = compute_dtype(q.dtype)
    out = dense_attention(q.to(dt), k.to(dt), v.to(dt), Mask(q.shape[2], k.shape[2]), scale, extra_bias=bias)
    return out.to(q.dtype)


def pattern_reference(
    q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, pattern: Pattern, nodes: Nodes | None = None,
) -> Tensor:
    """The reference of a pattern mechanism: dense softmax under the pattern's literal boolean mask."""
    dev = q.device
    qpos = mask.offset + torch.arange(q.shape[2], device=dev)
    return dense_pattern_attention(
        q, k, v, qpos, torch.arange(k.shape[2], device=dev), scale, pattern,
        causal=mask.causal, key_padding=mask.key_padding, nodes=nodes,
    )


def index_attention(
    q: Tensor, k: Tensor, v: Tensor, idx: Tensor, valid: Tensor, scale: float, bias: Tensor | None = None,
) -> Tensor:
    """Attention of each query over its own list of keys (data-dependent sparsity, e.g. learned edges).

    ``idx`` (long) / ``valid`` (bool) ``(B, H, Lq, K)``: query ``i`` sees keys ``idx[..., i, :]`` where
    ``valid`` (an index must not repeat among a row's valid entries); ``bias`` ``(B, H, Lq, K)`` is added to
    those scores. The chosen keys are gathered as ``(B, H, Lq, K, E)``: O(n K d), no ``Lq x Lk`` tensor.
    Rows with no valid key return zeros. :func:`index_mask` gives the same edges as a dense mask."""
    B, H, Lq, K = idx.shape
    dt = compute_dtype(q.dtype)
    flat = idx.reshape(B, H, Lq * K, 1)
    kg = torch.gather(k.to(dt), 2, flat.expand(-1, -1, -1, k.shape[3])).view(B, H, Lq, K, k.shape[3])
    vg = torch.gather(v.to(dt), 2, flat.expand(-1, -1, -1, v.shape[3])).view(B, H, Lq, K, v.shape[3])
    s = torch.matmul(kg, q.to(dt)[..., None]).squeeze(-1) * scale  # (B, H, Lq, K)
    if bias is not None:
        s = s + bias.to(dt)
    p = masked_softmax(s.masked_fill(~valid, float("-inf")))
    return torch.matmul(p[..., None, :], vg).squeeze(-2).to(q.dtype)


def index_mask(idx: Tensor, valid: Tensor, lk: int, values: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """The edges of :func:`index_attention` as a dense bool ``(B, H, Lq, Lk)`` mask (True = may attend) and,
    given per-edge ``values``, the dense additive bias holding them (for references only)."""
    allowed = torch.zeros(*idx.shape[:-1], lk, dtype=torch.int32, device=idx.device).scatter_add_(
        -1, idx, valid.to(torch.int32)
    ) > 0
    if values is None:
        return allowed, None
    dense = torch.zeros(*idx.shape[:-1], lk, dtype=values.dtype, device=idx.device)
    dense = dense.scatter_add(-1, idx, values.masked_fill(~valid, 0.0))
    return allowed, dense
