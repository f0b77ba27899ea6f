"""The compiled CPU backend of the block-sparse engine (``backend="cpp"``): C++ kernels on a plan.

``sparse_cpu.cpp`` (next to this file) is built into the same extension as the linear kernels, by the one
build helper :mod:`fastattn.ops.linear.compiled` (built on first use and cached; :func:`build`, the
``use()`` switch and the reasons it is unavailable are that module's). While the switch is on,
:func:`~fastattn.ops.sparse.engine.block_sparse_attention` hands a call to :func:`attention` here, which
runs it as the ``torch.library`` custom ops ``fastattn::block_sparse_cpp`` (forward: output and
log-sum-exp) and ``fastattn::block_sparse_cpp_backward`` (flash-style: dq, dk, dv from the output,
log-sum-exp and output gradient), float32 and float64 (half inputs in float32, as the engine).

**What the kernels take.** A :class:`~fastattn.ops.sparse.plan.Plan` flattened once per plan
(:func:`flat_plan`, kept in ``plan.compiled``): per query block, its key *slots* (the gathered blocks'
positions, then the global keys) with the element mask of each slot (causal diagonal, window edges,
padded blocks) and, for the backward's key sweep, the inverse lists (which query blocks see each key
block / global key). Key padding, the scale and grouped-query heads (``k, v`` with fewer heads than
``q``) are arguments. The rows of global queries (which see every key) are computed densely by PyTorch
ops (:func:`_dense_rows`, ``O(rows x Lk)``) and written over the kernel's rows (the kernel's own rows
there then get no gradient).

**Column part** (:class:`Strided`: query ``(t, r)`` sees key ``(u, r)`` of every block ``u``): computed by
PyTorch ops in the transposed block layout (:func:`_column_part`, one batched matrix product, ``O(n x
blocks)``) as a partial result and merged with the kernel's by log-sum-exp (the plan never lets a key
be in both, so the merge is the one softmax over their union).

**Fallback.** A call with extra nodes returns ``None`` from :func:`attention` and runs on the PyTorch
engine (same results, no error).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fastattn.core.masks import Mask
from fastattn.ops.linear.compiled import _module, active, build  # the one build helper

from .nodes import Nodes
from .plan import Plan, eager

__all__ = ["active", "attention", "build", "flat_plan", "unsupported"]


def unsupported(plan: Plan, nodes: Nodes | None, dtype: torch.dtype, device: torch.device) -> str | None:
    """Why the compiled kernels cannot take this call (None: they can)."""
    if device.type != "cpu":
        return "CPU only"
    if dtype not in (torch.float32, torch.float64):
        return f"float32/float64 only, got {dtype}"
    if nodes is not None:
        return "extra nodes are not in the compiled kernels"
    return None


@eager
def flat_plan(plan: Plan, block: int, lk: int) -> dict[str, Tensor]:
    """The plan as the kernels read it (built once per plan, kept in ``plan.compiled``): ``kidx (nqb, W)``
    int64 key positions of each query block's slots (index work: never traced by ``torch.compile``), the rows
    ``[rlo, rhi)`` (int32, ``(nqb, W)``) that see each slot, ``allow (nqb, W, b)`` uint8 element masks (slots
    major), ``slot_any (nqb, W)``, and the inverse lists of the key tasks (the ``nkb`` key blocks, then
    the global keys ``gk`` ``b`` at a time) in CSR form: ``tptr`` (tasks + 1), ``tj`` (query block), ``to``
    (first slot)."""
    key = ("flat", block, lk)
    hit = plan.compiled.get(key)
    if hit is not None:
        return hit
    nqb, bs, dev = plan.nqb, block, plan.qblk.device
    kpos, allowed = [], []
    S = plan.idx.shape[1] if plan.block_allowed is not None else 0
    if S:
        kpos.append(plan.block_kpos.reshape(nqb, S * bs))  # type: ignore[union-attr]
        allowed.append(plan.block_allowed)
    G = 0
    if plan.gk is not None:
        G = plan.gk.numel()
        kpos.append(plan.gk[None, :].expand(nqb, G))
        allowed.append(plan.global_allowed)
    if not kpos:  # nothing but global queries: one masked slot
        kpos.append(torch.zeros(nqb, 1, dtype=torch.long, device=dev))
        allowed.append(torch.zeros(nqb, bs, 1, dtype=torch.bool, device=dev))
    kidx = torch.cat(kpos, 1).to(torch.long).contiguous()
    a = torch.cat(allowed, -1)  # (nqb, b, W)
    slot_any = a.any(1)
    # inverse lists: (key block u | global key g) -> [(query block j, first slot o)]
    task, tj, to = [], [], []
    if S:
        j = torch.arange(nqb, device=dev)[:, None].expand(nqb, S)
        live = plan.valid & slot_any[:, :S * bs].view(nqb, S, bs).any(-1)
        task.append(plan.idx[live])
        tj.append(j[live])
        to.append((torch.arange(S, device=dev) * bs)[None, :].expand(nqb, S)[live])
    ngt = -(-G // bs)  # the global keys, b at a time (consecutive slots)
    if G:
        j = torch.arange(nqb, device=dev)[:, None].expand(nqb, ngt)
        any_g = F.pad(slot_any[:, S * bs:S * bs + G], (0, ngt * bs - G))
        live = any_g.view(nqb, ngt, bs).any(-1)
        task.append((plan.nkb + torch.arange(ngt, device=dev))[None, :].expand(nqb, ngt)[live])
        tj.append(j[live])
        to.append((S * bs + torch.arange(ngt, device=dev) * bs)[None, :].expand(nqb, ngt)[live])
    ntask = plan.nkb + ngt
    if task:
        t, jj, oo = torch.cat(task), torch.cat(tj), torch.cat(to)
        order = torch.argsort(t * nqb + jj)
        t, jj, oo = t[order], jj[order], oo[order]
        counts = torch.bincount(t, minlength=ntask)
    else:
        jj = oo = torch.zeros(0, dtype=torch.long, device=dev)
        counts = torch.zeros(ntask, dtype=torch.long, device=dev)
    tptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    # the rows each slot's key is seen by lie in [rlo, rhi) (the kernels skip the others)
    allow = a.transpose(1, 2).contiguous().to(torch.uint8)  # (nqb, W, b)
    rlo = torch.where(slot_any, allow.argmax(-1), bs)  # argmax: the first maximum
    rhi = torch.where(slot_any, bs - allow.flip(-1).argmax(-1), 0)
    flat = {
        "kidx": kidx, "allow": allow,
        "rlo": rlo.to(torch.int32).contiguous(), "rhi": rhi.to(torch.int32).contiguous(),
        "slot_any": slot_any.contiguous().to(torch.uint8),
        "tptr": tptr.to(torch.long).contiguous(), "tj": jj.to(torch.long).contiguous(),
        "to": oo.to(torch.long).contiguous(),
        "gk": (plan.gk if plan.gk is not None else torch.zeros(0, dtype=torch.long, device=dev)).to(torch.long),
    }
    plan.compiled[key] = flat
    return flat


# ---- the custom ops -------------------------------------------------------------------------------
_PLAN = ("Tensor kidx, Tensor allow, Tensor slot_any, Tensor rlo, Tensor rhi, Tensor tptr, Tensor tj, Tensor to, "
         "Tensor gk")
_FWD = f"(Tensor q, Tensor k, Tensor v, {_PLAN}, Tensor? kpad, int lpad, int block, float scale) -> (Tensor, Tensor)"
_BWD = (f"(Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? dout, Tensor? dlse, {_PLAN}, Tensor? kpad, "
        "int lpad, int block, float scale) -> (Tensor, Tensor, Tensor)")


@torch.library.custom_op("fastattn::block_sparse_cpp", mutates_args=(), schema=_FWD)
def _op(q, k, v, kidx, allow, slot_any, rlo, rhi, tptr, tj, to, gk, kpad, lpad, block, scale):
    out, lse = _module().block_sparse_forward(q, k, v, kidx, allow, slot_any, rlo, rhi, kpad, lpad, block, scale)
    return out, lse


@_op.register_fake
def _fake(q, k, v, kidx, allow, slot_any, rlo, rhi, tptr, tj, to, gk, kpad, lpad, block, scale):
    return q.new_empty(*q.shape[:3], v.shape[3]), q.new_empty(q.shape[:3])


@torch.library.custom_op("fastattn::block_sparse_cpp_backward", mutates_args=(), schema=_BWD)
def _op_backward(q, k, v, out, lse, dout, dlse, kidx, allow, slot_any, rlo, rhi, tptr, tj, to, gk, kpad, lpad, block,
                 scale):
    if dout is None:
        dout = torch.zeros_like(out)
    delta = (dout * out).sum(-1)
    if dlse is not None:  # d lse / d s = p: the softmax backward with delta - dlse
        delta = delta - torch.where(torch.isfinite(lse), dlse, 0.0)
    dq, dk, dv, dkg, dvg = _module().block_sparse_backward(q, k, v, dout, lse, delta, kidx, allow, slot_any, rlo, rhi,
                                                           kpad, tptr, tj, to, gk, lpad, block, scale)
    if gk.numel():
        dk = dk.index_add_(2, gk, dkg)
        dv = dv.index_add_(2, gk, dvg)
    return dq, dk, dv


@_op_backward.register_fake
def _fake_backward(q, k, v, out, lse, dout, dlse, kidx, allow, slot_any, rlo, rhi, tptr, tj, to, gk, kpad, lpad,
                   block, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    q, k, v, *plan, kpad, lpad, block, scale = inputs
    ctx.save_for_backward(q, k, v, *output, *plan, kpad)
    ctx.args = (lpad, block, scale)


def _backward(ctx: Any, dout: Tensor | None, dlse: Tensor | None) -> tuple:
    q, k, v, out, lse, *plan, kpad = ctx.saved_tensors
    dq, dk, dv = torch.ops.fastattn.block_sparse_cpp_backward(q, k, v, out, lse, dout, dlse, *plan, kpad, *ctx.args)
    return (dq, dk, dv) + (None,) * (len(ctx.needs_input_grad) - 3)


_op.register_autograd(_backward, setup_context=_setup_context)
_KEYS = ("kidx", "allow", "slot_any", "rlo", "rhi", "tptr", "tj", "to", "gk")


def _dense_rows(
    q: Tensor, k: Tensor, v: Tensor, rows: Tensor, mask: Mask, scale: float,
) -> tuple[Tensor, Tensor]:
    """Output ``(B, H, r, Ev)`` and log-sum-exp ``(B, H, r)`` (``-inf`` where no key) of the query
    ``rows``, which see every key (causally: up to their own position; not padded keys), by PyTorch ops
    (differentiable; rows with no key give zeros)."""
    H, Hk = q.shape[1], k.shape[1]
    if Hk != H:
        k, v = k.repeat_interleave(H // Hk, 1), v.repeat_interleave(H // Hk, 1)
    s = torch.matmul(q.index_select(2, rows) * scale, k.transpose(-1, -2))  # (B, H, r, Lk)
    lq, lk = q.shape[2], k.shape[2]
    kpos = torch.arange(lk, device=q.device)
    allowed = torch.ones(1, 1, 1, lk, dtype=torch.bool, device=q.device)
    if mask.causal:
        allowed = allowed & (kpos <= (rows + lk - lq)[:, None])[None, None]
    if mask.key_padding is not None:
        allowed = allowed & ~mask.key_padding[:, None, None, :]
    alive = allowed.any(-1, keepdim=True)
    s = s.masked_fill(~(allowed | ~alive), float("-inf"))  # rows with no key: unmasked, zeroed below
    lse = torch.logsumexp(s, -1, keepdim=True)
    p = torch.exp(s - lse) * alive
    lse = lse.masked_fill(~alive, float("-inf"))
    return torch.matmul(p, v), lse[..., 0]


def _column_part(
    q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, bs: int, plan: Plan,
) -> tuple[Tensor, Tensor]:
    """The column part's partial result ``(out (B, H, Lq, Ev), lse (B, H, Lq))`` (``-inf``: no key), by
    PyTorch ops (differentiable) in the transposed block layout ``(B, H, b, blocks, .)``."""
    H, Hk, lq, lk = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    if Hk != H:
        k, v = k.repeat_interleave(H // Hk, 1), v.repeat_interleave(H // Hk, 1)
    nqb, nkb = plan.nqb, plan.nkb

    def blocks(x: Tensor, before: int, n: int) -> Tensor:  # (B, H, L, D) -> (B, H, b, n, D), zero-padded
        x = F.pad(x, (0, 0, before, n * bs - before - x.shape[2]))
        return x.unflatten(2, (n, bs)).transpose(2, 3)

    qt, kt, vt = blocks(q * scale, plan.lpad, nqb), blocks(k, 0, nkb), blocks(v, 0, nkb)
    s = torch.matmul(qt, kt.transpose(-1, -2))  # (B, H, b, nqb, nkb)
    allowed = plan.column_allowed.permute(1, 0, 2)[None, None]  # type: ignore[union-attr]
    if mask.key_padding is not None:
        kp = F.pad(mask.key_padding, (0, nkb * bs - lk), value=True).unflatten(1, (nkb, bs)).transpose(1, 2)
        allowed = allowed & ~kp[:, None, :, None, :]
    alive = allowed.any(-1, keepdim=True)
    s = s.masked_fill(~(allowed | ~alive), float("-inf"))  # rows with no key: unmasked, zeroed below
    lse = torch.logsumexp(s, -1, keepdim=True)
    out = torch.matmul(torch.exp(s - lse) * alive, vt)
    lse = lse.masked_fill(~alive, float("-inf"))[..., 0]
    rows = slice(plan.lpad, plan.lpad + lq)
    return out.transpose(2, 3).flatten(2, 3)[:, :, rows], lse.transpose(2, 3).flatten(2, 3)[:, :, rows]


def _merge(o1: Tensor, l1: Tensor, o2: Tensor, l2: Tensor) -> tuple[Tensor, Tensor]:
    """Two partial results over disjoint keys merged by log-sum-exp (rows with no key in either: zero
    output, ``-inf``; no NaN in values or gradients)."""
    m = torch.maximum(l1, l2)
    m = torch.where(torch.isfinite(m), m, 0.0).detach()
    w1, w2 = torch.exp(l1 - m), torch.exp(l2 - m)
    total = w1 + w2
    some = total > 0
    total = torch.where(some, total, 1.0)
    out = (o1 * w1[..., None] + o2.to(o1.dtype) * w2[..., None]) / total[..., None]
    lse = torch.where(some, m + torch.log(total), float("-inf"))
    return out, lse


def attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, block: int, plan: Plan, nodes: Nodes | None,
) -> tuple[Tensor, Tensor] | None:
    """``(out (B, H, Lq, Ev), lse (B, H, Lq))`` of the block-sparse call on the compiled kernels
    (``q`` in float32/float64; ``k, v`` may have fewer heads, a divisor of ``q``'s); ``None`` when they
    cannot take it (:func:`unsupported`: the caller then runs the PyTorch engine)."""
    if unsupported(plan, nodes, q.dtype, q.device) is not None:
        return None
    flat = flat_plan(plan, block, k.shape[2])
    kp = mask.key_padding
    kpad = None if kp is None else kp.to(torch.uint8).contiguous()
    out, lse = _op(q, k, v, *(flat[n] for n in _KEYS), kpad, plan.lpad, block, float(scale))
    if plan.column_allowed is not None:
        out, lse = _merge(out, lse, *_column_part(q, k, v, mask, scale, block, plan))
    if plan.gq is not None:
        o, l = _dense_rows(q, k, v, plan.gq, mask, scale)
        out = out.index_copy(2, plan.gq, o.to(out.dtype))
        lse = lse.index_copy(2, plan.gq, l.to(lse.dtype))
    return out, lse
