"""Bucketed attention: queries and keys grouped by a content label (hash bucket, cluster id), each query
attending a bounded set of keys near it in the label-sorted order, several rounds merged.

One round ``r`` has integer labels ``hq (B, H, Lq)`` and ``hk (B, H, Lk)`` in ``[0, n_labels)``. Keys are
sorted by ``(label, original position)`` with :func:`~fastattn.ops.permute.sort_by`; padding keys get the
label ``n_labels`` (after every real label), so their content never moves a real key. Which keys a query
sees (its *selection* ``S_r(i)``):

* **chunks** (``causal=False``): queries are sorted the same way; query slot ``s`` falls in chunk
  ``u = floor(s * Lk / Lq) // chunk`` (``s // chunk`` when ``Lq == Lk``) and sees the key slots of chunks
  ``u - 1`` and ``u`` (no cyclic wrap: the first chunk has no look-back), whatever their label;
* **causal window** (``causal=True``): query ``i`` sees the last ``window`` keys ``j`` with ``hk_j = hq_i``
  and ``pos_j <= pos_i`` -- decided by past tokens only, so changing the future never changes the past
  (a chunk boundary after a global sort would depend on how many future tokens sort before ``i``);
* **label window** (``same_label=True``, not causal): query ``i`` sees the keys with ``hk_j = hq_i`` among
  the ``window`` key slots around its own place in the key order (``window >= 2 Lk``: every key of its
  label -- exact cluster attention).

Causality, padding and the optional ``self_penalty`` (added to the score of the key at the query's own
position) are decided on the ORIGINAL positions the permutation carries (the ``Mask``'s ``q_pos`` /
``k_pos`` and padding). A round runs on dense tiles: queries in their own ``(label, position)`` order, in
tiles of ``chunk`` (window modes: ``max(chunk, TILE)``), each against the contiguous run of sorted keys
covering its queries' selections (the slot ranges grow along the query order), masked to the exact
selections. When labels are so skewed that some tile's run exceeds ``4 window + tile`` slots, the round
falls back to explicit per-query lists of at most ``2 chunk`` (or ``window``) key indices, attended by
:func:`~fastattn.ops.gather.index_attention` (query groups of bounded size, recomputing backward). No
``(B, H, n, K, E)`` tensor exists on either path. Rounds give partials ``(out_r, lse_r)``
merged by :func:`~fastattn.ops.softmax.online.merge_partials`; with ``dedup`` every score of a pair seen
in ``N_ij`` rounds is lowered by ``log N_ij``, so the merge is the softmax over the union of the
selections with each key counted once.

:func:`selection_mask` builds the same selections densely (by counting, not by searching) for
references; :func:`bucketed_reference` is the dense float64 formula.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastattn.core.masks import NEG_INF, Mask
from fastattn.ops.chunked import checkpointed
from fastattn.ops.gather import index_attention
from fastattn.ops.permute import sort_by
from fastattn.ops.sparse import engine
from fastattn.ops.softmax.online import merge_partials, tile_partial

__all__ = ["angular_hash", "bucketed_attention", "bucketed_reference", "selection_mask"]


def angular_hash(x: Tensor, rotations: Tensor, n_buckets: int) -> Tensor:
    """Angular LSH of ``x (B, H, L, E)`` for each round: ``argmax([x R_r ; -x R_r])`` with ``rotations
    (rounds, E, ceil(n_buckets / 2))`` (only the first ``n_buckets`` of the ``2 ceil(n/2)`` directions are
    used). Returns long ``(rounds, B, H, L)``; one bucket gives zeros."""
    if n_buckets == 1:
        return torch.zeros(rotations.shape[0], *x.shape[:3], dtype=torch.long, device=x.device)
    xr = torch.einsum("bhle,ref->rbhlf", x.detach(), rotations.to(x.dtype))
    return torch.cat([xr, -xr], dim=-1)[..., :n_buckets].argmax(dim=-1)


def _positions(mask: Mask, B: int, H: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """``q_pos (B, H, Lq)``, ``k_pos (B, H, Lk)`` and ``k_real (B, H, Lk)`` (False for padding)."""
    qp = mask.q_pos(device).expand(B, H, mask.lq)
    kp = mask.k_pos(device).expand(B, H, mask.lk)
    keep = mask.key_keep(torch.float32)
    real = torch.ones(B, H, mask.lk, dtype=torch.bool, device=device) if keep is None else (
        keep[..., 0].to(device) > 0).expand(B, H, mask.lk)
    return qp, kp, real


def _check(hq: Tensor, hk: Tensor, mask: Mask, chunk: int, window: int) -> None:
    mask.require_only("key_padding", "causal", "offsets", "q_positions", "k_positions", op="bucketed attention")
    if hq.dim() != 4 or hk.dim() != 4 or hq.shape[0] != hk.shape[0]:
        raise ValueError(f"labels must be (rounds, B, H, L) for queries and keys, got {tuple(hq.shape)}, {tuple(hk.shape)}")
    if chunk < 1 or window < 1:
        raise ValueError(f"chunk and window must be >= 1, got {chunk}, {window}")


class _Round:
    """One round's geometry: ``inverse`` (B, H, Lk) the sorted slot of every key, ``order`` the key at every
    slot, ``klabel`` the keys' labels (padding: ``n_labels``), and per query the slot range ``[lo, hi)`` it
    sees and its label ``qlabel`` (``(B, H, Lq)`` each)."""

    def __init__(self, hq: Tensor, hk: Tensor, qp: Tensor, kp: Tensor, real: Tensor, n_labels: int,
                 causal: bool, chunk: int, window: int, same_label: bool) -> None:
        lq, lk = hq.shape[-1], hk.shape[-1]
        span = int(max(int(qp.max()), int(kp.max())) + 1)
        self.klabel = torch.where(real, hk, torch.full_like(hk, n_labels))
        composite = self.klabel * span + kp
        kperm = sort_by(composite)
        self.inverse, self.order, self.qlabel = kperm.inverse, kperm.order, hq
        self.same_label = causal or same_label
        self.qorder = qorder = sort_by(hq * span + qp)
        # the queries sort exactly like the keys (self-attention, same labels, no padding): the blocked path
        self.shared = lq == lk and torch.equal(qorder.order, kperm.order)
        if self.same_label:
            at = torch.searchsorted(kperm.sort(composite[..., None])[..., 0].contiguous(),
                                    (hq * span + qp).contiguous(), right=True)
            self.lo = at - (window if causal else window // 2)
            self.hi = self.lo + window
        else:
            u = torch.div(qorder.inverse * lk, lq, rounding_mode="floor") // chunk
            self.lo, self.hi = (u - 1) * chunk, (u + 1) * chunk

    def member(self, idx: Tensor, at: Tensor | None = None) -> Tensor:
        """Whether the keys ``idx (B, H, ..., K)`` (original indices) are in the selection of their queries:
        the queries ``0 .. Lq-1`` (``idx (B, H, Lq, K)``), or the original queries ``at (B, H, ...)``
        (``idx`` may have size-1 axes that broadcast against ``at``)."""
        B, H = idx.shape[0], idx.shape[1]
        lo, hi, lab = self.lo, self.hi, self.qlabel
        if at is not None:
            lo, hi, lab = (x.gather(-1, at.reshape(B, H, -1)).view(at.shape) for x in (lo, hi, lab))
        flat = idx.reshape(B, H, -1)
        slot = self.inverse.gather(-1, flat).view(idx.shape)
        inside = (slot >= lo[..., None]) & (slot < hi[..., None])
        if self.same_label:
            inside = inside & (self.klabel.gather(-1, flat).view(idx.shape) == lab[..., None])
        return inside


TILE = 64  # sorted queries per dense tile when the selections are windows (chunk mode: the chunk)


def _blocked_round(
    q: Tensor, k: Tensor, v: Tensor, rd: _Round, rounds: list[_Round], qp: Tensor, kp: Tensor, real: Tensor,
    scale: float, chunk: int, causal: bool, dedup: bool, self_penalty: float | None, max_width: int,
) -> tuple[Tensor, Tensor] | None:
    """One round on dense tiles: tiles of ``chunk`` queries in their sorted order against the contiguous
    run of sorted keys covering their selections (the selections' slot ranges grow along the query order,
    so a tile's run starts at its first query's ``lo`` and ends at its largest ``hi``), no per-query gather.
    Returns the partial ``(out, lse)`` in the original query order, or ``None`` when some tile's run is
    wider than ``max_width`` key slots (skewed labels: the per-query lists are then cheaper)."""
    B, H, lq, E = q.shape
    lk = k.shape[2]
    order, qorder, qinverse = rd.order, rd.qorder.order, rd.qorder.inverse
    nc = -(-lq // chunk)
    pad = nc * chunk - lq

    def srt(x: Tensor) -> Tensor:  # (B, H, lq, ...) in the queries' sorted order
        return x.gather(2, qorder.view(B, H, lq, *(1,) * (x.dim() - 3)).expand(B, H, lq, *x.shape[3:]))

    def blocks(x: Tensor, fill: float | int | bool = 0) -> Tensor:  # (B, H, nc, chunk, ...) sorted, padded
        xs = srt(x)
        if pad:
            xs = torch.cat([xs, xs.new_full((B, H, pad, *xs.shape[3:]), fill)], dim=2)
        return xs.view(B, H, nc, chunk, *xs.shape[3:])

    lo, hi = blocks(rd.lo), blocks(rd.hi, fill=-lk)
    start = lo[..., 0].clamp_min(0)  # (B, H, nc): the selections' slot ranges start no earlier
    wb = max(1, int((hi.amax(-1).clamp(max=lk) - start).max()))
    if wb > max_width:
        return None
    kslot = start[..., None] + torch.arange(wb, device=q.device)  # (B, H, nc, wb)
    inrange = kslot < lk
    kidx = order.gather(-1, kslot.clamp_max(lk - 1).view(B, H, -1)).view(B, H, nc, wb)  # original key indices
    qidx = blocks(torch.arange(lq, device=q.device).expand(B, H, lq))  # original query index of each row
    qpos = blocks(qp)
    rowok = (torch.arange(nc * chunk, device=q.device) < lq).view(nc, chunk)

    def tiles(qg: Tensor, k: Tensor, v: Tensor, t0: int, t1: int) -> tuple[Tensor, Tensor]:
        """The partial of tiles ``t0 .. t1 - 1`` (their keys gathered, scored, masked exactly)."""
        kid = kidx[:, :, t0:t1]
        n_t = t1 - t0

        def take(x: Tensor) -> Tensor:  # (B, H, n_t, wb, D)
            return x.gather(2, kid.reshape(B, H, -1, 1).expand(B, H, n_t * wb, x.shape[3])).view(
                B, H, n_t, wb, x.shape[3])

        kb, vb = take(k), take(v)
        s = torch.matmul(qg, kb.transpose(-1, -2)) * scale  # (B, H, n_t, chunk, wb)
        ks = kslot[:, :, t0:t1, None, :]
        valid = (ks >= lo[:, :, t0:t1, :, None]) & (ks < hi[:, :, t0:t1, :, None]) & inrange[:, :, t0:t1, None, :]
        valid = valid & real.gather(-1, kid.reshape(B, H, -1)).view(B, H, n_t, 1, wb) & rowok[t0:t1, :, None]
        kpos = kp.gather(-1, kid.reshape(B, H, -1)).view(B, H, n_t, 1, wb)
        qpos_t = qpos[:, :, t0:t1, :, None]
        kfull, qid = kid[..., None, :], qidx[:, :, t0:t1]  # keys broadcast over the tile's queries in member()
        if rd.same_label:
            valid = valid & rd.member(kfull, qid)
        if causal:
            valid = valid & (kpos <= qpos_t)
        if self_penalty is not None:
            s = s + (kpos == qpos_t).to(s.dtype) * self_penalty
        if dedup and len(rounds) > 1:
            count = sum(other.member(kfull, qid).to(s.dtype) for other in rounds)
            s = s - torch.log(count.clamp_min(1))
        return tile_partial(s.masked_fill(~valid, NEG_INF), lambda e: torch.matmul(e, vb.to(e.dtype)))

    qb = blocks(q)
    # tiles in groups of about GROUP_BYTES of scores, each recomputed in backward (checkpointed): the
    # working set is one group's, whatever n
    per_tile = B * H * chunk * wb * q.element_size()
    group = max(1, engine.GROUP_BYTES.get(q.device.type, engine.GROUP_BYTES["cuda"]) // per_tile)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    outs, lses = [], []
    for t0 in range(0, nc, group):
        t1 = min(t0 + group, nc)
        o, l_ = checkpointed(tiles, qb[:, :, t0:t1], k, v, t0, t1) if grad else tiles(qb[:, :, t0:t1], k, v, t0, t1)
        outs.append(o), lses.append(l_)
    out, lse = torch.cat(outs, 2), torch.cat(lses, 2)
    out = out.reshape(B, H, nc * chunk, -1)[:, :, :lq]
    lse = lse.reshape(B, H, nc * chunk)[:, :, :lq]
    return (out.gather(2, qinverse[..., None].expand(B, H, lq, out.shape[-1])), lse.gather(2, qinverse))


def bucketed_attention(
    q: Tensor, k: Tensor, v: Tensor, hq: Tensor, hk: Tensor, n_labels: int, mask: Mask, scale: float, *,
    chunk: int, window: int | None = None, dedup: bool = True, self_penalty: float | None = None,
    same_label: bool = False, blocked: bool = True,
) -> Tensor:
    """Attention of ``q (B, H, Lq, E)`` over ``k, v (B, H, Lk, .)`` within label-sorted neighbourhoods,
    ``hq (R, B, H, Lq)`` / ``hk (R, B, H, Lk)`` the labels of ``R`` rounds (see the module docstring).
    ``mask.causal`` picks the causal window (``window``, default ``2 chunk``), ``same_label`` the label window
    when not causal, else chunks; ``self_penalty`` is added to
    the score of the key at the query's own position. Returns ``(B, H, Lq, Ev)``; rows that see no key
    return zeros. Rounds run on dense tiles of sorted queries (``blocked``; per-query key lists when a
    tile's key run is too wide, or with ``blocked=False``); same result."""
    window = 2 * chunk if window is None else window
    _check(hq, hk, mask, chunk, window)
    B, H, lq, lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    causal = mask.causal
    qp, kp, real = _positions(mask, B, H, q.device)
    rounds = [_Round(hq[r], hk[r], qp, kp, real, n_labels, causal, chunk, window, same_label)
              for r in range(hq.shape[0])]
    width = min(window if (causal or same_label) else 2 * chunk, lk)
    offs = torch.arange(width, device=q.device)
    parts = []
    tile = chunk if not (causal or same_label) else max(chunk, TILE)
    for rd in rounds:
        if blocked:  # dense tiles, unless the labels are so skewed that a tile's key run is too wide
            part = _blocked_round(q, k, v, rd, rounds, qp, kp, real, scale, tile, causal, dedup, self_penalty,
                                  max_width=4 * width + tile)
            if part is not None:
                parts.append(part)
                continue
        slot = rd.lo.clamp_min(0)[..., None] + offs  # (B, H, Lq, K): the selection's slot range, clipped
        inrange = (slot < rd.hi[..., None]) & (slot < lk)
        idx = rd.order.gather(-1, slot.clamp_max(lk - 1).view(B, H, -1)).view(B, H, lq, width)
        kpos = kp.gather(-1, idx.view(B, H, -1)).view(idx.shape)
        valid = inrange & real.gather(-1, idx.view(B, H, -1)).view(idx.shape)
        if rd.same_label:
            valid = valid & rd.member(idx)
        if causal:
            valid = valid & (kpos <= qp[..., None])
        bias = torch.zeros(valid.shape, dtype=q.dtype, device=q.device)
        if self_penalty is not None:
            bias = bias.masked_fill(kpos == qp[..., None], self_penalty)
        if dedup and len(rounds) > 1:
            count = sum(other.member(idx).to(bias.dtype) for other in rounds)
            bias = bias - torch.log(count.clamp_min(1))
        parts.append(index_attention(q, k, v, idx, valid, scale, bias, return_lse=True))
    out, _ = merge_partials(parts)
    return out.to(q.dtype)


def _rank(label: Tensor, pos: Tensor) -> Tensor:
    """The slot of every token in the ``(label, position)`` order, by counting the tokens before it."""
    before = (label[..., None, :] < label[..., :, None]) | (
        (label[..., None, :] == label[..., :, None]) & (pos[..., None, :] < pos[..., :, None]))
    return before.sum(-1)


def selection_mask(
    hq: Tensor, hk: Tensor, n_labels: int, mask: Mask, *, chunk: int, window: int | None = None,
    same_label: bool = False,
) -> Tensor:
    """The selections of every round as a dense bool ``(R, B, H, Lq, Lk)`` (True = query ``i`` sees key
    ``j`` in round ``r``; padding and causality included), computed by counting: the sorted slot of a
    token is the number of tokens before it in ``(label, position)`` order, and in the causal window a key
    is among the last ``window`` of its label when fewer than ``window`` keys of that label lie strictly
    between it and the query. For references and tests (``O(R Lq Lk + R Lk^2)`` memory)."""
    window = 2 * chunk if window is None else window
    _check(hq, hk, mask, chunk, window)
    R, B, H, lq = hq.shape
    lk = hk.shape[-1]
    qp, kp, real = _positions(mask, B, H, hq.device)
    hk = torch.where(real, hk, torch.full_like(hk, n_labels))
    if mask.causal:
        same = hk[..., None, :] == hq[..., :, None]  # (R, B, H, Lq, Lk)
        past = kp[..., None, :] <= qp[..., :, None]
        seen = same & past & real[..., None, :]
        # between[i, j] = #{j': label hq_i, pos_j < pos_j' <= pos_i}: keys of the label up to i, minus those up to j
        upto_i = seen.sum(-1, keepdim=True)
        upto_j = ((hk[..., None, :] == hk[..., :, None]) & (kp[..., None, :] <= kp[..., :, None])
                  & real[..., None, :]).sum(-1)  # (R, B, H, Lk)
        return seen & (upto_i - upto_j[..., None, :] < window)
    kslot = _rank(hk, kp.expand_as(hk))
    if same_label:  # the keys of the query's label among the window of slots around its place in key order
        at = ((hk[..., None, :] < hq[..., :, None]) | ((hk[..., None, :] == hq[..., :, None])
                                                      & (kp[..., None, :] <= qp[..., :, None]))).sum(-1)
        lo = at - window // 2
        near = (kslot[..., None, :] >= lo[..., None]) & (kslot[..., None, :] < lo[..., None] + window)
        return near & (hk[..., None, :] == hq[..., :, None]) & real[..., None, :]
    u = torch.div(_rank(hq, qp.expand_as(hq)) * lk, lq, rounding_mode="floor") // chunk
    lo, hi = (u - 1) * chunk, (u + 1) * chunk
    return (kslot[..., None, :] >= lo[..., None]) & (kslot[..., None, :] < hi[..., None]) & real[..., None, :]


def bucketed_reference(
    q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, mask: Mask, scale: float, *,
    dedup: bool = True, self_penalty: float | None = None,
) -> Tensor:
    """The multi-round formula, dense: round ``r`` is softmax attention under its selection ``allowed[r]``
    (``(R, B, H, Lq, Lk)``, e.g. from :func:`selection_mask`) with scores ``s_ij = scale q_i.k_j`` (+
    ``self_penalty`` where ``pos_j = pos_i``, ``- log N_ij`` with ``dedup``, ``N_ij`` the number of rounds
    that select the pair), giving ``o_r`` and ``lse_r``; ``out = sum_r softmax_r(lse_r) o_r``."""
    B, H = q.shape[:2]
    qp, kp, _ = _positions(mask, B, H, q.device)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if self_penalty is not None:
        s = s + (kp[..., None, :] == qp[..., :, None]).to(s.dtype) * self_penalty
    count = allowed.to(s.dtype).sum(0)
    parts = []
    for sel in allowed:
        sr = s - torch.log(count.clamp_min(1)) if dedup else s
        parts.append(tile_partial(sr.masked_fill(~sel, NEG_INF), lambda e: torch.matmul(e, v.to(e.dtype))))
    out, _ = merge_partials(parts)  # sum_r exp(lse_r - logsumexp_r lse_r) o_r
    return out.to(q.dtype)
