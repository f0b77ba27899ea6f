"""Sequence parallelism on ``torch.distributed``: one sequence split across the ranks of a process group.

Every rank holds a shard of the sequence (``dim=2`` of ``(B, H, L, E)`` tensors) and gets the output of
its own queries, equal (values and gradients) to the single-process computation on the whole sequence.
Any process group works (gloo on CPU, NCCL on GPU; launched with ``torchrun``); only ``torch.distributed``
collectives and point-to-point operations are used.

Layouts (:func:`shard_sequence` / :func:`unshard_sequence`): ``"contiguous"`` -- rank ``r`` of ``W``
holds chunk ``r`` of ``W`` equal chunks; ``"zigzag"`` -- the sequence is cut into ``2W`` chunks and rank
``r`` holds chunks ``r`` and ``2W - 1 - r`` (one early, one late: equal causal work on every rank).

Strategies (:func:`sequence_parallel_attention`):

* ``"lasp2"`` (LASP-2, Sun et al., 2025, arXiv:2502.07563) for kernel mechanisms
  ``phi(Q) (phi(K)^T V)``: each rank forms the state of each chunk it holds (``sum_s w_s phi(k_s) v_s^T``
  with the decay weights, and the normaliser), one ``all_gather`` exchanges the states, and each chunk runs
  :func:`~fastattn.ops.linear.engine.linear_attention` once from the decayed sum of the earlier chunks'
  states (``prod`` of the gates composition; every other chunk when not causal). With ``overlap=True`` the
  ``all_gather`` is asynchronous and the intra-chunk attention (unnormalised) is computed while the states
  travel, the inter-chunk part added after (more activation memory: see ``sequence_parallel_attention``).
  Decays per head (``lightning``, ``transnormer``) and per token (gated ``rfa``: ``gate_logits`` from its
  layer, ``KernelMechanism.token_gates``) compose alike. Backward: the
  gradient of the gathered states is summed over the ranks (``all_reduce``), so the gradient of a chunk's
  initial state flows back to the earlier ranks' keys and values. Traffic per layer is one state per chunk,
  independent of the sequence length.
* ``"ring"`` (ring attention, Liu et al., 2023, arXiv:2310.01889) for exact softmax: K/V blocks travel
  around the ring with asynchronous ``batch_isend_irecv`` while the current block is computed
  (:func:`~fastattn.ops.softmax.flash.flash_block_forward` with the block's absolute positions in the
  :class:`~fastattn.core.masks.Mask`), the partials merged by log-sum-exp
  (:func:`~fastattn.ops.softmax.online.merge_partials`); causally future blocks are skipped. Backward runs
  :func:`~fastattn.ops.softmax.flash.flash_block_backward` per block, dK/dV travelling around the ring with
  their block back to its owner. Contiguous and zigzag layouts.
* ``"halo"`` for sliding-window patterns (``local``, ``diet``, ``handcrafted`` diagonal, ``longformer``
  without global tokens: mechanisms declaring ``windowed`` whose pattern's reach ``r`` depends on ``i - j``
  alone, :meth:`~fastattn.ops.sparse.patterns.Pattern.reach`): each chunk receives the last ``r`` keys and
  values of the chunk before it (and, not causal, the first ``r`` of the one after) point-to-point from
  their owners, and runs the mechanism on the extended stretch; backward sends the halos' gradients
  back. Traffic ``2 r`` tokens per chunk, independent of the sequence length; needs ``r <= `` one chunk.
* ``"ulysses"`` (DeepSpeed-Ulysses, Jacobs et al., 2023, arXiv:2309.14509) for any mechanism whose heads are
  independent and alike (``Mechanism.heads_independent``): ``all_to_all`` from sequence to head sharding,
  the mechanism's full-sequence computation on ``H / W`` heads, ``all_to_all`` back.
* ``"auto"``: ring for exact mechanisms, lasp2 for kernel mechanisms it can run, halo for windows that fit
  in a chunk, ulysses otherwise.

:class:`SequenceParallelAttention` is the standard layer around it
(``fastattn.MultiheadAttention(..., sequence_parallel_group=g)``). Every rank must make the same calls
(they are collectives, and every rank must run backward); a rank's bad input is a ``ValueError`` on every
rank, never a wait.

Not here (yet): ``attn_mask``, dropout, and overlap in LASP-2's backward (the ``all_reduce`` of the states'
gradients runs when autograd reaches it).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from fastattn.core.base import Mechanism
from fastattn.core.checks import check_inputs, repeat_kv
from fastattn.core.layer import ProjectedAttention
from fastattn.core.masks import Mask
from fastattn.ops.linear.engine import _safe_divide, linear_attention, linear_state, log_gates
from fastattn.ops.linear.state import LinearState
from fastattn.ops.linear.tiled import gate_dtype
from fastattn.ops.softmax.flash import flash_block_backward, flash_block_forward
from fastattn.ops.softmax.online import compute_dtype, merge_partials
from fastattn.registry import get_method

__all__ = ["LAYOUTS", "STRATEGIES", "LocalAttention", "SequenceParallelAttention", "choose_strategy", "sequence_parallel_attention",
           "sequence_parallel_layer", "shard_sequence", "unshard_sequence"]

LAYOUTS = ("contiguous", "zigzag")
STRATEGIES = ("auto", "lasp2", "ring", "halo", "ulysses")


# ----- groups and layouts ---------------------------------------------------------------------------
def _group(group: Any) -> tuple[int, int]:
    """``(rank, world)`` of this process in ``group`` (the default group when None)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("sequence parallelism needs torch.distributed initialised (dist.init_process_group)")
    return dist.get_rank(group), dist.get_world_size(group)


def _global(group: Any, rank: int) -> int:
    return rank if group is None or group is dist.group.WORLD else dist.get_global_rank(group, rank)


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


def _chunk_ids(layout: str, rank: int, world: int) -> list[int]:
    """The global chunk indices rank ``rank`` holds, in its local order."""
    return [rank] if layout == "contiguous" else [rank, 2 * world - 1 - rank]


def _num_chunks(layout: str, world: int) -> int:
    return world if layout == "contiguous" else 2 * world


def shard_sequence(
    tensors: Tensor | Sequence[Tensor | None], group: Any = None, layout: str = "contiguous", dim: int = 2,
) -> Tensor | tuple[Tensor | None, ...]:
    """This rank's shard of each full-sequence tensor (the same full tensors on every rank) along ``dim``
    (2 for ``(B, H, L, E)``; 1 for a ``(B, L)`` key padding mask). Differentiable (a slice); ``None``
    entries pass through. A length not divisible by the number of chunks is a ``ValueError``."""
    _check_layout(layout)
    rank, world = _group(group)
    single = isinstance(tensors, Tensor)
    items = (tensors,) if single else tuple(tensors)
    chunks, ids = _num_chunks(layout, world), _chunk_ids(layout, rank, world)
    out: list[Tensor | None] = []
    for t in items:
        if t is None:
            out.append(None)
            continue
        n = t.shape[dim]
        if n % chunks:
            raise ValueError(
                f"sequence length {n} (dim {dim}) is not divisible into {chunks} chunks "
                f"({layout} layout over {world} ranks)"
            )
        parts = t.split(n // chunks, dim=dim)
        out.append(torch.cat([parts[i] for i in ids], dim=dim))
    return out[0] if single else tuple(out)


def _start_gather(x: Tensor, group: Any) -> tuple[list[Tensor], Any]:
    """Start an asynchronous ``all_gather`` of ``x`` (no autograd): the receive buffers and the work."""
    _, world = _group(group)
    x = x.detach().contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    return parts, dist.all_gather(parts, x, group=group, async_op=True)


class _Gathered(torch.autograd.Function):
    """``(W, *x.shape)``: every rank's ``x``, from the buffers of a finished :func:`_start_gather` of ``x``
    (so that computation can overlap the exchange). Backward: the gradients of all ranks summed
    (``all_reduce``), this rank's slice."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, parts: list[Tensor], group: Any) -> Tensor:
        ctx.group, ctx.rank = group, _group(group)[0]
        return torch.stack(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank], None, None


def _all_gather(x: Tensor, group: Any) -> Tensor:
    """``(W, *x.shape)``: every rank's ``x``, differentiable (see :class:`_Gathered`)."""
    parts, work = _start_gather(x, group)
    work.wait()
    return _Gathered.apply(x, parts, group)


def _natural_order(x: Tensor, layout: str, world: int, dim: int) -> Tensor:
    """``x`` holding every rank's shard in rank order along ``dim``, re-ordered to sequence order."""
    if layout == "contiguous":
        return x
    chunks = x.chunk(2 * world, dim=dim)
    held = [c for r in range(world) for c in _chunk_ids(layout, r, world)]  # global id of each piece
    where = {g: i for i, g in enumerate(held)}
    return torch.cat([chunks[where[g]] for g in range(2 * world)], dim=dim)


def _rank_order(x: Tensor, layout: str, world: int, dim: int) -> Tensor:
    """Inverse of :func:`_natural_order`."""
    if layout == "contiguous":
        return x
    chunks = x.chunk(2 * world, dim=dim)
    return torch.cat([chunks[g] for r in range(world) for g in _chunk_ids(layout, r, world)], dim=dim)


def unshard_sequence(t: Tensor, group: Any = None, layout: str = "contiguous", dim: int = 2) -> Tensor:
    """The full sequence from every rank's shard ``t`` (the inverse of :func:`shard_sequence`), on every
    rank. Differentiable: the gradient of a shard is the sum over ranks of the gradients of the full
    tensor (as ``torch.distributed.nn.all_gather``)."""
    _check_layout(layout)
    _, world = _group(group)
    _agree(group, "unshard_sequence", [*t.shape, dim])
    gathered = _all_gather(t, group)
    return _natural_order(torch.cat(gathered.unbind(0), dim=dim), layout, world, dim)


def _agree(group: Any, what: str, values: Sequence[Any], error: str | None = None) -> None:
    """Raise the same ``ValueError`` on every rank when any rank found its input bad (``error``) or the ranks
    passed different ``values`` (shapes, flags): one rank's bad input must not leave the others waiting in a
    collective."""
    _, world = _group(group)
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, (error, list(values)), group=group)
    errors = [f"rank {r}: {e}" for r, (e, _) in enumerate(everyone) if e]
    if errors:
        raise ValueError(f"{what}: " + "; ".join(errors))
    if any(v != everyone[0][1] for _, v in everyone):
        raise ValueError(f"{what}: the ranks disagree on the shard shapes or arguments: {[v for _, v in everyone]}")


# ----- LASP-2 -----------------------------------------------------------------------------------------
def _lasp2_capable(cls: type) -> str | None:
    """Why mechanisms of class ``cls`` cannot run under LASP-2 (None when they can)."""
    from fastattn.mechanisms.kernel.base import KernelMechanism
    from fastattn.mechanisms.kernel.decayed import DecayedLinear

    if not issubclass(cls, KernelMechanism):
        return "it is not a kernel mechanism phi(Q) (phi(K)^T V)"
    decayed = issubclass(cls, DecayedLinear) and cls.forward is DecayedLinear.forward
    if not (decayed or cls.kernel_form) and cls.forward is not KernelMechanism.forward:
        return "its forward is more than its feature map and the linear-attention op"
    if not (cls.tokenwise or decayed):
        return "its feature map is not token-wise (it looks across positions)"
    return None


def _shift_base(cs: list[Tensor], kps: list[Tensor | None], group: Any) -> Tensor:
    """``M`` ``(B, H)``: the group's maximum, over real keys, of the key log-scales ``c`` of every chunk.

    Key features returned shifted by their log-scales (``phi(k) exp(-c)``, see
    ``KernelMechanism.key_log_scale``) are used as ``phi(k) exp(c - M)``: one shift per (batch, head) over
    the whole sequence, a constant that cancels in the normalised output (values and gradients exact).
    Unlike the op's running maximum, a key whose log-scale lies ~700 (float64; ~87 in float32) below ``M``
    underflows to 0."""
    tops = []
    for c, kp in zip(cs, kps):
        real = c.detach() if kp is None else c.detach().masked_fill(kp[:, None, :], float("-inf"))
        tops.append(real.amax(dim=-1))
    m = torch.stack(tops).amax(0).contiguous()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def _lasp2(mech: Mechanism, q: Tensor, k: Tensor, v: Tensor, kp: Tensor | None, causal: bool, scale: float,
           group: Any, layout: str, gate_logits: Tensor | None = None, overlap: bool = False) -> Tensor:
    """LASP-2 (see the module docstring). Each chunk's state is formed first (checkpointed: its features
    are recomputed in backward) and exchanged. Without ``overlap``, each chunk then runs the op once from
    the decayed sum of the earlier chunks' states. With ``overlap``, the ``all_gather`` is asynchronous
    and the intra-chunk attention (the chunk's own keys, no initial state, unnormalised) is computed while
    the states travel; the inter-chunk part ``exp(A_t) phi(q_t) S_0`` (``A_t`` the chunk's log-gates up to
    ``t``) is added to numerator and denominator afterwards (checkpointed). Token-wise feature maps run
    inside the op's tiles, so no feature tensor is kept."""
    from fastattn.mechanisms.kernel.decayed import DecayedLinear

    rank, world = _group(group)
    ids = _chunk_ids(layout, rank, world)
    total = _num_chunks(layout, world)
    if not mech.native_gqa:
        groups = q.shape[1] // k.shape[1]
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    kw = mech._decay(mech.decay() if causal else None)  # type: ignore[attr-defined]
    norm = mech.normalize  # type: ignore[attr-defined]
    dt = compute_dtype(v.dtype)
    n = q.shape[2] // len(ids)
    log_scale = getattr(mech, "key_log_scale", None)
    chunks = []
    for c in range(len(ids)):
        sl = slice(c * n, (c + 1) * n)
        kp_c = None if kp is None else kp[:, sl]
        at = Mask(n, n, key_padding=kp_c, causal=causal, k_start=ids[c] * n)  # features see global positions
        logits = None if gate_logits is None else gate_logits[:, :, sl]
        chunks.append((q[:, :, sl], k[:, :, sl], v[:, :, sl], logits, kp_c, at, Mask(n, n, key_padding=kp_c, causal=causal)))
    base = None
    with torch.no_grad():
        c_logs = [None if log_scale is None else log_scale(k_c, scale=scale, mask=at)
                  for _, k_c, _, _, _, at, _ in chunks]
    if c_logs[0] is not None:
        if not norm:
            raise ValueError("strategy 'lasp2': key log-scales need the normalised form")
        base = _shift_base(c_logs, [ch[4] for ch in chunks], group)  # type: ignore[arg-type]

    def key_features(k_c: Tensor, logits: Tensor | None, at: Mask) -> tuple[Tensor, dict]:
        fk = mech.features(k_c, is_query=False, scale=scale, mask=at)  # type: ignore[attr-defined]
        kw_c = kw
        if logits is not None:  # per-token gates: gated key features and their log-gates
            fk, log_decay = mech.token_gates(fk, logits)  # type: ignore[attr-defined]
            kw_c = {"log_decay": log_decay}
        if base is not None:
            c_log = log_scale(k_c, scale=scale, mask=at)  # type: ignore[misc]
            fk = fk * torch.exp((c_log - base[..., None]).clamp_max(0.0)).to(fk.dtype).unsqueeze(-1)
        return fk, kw_c

    def tile_state(k_t: Tensor, v_t: Tensor, logits: Tensor | None, at: Mask, s0: Tensor | None,
                   z0: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """The state after a stretch of keys continuing ``(s0, z0)``, and the stretch's log-gates."""
        fk, kw_c = key_features(k_t, logits, at)
        keep = Mask(at.lq, at.lk, key_padding=at.key_padding).key_keep(dt)
        fk_s, v_s = fk.to(dt), v_t.to(dt)
        log_g, _ = log_gates(kw_c.get("decay"), kw_c.get("log_decay"), fk_s, keep)
        if keep is not None:
            fk_s, v_s = fk_s * keep, v_s * keep
        kv, z = linear_state(fk_s, v_s, log_g=log_g, s0=s0, z0=z0, normalize=norm)
        return kv, z, log_g

    def state(c: int) -> tuple[Tensor, Tensor]:
        """Chunk ``c``'s packed state ``(B, H, F)`` and ``A_t`` ``(B, H, n)``, stretch by stretch (each
        checkpointed: its features are recomputed in backward, one stretch at a time). Feature maps that
        look across positions, or whose keys are shifted by log-scales, take the chunk as one stretch."""
        _, k_c, v_c, logits, kp_c, _, _ = chunks[c]
        step = -(-n // 8) if mech.tokenwise and base is None else n  # type: ignore[attr-defined]
        kv = z = None
        gates = []
        for t0 in range(0, n, step):
            ts = slice(t0, min(t0 + step, n))
            at = Mask(ts.stop - t0, ts.stop - t0, key_padding=None if kp_c is None else kp_c[:, ts], causal=causal,
                      k_start=ids[c] * n + t0)
            kv, z, log_g = checkpoint(tile_state, k_c[:, :, ts], v_c[:, :, ts],
                                      None if logits is None else logits[..., ts], at, kv, z, use_reentrant=False)
            gates.append(log_g)
        assert kv is not None
        b, h = kv.shape[:2]
        # A_t: the log-product of the chunk's gates up to each token (0 without decay)
        if gates[0] is None:
            cum_t = kv.new_zeros(b, h, n, dtype=gate_dtype(kv.device))
        else:
            cum_t = torch.cat([g.to(gate_dtype(kv.device)).expand(b, h, -1 if g.shape[-1] > 1 else ts_len)
                               for g, ts_len in zip(gates, _lengths(n, step))], dim=-1).cumsum(-1)
        return torch.cat([kv.flatten(2)] + ([z] if norm else []) + [cum_t[..., -1:].to(dt)], dim=-1), cum_t  # type: ignore

    def attend(q_c: Tensor, k_c: Tensor, v_c: Tensor, logits: Tensor | None, at: Mask, mask: Mask,
               start: LinearState | None = None) -> Any:
        """The op on the chunk: from the state ``start``, or (None) its intra-chunk part unnormalised."""
        opts = {"normalize": norm, "chunk": mech.chunk, "partial": start is None, "state": start}  # type: ignore
        if mech.tokenwise and base is None and logits is None:  # type: ignore[attr-defined]
            def phi(x: Tensor, is_query: bool) -> Tensor:  # applied tile by tile inside the op
                return mech.features(x, is_query=is_query, scale=scale, mask=at)  # type: ignore[attr-defined]

            return linear_attention(q_c, k_c, v_c, mask, phi=phi, **opts, **kw)
        fk, kw_c = key_features(k_c, logits, at)
        fq = mech.features(q_c, is_query=True, scale=scale, mask=at)  # type: ignore[attr-defined]
        return linear_attention(fq, fk, v_c, mask, **opts, **kw_c)

    def inter(q_c: Tensor, num: Tensor, den: Tensor | None, s0: Tensor, z0: Tensor | None, cum_t: Tensor,
              at: Mask) -> Tensor:
        fq = mech.features(q_c, is_query=True, scale=scale, mask=at).to(dt)  # type: ignore[attr-defined]
        groups = fq.shape[1] // s0.shape[1]
        if causal and (kw.get("decay") is not None or kw.get("log_decay") is not None or gate_logits is not None):
            fq = fq * cum_t.exp().to(dt).repeat_interleave(groups, dim=1).unsqueeze(-1)  # exp(A_t) phi(q_t)
        num = torch.matmul(fq, repeat_kv(s0, groups)).add_(num)
        if z0 is None or den is None:
            return num
        den = torch.matmul(fq, repeat_kv(z0[..., None], groups)).squeeze(-1).add_(den)
        del fq
        return _safe_divide(num, den.unsqueeze(-1))

    packs, cums = [], []
    for _ in chunks:
        pack, cum_t = state(len(packs))
        packs.append(pack)
        cums.append(cum_t)
    if overlap:
        parts, work = _start_gather(torch.stack(packs), group)  # (chunks per rank, B, H, F) from every rank
        partial = [attend(q_c, k_c, v_c, logits, at, mask)  # while the states travel
                   for q_c, k_c, v_c, logits, _, at, mask in chunks]
        work.wait()
        flat = _Gathered.apply(torch.stack(packs), parts, group).flatten(0, 1)
    else:
        flat = _all_gather(torch.stack(packs), group).flatten(0, 1)
    where = {g: i for i, g in enumerate(g for r in range(world) for g in _chunk_ids(layout, r, world))}
    states = flat[torch.tensor([where[g] for g in range(total)], device=flat.device)]  # sequence order
    d, e = _state_dims(states.shape[-1], v.shape[-1], norm)
    s_all = states[..., : d * e].unflatten(-1, (d, e))
    z_all = states[..., d * e: d * e + d] if norm else None
    cum = states[..., -1].cumsum(0)  # A_j = sum_{m <= j} a_m over the chunks in sequence order
    outs = []
    idx = torch.arange(total, device=flat.device)
    for c, ((q_c, k_c, v_c, logits, _, at, mask), cum_t, g) in enumerate(zip(chunks, cums, ids)):
        if causal:  # chunk i < g weighs exp(A_{g-1} - A_i): the gates of the chunks between i and g
            before = (idx < g).view(-1, 1, 1)
            diff = cum[g - 1] - cum if g > 0 else torch.zeros_like(cum)
            w = torch.exp(torch.where(before, diff, torch.zeros_like(diff))) * before
        else:  # every other chunk, undecayed
            w = (idx != g).view(-1, 1, 1).to(s_all.dtype).expand_as(cum)
        s0 = (w[..., None, None] * s_all).sum(0)
        z0 = (w[..., None] * z_all).sum(0) if z_all is not None else None
        if overlap:
            num, den = partial[c]
            outs.append(checkpoint(inter, q_c, num, den, s0, z0, cum_t, at, use_reentrant=False).to(v.dtype))
        else:
            outs.append(attend(q_c, k_c, v_c, logits, at, mask, LinearState(s0, z0, g * n)).to(v.dtype))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    if isinstance(mech, DecayedLinear):
        out = mech._norm(out)  # per token (over heads): local
    return out


def _lengths(n: int, step: int) -> list[int]:
    """The lengths of the stretches of ``step`` tokens covering ``n``."""
    return [min(step, n - t0) for t0 in range(0, n, step)]


def _state_dims(width: int, e: int, normalize: bool) -> tuple[int, int]:
    """``(D, E)`` of a packed state of ``width = D E (+ D) + 1`` entries with values of width ``E``."""
    d = (width - 1) // (e + (1 if normalize else 0))
    return d, e


# ----- ring attention ---------------------------------------------------------------------------------
def _exchange(send: Tensor, group: Any, rank: int, world: int, tag: int) -> tuple[Tensor, list]:
    """Start sending ``send`` to the next rank and receiving the previous rank's into a new tensor."""
    recv = torch.empty_like(send)
    ops = [dist.P2POp(dist.isend, send, _global(group, (rank + 1) % world), group, tag),
           dist.P2POp(dist.irecv, recv, _global(group, (rank - 1) % world), group, tag)]
    return recv, dist.batch_isend_irecv(ops)


def _wait(works: list) -> None:
    for w in works:
        w.wait()


def _ring_steps(k: Tensor, v: Tensor, kp: Tensor | None, info: dict) -> Iterator[list]:
    """The steps of the ring: at each, the tiles ``(i, j, keys, values, mask)`` (local query chunk ``i``,
    chunk ``j`` of the block now held, its :class:`Mask` at the global positions; causally future pairs
    left out), yielded while the block travels on to the next rank and the previous rank's arrives."""
    group, layout, causal = info["group"], info["layout"], info["causal"]
    rank, world = _group(group)
    ids = _chunk_ids(layout, rank, world)
    n, e = k.shape[2] // len(ids), k.shape[-1]
    block = torch.cat([k, v] + ([] if kp is None else [_pad_channel(kp, k)]), dim=-1).contiguous()
    for step in range(world):
        src = (rank - step) % world
        if step < world - 1:
            nxt, works = _exchange(block, group, rank, world, tag=2 * step)
        tiles = []
        for i, gi in enumerate(ids):
            for j, gj in enumerate(_chunk_ids(layout, src, world)):
                if causal and gj > gi:
                    continue  # entirely in the future
                kb, vb, kpb = _unpack(block, j, n, e, kp is not None)
                mask = Mask(n, n, key_padding=kpb, causal=causal, q_start=gi * n, k_start=gj * n)
                tiles.append((slice(i * n, (i + 1) * n), slice(j * n, (j + 1) * n), kb, vb, mask))
        yield tiles
        if step < world - 1:
            _wait(works)
            block = nxt


class _Ring(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, kp: Tensor | None, info: dict) -> Tensor:
        scale, bq, bk = info["scale"], info["block_q"], info["block_k"]
        partials: dict[int, tuple[Tensor, Tensor]] = {}
        for tiles in _ring_steps(k, v, kp, info):
            for qs, _, kb, vb, mask in tiles:
                part = flash_block_forward(q[:, :, qs], kb, vb, mask, scale, block_q=bq, block_k=bk)
                i = qs.start
                partials[i] = part if i not in partials else merge_partials([partials[i], part])
        out = torch.cat([partials[i][0] for i in sorted(partials)], dim=2)
        lse = torch.cat([partials[i][1] for i in sorted(partials)], dim=2)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.kp, ctx.info = kp, info
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx: Any, d_out: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        info = ctx.info
        scale, bq, bk = info["scale"], info["block_q"], info["block_k"]
        rank, world = _group(info["group"])
        dt = compute_dtype(q.dtype)
        d_out = d_out.to(dt)
        delta = (d_out * out.to(dt)).sum(dim=-1, keepdim=True)
        dq = torch.zeros(q.shape, dtype=dt, device=q.device)
        d_block = torch.zeros(*k.shape[:3], k.shape[-1] + v.shape[-1], dtype=dt, device=k.device)
        for step, tiles in enumerate(_ring_steps(k, v, ctx.kp, info)):
            for qs, ks, kb, vb, mask in tiles:
                dqi, dk, dv = flash_block_backward(
                    q[:, :, qs], kb, vb, out[:, :, qs], lse[:, :, qs], d_out[:, :, qs], mask, scale,
                    block_q=bq, block_k=bk, delta=delta[:, :, qs],
                )
                dq[:, :, qs] += dqi
                d_block[:, :, ks] += torch.cat([dk, dv], dim=-1)
            # the block's gradient travels on with it; after W hops it is back with its owner
            d_block, works = _exchange(d_block.contiguous(), info["group"], rank, world, tag=2 * step + 1)
            _wait(works)
        e = k.shape[-1]
        return dq.to(q.dtype), d_block[..., :e].to(k.dtype), d_block[..., e:].to(v.dtype), None, None


def _pad_channel(kp: Tensor, k: Tensor) -> Tensor:
    """The key padding ``(B, L)`` as one more channel ``(B, H, L, 1)`` of the travelling block."""
    return kp.to(k.dtype)[:, None, :, None].expand(k.shape[0], k.shape[1], k.shape[2], 1)


def _unpack(block: Tensor, j: int, n: int, e: int, padded: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """Keys, values and key padding of chunk ``j`` of a travelling block."""
    b = block[:, :, j * n:(j + 1) * n]
    if not padded:
        return b[..., :e], b[..., e:], None
    return b[..., :e], b[..., e:-1], b[:, 0, :, -1] > 0.5


def _ring(mech: Mechanism, q: Tensor, k: Tensor, v: Tensor, kp: Tensor | None, causal: bool, scale: float,
          group: Any, layout: str) -> Tensor:
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    o = mech.options
    info = {"group": group, "layout": layout, "causal": causal, "scale": scale,
            "block_q": int(getattr(o, "block_q", getattr(o, "query_chunk", 1024))),
            "block_k": int(getattr(o, "block_k", getattr(o, "key_chunk", 1024)))}
    return _Ring.apply(q, k, v, kp, info)


# ----- halo exchange ------------------------------------------------------------------------------------
def _owner(layout: str, chunk: int, world: int) -> int:
    """The rank holding global chunk ``chunk``."""
    return chunk if layout == "contiguous" or chunk < world else 2 * world - 1 - chunk


def _p2p(sends: list[tuple[Tensor, int, int]], recvs: list[tuple[tuple[int, ...], int, int]], group: Any,
         rank: int, like: Tensor) -> list[Tensor]:
    """Point-to-point: each ``(tensor, dst, tag)`` of ``sends`` goes to rank ``dst``; each
    ``(shape, src, tag)`` of ``recvs`` is received from rank ``src`` (returned in order). A transfer to
    oneself is a copy."""
    mine = {tag: t for t, dst, tag in sends if dst == rank}
    out: list[Tensor | None] = []
    ops = []
    for shape, src, tag in recvs:
        if src == rank:
            out.append(mine[tag].clone())
            continue
        buf = like.new_empty(shape)
        out.append(buf)
        ops.append(dist.P2POp(dist.irecv, buf, _global(group, src), group, tag))
    ops += [dist.P2POp(dist.isend, t.contiguous(), _global(group, dst), group, tag)
            for t, dst, tag in sends if dst != rank]
    if ops:
        _wait(dist.batch_isend_irecv(ops))
    return out  # type: ignore[return-value]


class _Halo(torch.autograd.Function):
    """Each of this rank's chunks (``n`` rows of ``block`` ``(B, H, L, F)``, global id ``g``) extended by
    its halos: ``(C, B, H, r + n [+ r], F)``, the last ``r`` rows of chunk ``g - 1`` before it and, when
    ``both``, the first ``r`` rows of chunk ``g + 1`` after it (zeros where the sequence ends), received
    point-to-point from the neighbours' owners. Backward: the halos' gradients travel back to their
    owners and add to those rows. (One output holding the chunks too, so every rank's backward runs and
    meets its peers' sends, even where a rank uses no halo.)"""

    @staticmethod
    def forward(ctx: Any, block: Tensor, r: int, both: bool, group: Any, layout: str) -> Tensor:
        rank, world = _group(group)
        ids, total = _chunk_ids(layout, rank, world), _num_chunks(layout, world)
        n = block.shape[2] // len(ids)
        ctx.meta = (r, both, group, layout, n, block.shape)
        sends, recvs, slots = _halo_routes(ids, total, world, layout, n, r, both, block.shape)
        got = _p2p([(block[:, :, rows], dst, tag) for rows, dst, tag in sends], recvs, group, rank, block)
        ext = block.new_zeros(len(ids), *block.shape[:2], r + n + (r if both else 0), block.shape[3])
        for c in range(len(ids)):
            ext[c, :, :, r:r + n] = block[:, :, c * n:(c + 1) * n]
        for (side, c), t in zip(slots, got):
            if side == 0:
                ext[c, :, :, :r] = t
            else:
                ext[c, :, :, r + n:] = t
        return ext

    @staticmethod
    def backward(ctx: Any, d_ext: Tensor) -> tuple[Tensor | None, ...]:
        r, both, group, layout, n, shape = ctx.meta
        rank, world = _group(group)
        ids, total = _chunk_ids(layout, rank, world), _num_chunks(layout, world)
        sends, recvs, slots = _halo_routes(ids, total, world, layout, n, r, both, shape)
        halo = [(d_ext[c, :, :, :r] if side == 0 else d_ext[c, :, :, r + n:]) for side, c in slots]
        # reversed roles: each received halo's gradient goes back to its sender, on the sender's tag
        back = _p2p([(t, src, tag) for t, (_, src, tag) in zip(halo, recvs)],
                    [(tuple(shape[:2]) + (r, shape[3]), dst, tag) for _, dst, tag in sends], group, rank, d_ext)
        grad = torch.cat([d_ext[c, :, :, r:r + n] for c in range(len(ids))], dim=2)
        for (rows, _, _), t in zip(sends, back):
            grad[:, :, rows] += t
        return grad, None, None, None, None


def _halo_routes(ids: list[int], total: int, world: int, layout: str, n: int, r: int, both: bool,
                 shape: Any) -> tuple[list, list, list]:
    """What this rank sends (``(rows, dst, tag)``) and receives (``(shape, src, tag)``, with the
    ``(side, local chunk)`` each received halo fills) in a halo exchange. Tags name the halo: ``2 g`` the
    previous-side halo of chunk ``g``, ``2 g + 1`` its next-side halo."""
    sends, recvs, slots = [], [], []
    for c, g in enumerate(ids):
        if g + 1 < total:  # my last r rows are chunk g + 1's previous-side halo
            sends.append((slice((c + 1) * n - r, (c + 1) * n), _owner(layout, g + 1, world), 2 * (g + 1)))
        if both and g > 0:  # my first r rows are chunk g - 1's next-side halo
            sends.append((slice(c * n, c * n + r), _owner(layout, g - 1, world), 2 * (g - 1) + 1))
        if g > 0:
            recvs.append(((*shape[:2], r, shape[3]), _owner(layout, g - 1, world), 2 * g))
            slots.append((0, c))
        if both and g + 1 < total:
            recvs.append(((*shape[:2], r, shape[3]), _owner(layout, g + 1, world), 2 * g + 1))
            slots.append((1, c))
    return sends, recvs, slots


def _halo(mech: Mechanism, q: Tensor, k: Tensor, v: Tensor, kp: Tensor | None, causal: bool, scale: float,
          group: Any, layout: str, reach: int) -> Tensor:
    """A sliding-window pattern of reach ``r``: each chunk's keys and values are extended by the last
    ``r`` tokens of the previous chunk (and, not causal, the first ``r`` of the next), received from
    their owners, and the mechanism runs on the extended stretch. Its pattern depends on ``i - j``
    alone, so the stretch's own positions give the global result; not causal, ``r`` placeholder queries
    after the chunk's own align the queries with the keys (their outputs are dropped)."""
    rank, world = _group(group)
    ids, total = _chunk_ids(layout, rank, world), _num_chunks(layout, world)
    n, e = q.shape[2] // len(ids), k.shape[-1]
    block = torch.cat([k, v] + ([] if kp is None else [_pad_channel(kp, k)]), dim=-1)
    ext = _Halo.apply(block, reach, not causal, group, layout)
    outs = []
    for c, g in enumerate(ids):
        lo = 0 if g > 0 else reach  # the previous chunk's last r tokens, where there is one
        hi = reach + n + (reach if not causal and g + 1 < total else 0)
        ext_c = ext[c, :, :, lo:hi]
        after = hi - reach - n  # keys after the chunk: as many placeholder queries
        qc = q[:, :, c * n:(c + 1) * n]
        if after:
            qc = torch.cat([qc, qc.new_zeros(*qc.shape[:2], after, qc.shape[3])], dim=2)
        kc, vc, kpc = _unpack(ext_c, 0, hi - lo, e, kp is not None)
        out = mech.run_checked(qc, kc, vc, key_padding_mask=kpc, is_causal=causal, scale=scale, attn_mask=None,
                               dropout_p=0.0, backend="auto")
        outs.append(out[:, :, :n])
    return torch.cat(outs, dim=2)


# ----- Ulysses ----------------------------------------------------------------------------------------
class _AllToAll(torch.autograd.Function):
    """Split ``x`` into ``W`` parts along ``scatter``, send part ``j`` to rank ``j``, concatenate what
    arrives along ``gather`` (in rank order). Backward: the same with the two dims swapped."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any, scatter: int, gather: int) -> Tensor:
        ctx.group, ctx.scatter, ctx.gather = group, scatter, gather
        return _all_to_all(x, group, scatter, gather)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        return _all_to_all(grad, ctx.group, ctx.gather, ctx.scatter), None, None, None


def _all_to_all(x: Tensor, group: Any, scatter: int, gather: int) -> Tensor:
    _, world = _group(group)
    send = torch.stack(x.chunk(world, dim=scatter)).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather)


def _ulysses_capable(mech: Mechanism) -> str | None:
    """Why ``mech`` cannot run under Ulysses (None when it can): its heads must be independent and alike
    (``Mechanism.heads_independent``), since each rank runs a module of ``H / W`` heads."""
    if not mech.heads_independent:
        return (f"its heads are not independent and alike ({type(mech).__name__}.heads_independent is False: "
                f"per-head parameters, buffers, patterns or decays, or a norm across heads)")
    if any(True for _ in mech.parameters()):
        return "the module has learned parameters"
    return None


def _ulysses(full: Mechanism, q: Tensor, k: Tensor, v: Tensor, kp: Tensor | None, causal: bool,
             scale: float, group: Any, layout: str) -> Tensor:
    _, world = _group(group)
    h, hkv = q.shape[1], k.shape[1]
    if h % world or hkv % world:
        raise ValueError(f"ulysses shards heads: query heads ({h}) and key/value heads ({hkv}) must be "
                         f"divisible by the group size ({world})")
    why = _ulysses_capable(full)
    if why:
        raise ValueError(f"strategy 'ulysses' cannot run method {full.spec.name!r}: {why}")
    # the same mechanism on H / W heads, with the full module's buffers (none of them per head)
    mech = type(full)(full.options, head_dim=full.head_dim, num_heads=h // world,
                      num_kv_heads=hkv // world).to(q.device)
    mine = dict(full.named_buffers())
    with torch.no_grad():
        for name, b in mech.named_buffers():
            b.copy_(mine[name])

    def to_heads(x: Tensor) -> Tensor:
        return _natural_order(_AllToAll.apply(x, group, 1, 2), layout, world, dim=2)

    qh, kh, vh = to_heads(q), to_heads(k), to_heads(v)
    full_kp = None
    if kp is not None:
        full_kp = _natural_order(torch.cat(_all_gather(kp.to(torch.uint8), group).unbind(0), dim=1),
                                 layout, world, dim=1).bool()
    out = mech.run_checked(qh, kh, vh, key_padding_mask=full_kp, is_causal=causal, scale=scale, attn_mask=None,
                           dropout_p=0.0, backend="auto")
    return _AllToAll.apply(_rank_order(out, layout, world, dim=2).contiguous(), group, 2, 1)


# ----- the entry point --------------------------------------------------------------------------------
def _build(spec: Any, opts: Any, q: Tensor, k: Tensor, group: Any) -> Mechanism:
    """The mechanism module for this call; its random parts (buffers) broadcast from the group's first
    rank, so that every rank computes with the same features."""
    mech = spec.cls(opts, head_dim=q.shape[-1], num_heads=q.shape[1], num_kv_heads=k.shape[1]).to(q.device)
    if any(True for _ in mech.parameters()):
        raise ValueError(f"method {spec.name!r} with options {opts} has learned parameters; pass the module")
    if spec.randomized:
        for b in mech.buffers():
            dist.broadcast(b, _global(group, 0), group=group)
    return mech


def _window(mech: Mechanism, length: int) -> int | None:
    reach = getattr(mech, "window_reach", None)
    return None if reach is None else reach(length)


def _resolve(mech: Mechanism, strategy: str, length: int | None, chunk: int | None) -> str:
    """``strategy`` with ``"auto"`` resolved for the built module ``mech`` on a sequence of ``length``
    tokens cut into chunks of ``chunk`` (None: not known yet)."""
    if strategy != "auto":
        return strategy
    spec = mech.spec
    if spec.exact:
        return "ring"
    if _lasp2_capable(type(mech)) is None:
        return "lasp2"
    reach = _window(mech, length or 1)
    if reach is not None and (chunk is None or reach <= chunk):
        return "halo"
    return "ulysses"


def choose_strategy(method: str | Mechanism, strategy: str = "auto", *, length: int | None = None,
                    chunk: int | None = None, **options: Any) -> str:
    """The strategy ``sequence_parallel_attention`` runs ``method`` with (``"auto"`` resolved): ring for
    exact mechanisms, lasp2 for kernel mechanisms it can run, halo for sliding-window patterns whose reach
    fits in one chunk (``chunk`` tokens; ``length`` the whole sequence's), ulysses otherwise. ``method``: a
    registry id (with its ``options``; a small probe module is built) or a built module."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    if isinstance(method, Mechanism):
        mech = method
    else:
        spec = get_method(method)
        mech = spec.cls(spec.make_options(**options), head_dim=8, num_heads=8)
    return _resolve(mech, strategy, length, chunk)


def _check_shard(spec: Any, q: Tensor, k: Tensor, v: Tensor, kp: Tensor | None, causal: bool, per_rank: int,
                 layout: str) -> None:
    if not all(isinstance(t, Tensor) and t.dim() == 4 for t in (q, k, v)):
        raise ValueError("q, k, v must be (B, H, n, E) shards")
    check_inputs(spec, q, k, v, key_padding_mask=kp, attn_mask=None, is_causal=causal, dropout_p=0.0)
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"sequence parallelism shards self-attention: q and k must have the same local "
                         f"length, got {q.shape[2]} and {k.shape[2]}")
    if q.shape[2] % per_rank:
        raise ValueError(f"the {layout} layout holds {per_rank} chunks per rank: the local length {q.shape[2]} "
                         f"is not divisible by {per_rank}")


def sequence_parallel_attention(
    q: Tensor, k: Tensor, v: Tensor, method: str | Mechanism = "softmax", *, group: Any = None,
    is_causal: bool = False, strategy: str = "auto", layout: str = "contiguous",
    key_padding_mask: Tensor | None = None, scale: float | None = None, gate_logits: Tensor | None = None,
    overlap: bool = False, **options: Any,
) -> Tensor:
    """Attention of this rank's queries over the whole sequence, each rank holding a shard.

    Args:
        q, k, v: this rank's shards ``(B, H, n, E)``, ``(B, Hkv, n, E)``, ``(B, Hkv, n, Ev)`` (as given by
            :func:`shard_sequence` with the same ``layout``); self-attention, so ``q`` and ``k`` have the
            same length; every rank the same shapes.
        method: a registry id of a functional sequence mechanism, or a built mechanism module (e.g. a
            layer's core, with its learned parameters: their gradients are this rank's share, to be
            summed over the group as data-parallel gradients are; its random buffers must agree across
            ranks, which ``MultiheadAttention(..., sequence_parallel_group=g)`` ensures).
        group: the process group (default: the world).
        is_causal: causal masking over the global positions.
        strategy: ``"auto"``, ``"lasp2"``, ``"ring"``, ``"halo"`` or ``"ulysses"`` (see the module docstring).
        layout: how the sequence was sharded, ``"contiguous"`` or ``"zigzag"``.
        key_padding_mask: this rank's shard ``(B, n)`` of the padding mask (True = padding), sharded like
            the keys.
        scale: score scale (default ``E ** -0.5``).
        gate_logits: this rank's shard ``(B, H, n)`` of the per-token gate logits of a gated kernel form
            (``rfa`` with ``gate=True``; its layer computes them from the layer input); causal, lasp2.
        overlap: lasp2 computes each chunk's intra-chunk attention while the states travel (asynchronous
            ``all_gather``), adding the inter-chunk part after; this keeps about 1.8x the activation memory
            of the default single pass from the gathered states (measured: benchmarks/sequence_parallel.py),
            so it pays where the exchange is slow beside the chunk's computation.
        **options: the mechanism's options (with a method id only).

    Returns:
        this rank's output shard ``(B, H, n, Ev)``, equal to the single-process result's (values and
        gradients). Every rank must call it (collectives); bad input is a ``ValueError`` on every rank.
    """
    rank, world = _group(group)
    if world < 2:
        raise ValueError("sequence parallelism needs a group of at least 2 ranks; call fastattn.attention instead")
    given = method if isinstance(method, Mechanism) else None
    spec = opts = error = None
    try:  # this rank's own arguments and input: an error is raised on every rank (below), none waits
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
        _check_layout(layout)
        if given is not None and options:
            raise ValueError(f"options {sorted(options)} given with a built mechanism module (it has its own)")
        spec = given.spec if given is not None else get_method(method)
        if spec.kind != "sequence" or spec.level != "sequence":
            raise ValueError(f"method {spec.name!r} is not a sequence mechanism; sequence parallelism runs those only")
        opts = given.options if given is not None else spec.make_options(**options)
        _check_shard(spec, q, k, v, key_padding_mask, is_causal, len(_chunk_ids(layout, rank, world)), layout)
        if gate_logits is not None and tuple(gate_logits.shape) != tuple(q.shape[:3]):
            raise ValueError(f"gate_logits must be this rank's (B, H, n) = {tuple(q.shape[:3])}, "
                             f"got {tuple(gate_logits.shape)}")
    except ValueError as e:
        error = str(e)
    shapes = [tuple(t.shape) if isinstance(t, Tensor) else None for t in (q, k, v, key_padding_mask, gate_logits)]
    _agree(group, "sequence_parallel_attention", [*shapes, str(strategy), str(layout), is_causal, bool(overlap)], error)
    assert spec is not None
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    dtype = q.dtype
    mech = given if given is not None else _build(spec, opts, q, k, group)
    per_rank = len(_chunk_ids(layout, rank, world))
    length, chunk = q.shape[2] * world, q.shape[2] // per_rank
    chosen = _resolve(mech, strategy, length, chunk)
    gated = bool(getattr(mech, "gated", False))
    if gated != (gate_logits is not None):
        raise ValueError(f"method {spec.name!r}: " + (
            "gated: pass its gate_logits (MultiheadAttention(..., sequence_parallel_group=g) computes them)"
            if gated else "gate_logits given, but the method has no per-token gates"))
    if gated and (chosen != "lasp2" or not is_causal):
        raise ValueError(f"gated {spec.name!r} runs under strategy 'lasp2' with is_causal=True only "
                         f"(got strategy {chosen!r}, is_causal={is_causal})")
    if chosen == "ulysses":
        return _ulysses(mech, q, k, v, key_padding_mask, is_causal, scale, group, layout).to(dtype)
    if chosen == "halo":
        reach = _window(mech, length)
        if reach is None:
            raise ValueError(f"strategy 'halo' runs sliding-window patterns; method {spec.name!r} with options "
                             f"{mech.options} is not one (global tokens, extra nodes or a non-window pattern)")
        if reach > chunk:
            raise ValueError(f"strategy 'halo': the window reaches {reach} tokens, more than one chunk "
                             f"({chunk} tokens); use fewer ranks, a longer sequence or strategy='ulysses'")
        return _halo(mech, q, k, v, key_padding_mask, is_causal, scale, group, layout, reach)
    q, k, v = mech.upcast(q, k, v)
    if chosen == "ring":
        if not spec.exact:
            raise ValueError(f"strategy 'ring' runs exact softmax attention; method {spec.name!r} is not exact")
        out = _ring(mech, q, k, v, key_padding_mask, is_causal, scale, group, layout)
    else:
        why = _lasp2_capable(type(mech))
        if why:
            raise ValueError(f"strategy 'lasp2' cannot run method {spec.name!r}: {why}")
        out = _lasp2(mech, q, k, v, key_padding_mask, is_causal, scale, group, layout, gate_logits, bool(overlap))
    return out.to(dtype)


# ----- the layer ----------------------------------------------------------------------------------------
class SequenceParallelAttention(ProjectedAttention):
    """The standard layer (:class:`~fastattn.core.layer.ProjectedAttention`) on a sequence sharded over
    ``group``: the projections act on this rank's tokens, the core runs through
    :func:`sequence_parallel_attention`. ``MultiheadAttention(..., sequence_parallel_group=g)`` builds it
    (mixed into the method's layer form where that declares ``sequence_parallel``: :func:`sequence_parallel_layer`).

    At construction the parameters and buffers (random features included) are broadcast from the group's
    first rank, so every rank holds the same layer. The gradients of the parameters are then this rank's
    share: sum them over the group (as data parallelism does). Self-attention only; no ``attn_mask``,
    attention dropout, attention weights, reference backend or decoding.
    """

    def __init__(self, options: Any, config: Any, *, generator: torch.Generator | None = None, group: Any = None,
                 strategy: str = "auto", layout: str = "contiguous") -> None:
        super().__init__(options, config, generator=generator)
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
        _check_layout(layout)
        if config.dropout > 0:
            raise ValueError("sequence parallelism does not run attention dropout; use dropout=0")
        if config.backend == "reference":
            raise ValueError("the reference backend is single-process; use backend='auto' or 'torch'")
        choose_strategy(self.core, strategy)  # an unknown strategy fails here, not at forward
        self.group, self.strategy, self.layout = group, strategy, layout
        _group(group)
        with torch.no_grad():
            for t in [*self.parameters(), *self.buffers()]:
                dist.broadcast(t.data, _global(group, 0), group=group)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, reference: bool = False, **masks: Any) -> Tensor:
        if reference:
            raise ValueError("the reference is single-process; it does not run under sequence parallelism")
        if masks.get("attn_mask") is not None:
            raise ValueError("sequence parallelism cannot apply an attn_mask (only key_padding_mask)")
        return sequence_parallel_attention(
            q, k, v, self.core, group=self.group, is_causal=masks.get("is_causal", False), strategy=self.strategy,
            layout=self.layout, key_padding_mask=masks.get("key_padding_mask"), gate_logits=masks.get("gate_logits"),
        )

    def forward(self, x: Tensor, context: Tensor | None = None, value: Tensor | None = None, *,
                need_weights: bool = False, **masks: Any) -> tuple[Tensor, Tensor | None]:
        if context is not None or value is not None:
            raise ValueError("sequence parallelism shards self-attention; cross-attention is not supported")
        if need_weights:
            raise ValueError("need_weights: the attention matrix is not formed under sequence parallelism")
        return super().forward(x, **masks)

    def step(self, x: Tensor, state: Any, *, key_padding_mask: Tensor | None = None) -> tuple[Tensor, Any]:
        raise ValueError("decoding (step) is not sequence-parallel; decode with an ordinary layer")


def sequence_parallel_layer(form: type | None) -> type:
    """The sequence-parallel version of a layer form (``Mechanism.layer_form`` declaring
    ``sequence_parallel``; None: the standard layer): :class:`SequenceParallelAttention` mixed into it,
    so the form's own parts act on this rank's tokens and its core call (``attend``) runs sequence-parallel."""
    if form is None:
        return SequenceParallelAttention
    if not getattr(form, "sequence_parallel", False):
        raise ValueError(f"layer form {form.__name__} has no sequence-parallel version")
    return _FORMS.setdefault(form, type(f"SequenceParallel{form.__name__}", (SequenceParallelAttention, form), {}))


_FORMS: dict[type, type] = {}


# ----- interop: DeepSpeed-Ulysses ---------------------------------------------------------------------
class LocalAttention(torch.nn.Module):
    """A fastattn mechanism as the ``local_attention`` callable of DeepSpeed-Ulysses'
    ``DistributedAttention(local_attention, sequence_process_group)``, which all-to-alls the sequence
    shards to head shards, calls ``local_attention(query, key, value, *args, **kwargs)`` on the whole
    sequence with this rank's heads, and all-to-alls back.

    ``layout``: the tensors' order, ``"sbhd"`` (sequence, batch, heads, features: Megatron's, with
    DeepSpeed's default ``scatter_idx=2, gather_idx=0``) or ``"bshd"``. The mechanism is built on the first
    call for the heads it receives (``H / W``), from ``seed``: the same seed on every rank gives every rank
    the same random parts (features, hashes), and the module keeps them across calls. Its heads must be
    independent and alike (``Mechanism.heads_independent``): each rank runs a module of a subset of them.
    Keywords: ``key_padding_mask`` (``(B, S)``, True = padding), ``is_causal`` (overrides the
    constructor's); any other argument is a ``ValueError`` (never silently dropped)."""

    def __init__(self, method: str = "softmax", *, layout: str = "sbhd", is_causal: bool = False, seed: int = 0,
                 **options: Any) -> None:
        super().__init__()
        if layout not in ("sbhd", "bshd"):
            raise ValueError(f"layout must be 'sbhd' or 'bshd', got {layout!r}")
        self.spec = get_method(method)
        if self.spec.level != "sequence":
            raise ValueError(f"method {method!r} is a {self.spec.level}-level mechanism; LocalAttention runs "
                             "sequence-level ones (DeepSpeed hands it projected query/key/value heads)")
        self.options = self.spec.resolve_options(options)
        self.layout, self.is_causal, self.seed = layout, is_causal, seed
        self.mechanism: Mechanism | None = None

    def _bhsd(self, x: Tensor, name: str) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D ({self.layout}), got shape {tuple(x.shape)}")
        return x.permute(1, 2, 0, 3) if self.layout == "sbhd" else x.transpose(1, 2)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, *args: Any,
                key_padding_mask: Tensor | None = None, is_causal: bool | None = None, **kwargs: Any) -> Tensor:
        if args or kwargs:
            extra = [f"positional #{i + 4}" for i in range(len(args))] + sorted(kwargs)
            raise ValueError(f"LocalAttention takes query, key, value, key_padding_mask and is_causal; "
                             f"got also {', '.join(extra)}")
        q, k, v = self._bhsd(query, "query"), self._bhsd(key, "key"), self._bhsd(value, "value")
        if self.mechanism is None:
            gen = {"generator": torch.Generator().manual_seed(self.seed)} if self.spec.randomized else {}
            mech = self.spec.cls(self.options, head_dim=q.shape[-1], num_heads=q.shape[1],
                                 num_kv_heads=k.shape[1], **gen).to(q.device)
            if not mech.heads_independent:
                raise ValueError(f"method {self.spec.name!r} cannot run on a subset of heads "
                                 f"({type(mech).__name__}.heads_independent is False), as Ulysses requires")
            self.mechanism = mech
        causal = self.is_causal if is_causal is None else is_causal
        out = self.mechanism.run(q, k, v, key_padding_mask=key_padding_mask, is_causal=causal)
        return out.permute(2, 0, 1, 3) if self.layout == "sbhd" else out.transpose(1, 2)
