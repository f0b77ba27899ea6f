"""The block-sparse engine: one implementation of every pattern in :mod:`fastattn.ops.sparse.patterns`.

For a :class:`~fastattn.ops.sparse.patterns.Pattern` with block size ``b``, queries and keys are padded to
multiples of ``b`` and viewed as ``(B, H, blocks, b, E)``. Each query block then sees up to four key
*sources*, whose scores are concatenated and normalised by one softmax (a key is never counted twice):

1. **gathered blocks**: the key blocks named by the pattern's layout (one ``index_select`` of blocks),
   one batched matmul;
2. **the column part**: keys at the same offset of every block, a matmul in the transposed layout;
3. **global keys**: a few positions every query sees;
4. **extra nodes**: keys/values that are not sequence positions (memory, relay, summary tokens).

Global keys and extra nodes are appended to each query block's gathered keys (one matmul for 1, 3, 4).

Rows of global queries (which see every key) are computed densely and written over their rows.
Time is O(n * (keys per query)) -- no ``n x n`` tensor exists. Rows with every key masked return zeros.

**Plan and reference.** What does not depend on the tensors' values (block layout, masks) is the
:class:`~fastattn.ops.sparse.plan.Plan`, built eagerly and cached across calls
(:mod:`fastattn.ops.sparse.plan`); the literal dense form is :mod:`fastattn.ops.sparse.reference`.

**Partial results.** With ``return_lse=True`` the engine also returns each query's log-sum-exp of its
allowed scores, ``(B, H, Lq)`` (``-inf`` for rows that see no key), differentiable like the output, so
a caller can merge this partial result with others (other keys of the same queries) by log-sum-exp.

**Memory.** Query blocks are processed in *groups* whose scores take about :data:`GROUP_BYTES` (a few
MiB on CPU: the group size depends on ``B * H * keys per query``, never on ``n``); the rows of global
queries likewise in chunks of rows. Under autograd a custom ``autograd.Function`` saves only q, k, v
(and extra nodes) and the output; backward recomputes each group's probabilities (flash-style) and
accumulates the key/value gradients in place (the adjoint of the gather: slice adds and
``index_add_``), so the working set of forward+backward is one group's temporaries plus O(n d) for the
inputs, output and gradients. Without grad (inference) the same loop runs once and saves nothing.
Double backward is not supported.

**Compiled kernels.** While the compiled backend is on (``backend="cpp"``, the switch of
:mod:`fastattn.ops.linear.compiled`), a CPU call the C++ kernels take runs on them instead
(:mod:`fastattn.ops.sparse.compiled`: same results; calls with extra nodes stay here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from fastattn.core.masks import Mask
from fastattn.ops.softmax.online import compute_dtype, merge_tiles, tile_stats

from . import compiled
from .nodes import Nodes
from .patterns import Pattern
from .plan import Plan, cached_plan

__all__ = ["GROUP_BYTES", "block_sparse_attention"]


# ---- rows and blocks of (B, H, L, D) tensors ------------------------------------------------------
def _rows(x: Tensor, a: int, b: int) -> Tensor:
    """Rows ``a:b`` of ``x (B, H, L, D)`` (axis 2), zeros for the rows outside ``[0, L)``."""
    lo, hi = max(a, 0), min(b, x.shape[2])
    if lo >= hi:
        return x.new_zeros(*x.shape[:2], b - a, x.shape[3])
    part = x[:, :, lo:hi]
    return part if (lo, hi) == (a, b) else F.pad(part, (0, 0, lo - a, b - hi))


def _put_rows(dst: Tensor, a: int, src: Tensor, scale: float = 1.0) -> None:
    """``dst[:, :, a:a + len(src)] = src * scale``, dropping the rows of ``src`` that fall outside ``dst``."""
    lo, hi = max(a, 0), min(a + src.shape[2], dst.shape[2])
    if lo < hi:
        torch.mul(src[:, :, lo - a:hi - a], scale, out=dst[:, :, lo:hi])


def _accumulate(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b`` in place, batched over the leading axes (no temporary the size of ``acc``)."""
    m, n = acc.shape[-2:]
    acc.view(-1, m, n).baddbmm_(a.reshape(-1, m, a.shape[-1]), b.reshape(-1, b.shape[-2], n))


# ---- key sources of a query group ------------------------------------------------------------------
# Each takes the group's scaled queries ``q (B, H, g, b, E)`` and gives its scores ``(B, H, g, b, K)``,
# its output for probabilities ``p`` and the backward of both: ``dp(do) = do V^T`` and
# ``backward(ds, p, q, do)``, which returns the queries' gradient and accumulates the keys'/values'.
class _Gathered:
    """Keys/values gathered per query block, ``(B, H, g, K, .)``; ``scatter(dk, dv)`` adds their
    gradients where they were gathered from (None: no gradient wanted)."""

    def __init__(self, k: Tensor, v: Tensor, scatter: Callable[[Tensor, Tensor], None] | None) -> None:
        self.k, self.v, self.scatter = k, v, scatter

    def scores(self, q: Tensor) -> Tensor:
        return torch.matmul(q, self.k.transpose(-1, -2))

    def apply(self, p: Tensor) -> Tensor:
        return torch.matmul(p, self.v)

    def dp(self, do: Tensor) -> Tensor:
        return torch.matmul(do, self.v.transpose(-1, -2))

    def backward(self, ds: Tensor, p: Tensor, q: Tensor, do: Tensor) -> Tensor:
        if self.scatter is not None:
            self.scatter(torch.matmul(ds.transpose(-1, -2), q), torch.matmul(p.transpose(-1, -2), do))
        return torch.matmul(ds, self.k)


class _Shared:
    """Keys/values ``(B, H, K, .)`` seen by every query of the group (all keys for the rows of global
    queries, the extra nodes there); gradients accumulate in place into ``dk, dv`` (None: not wanted)."""

    def __init__(self, k: Tensor, v: Tensor, dk: Tensor | None, dv: Tensor | None) -> None:
        self.k, self.v, self.dk, self.dv = k, v, dk, dv

    def scores(self, q: Tensor) -> Tensor:
        return torch.matmul(q.flatten(2, 3), self.k.transpose(-1, -2)).unflatten(2, q.shape[2:4])

    def apply(self, p: Tensor) -> Tensor:
        return torch.matmul(p.flatten(2, 3), self.v).unflatten(2, p.shape[2:4])

    def dp(self, do: Tensor) -> Tensor:
        return torch.matmul(do.flatten(2, 3), self.v.transpose(-1, -2)).unflatten(2, do.shape[2:4])

    def backward(self, ds: Tensor, p: Tensor, q: Tensor, do: Tensor) -> Tensor:
        if self.dk is not None and self.dv is not None:
            _accumulate(self.dk, ds.flatten(2, 3).transpose(-1, -2), q.flatten(2, 3))
            _accumulate(self.dv, p.flatten(2, 3).transpose(-1, -2), do.flatten(2, 3))
        return torch.matmul(ds.flatten(2, 3), self.k).unflatten(2, ds.shape[2:4])


class _Column:
    """The column part: query ``(t, r)`` sees key ``(u, r)`` of every block ``u``, computed in the
    transposed layout ``k, v (B, H, b, nkb, .)``; gradients accumulate into ``dk, dv`` (same layout)."""

    def __init__(self, k: Tensor, v: Tensor, dk: Tensor | None, dv: Tensor | None) -> None:
        self.k, self.v, self.dk, self.dv = k, v, dk, dv

    def scores(self, q: Tensor) -> Tensor:
        return torch.matmul(q.transpose(2, 3), self.k.transpose(-1, -2)).transpose(2, 3)

    def apply(self, p: Tensor) -> Tensor:
        return torch.matmul(p.transpose(2, 3), self.v).transpose(2, 3)

    def dp(self, do: Tensor) -> Tensor:
        return torch.matmul(do.transpose(2, 3), self.v.transpose(-1, -2)).transpose(2, 3)

    def backward(self, ds: Tensor, p: Tensor, q: Tensor, do: Tensor) -> Tensor:
        dst = ds.transpose(2, 3)
        if self.dk is not None and self.dv is not None:
            _accumulate(self.dk, dst.transpose(-1, -2), q.transpose(2, 3))
            _accumulate(self.dv, p.transpose(2, 3).transpose(-1, -2), do.transpose(2, 3))
        return torch.matmul(dst, self.k).transpose(2, 3)


Source = _Gathered | _Shared | _Column


def _probs(
    q: Tensor, sources: list[Source], allowed: Tensor, maybe_dead: bool, want_lse: bool = False,
) -> tuple[Tensor, Tensor | None, list[int], Tensor | None]:
    """One softmax over the concatenated scores of ``sources``, ``-inf`` where not ``allowed``; also the
    rows with no allowed key (``dead``, looked for only if ``maybe_dead``: their scores are left
    unmasked, their output is zeroed), the width of each source and, if ``want_lse``, the rows'
    log-sum-exp ``(..., 1)`` (``-inf`` for dead rows)."""
    scores = [src.scores(q) for src in sources]
    sizes = [s.shape[-1] for s in scores]
    s = scores[0] if len(scores) == 1 else torch.cat(scores, dim=-1)
    dead = None
    if maybe_dead:
        dead = ~allowed.any(-1, keepdim=True)
        allowed = allowed | dead
    s = _mask_(s, allowed)
    lse = None
    if want_lse:
        lse = torch.logsumexp(s, dim=-1, keepdim=True)
        if dead is not None:
            lse = lse.masked_fill_(dead, float("-inf"))
    return torch.softmax(s, dim=-1), dead, sizes, lse


def _mask_(s: Tensor, allowed: Tensor | None) -> Tensor:
    """``s`` with ``-inf`` where not ``allowed``, in place; an additive bias without the head axis is
    much cheaper than ``masked_fill_`` on the scores."""
    if allowed is None:
        return s
    return s.add_(torch.where(allowed, 0.0, float("-inf")))


def _split(x: Tensor, sizes: list[int]) -> list[Tensor] | tuple[Tensor, ...]:
    return [x] if len(sizes) == 1 else torch.split(x, sizes, dim=-1)


def _group_forward(
    q: Tensor, sources: list[Source], allowed: Tensor, maybe_dead: bool, want_lse: bool,
) -> tuple[Tensor, Tensor | None]:
    """Attention output ``(B, H, g, b, Ev)`` of one query group (the compute dtype) and, if
    ``want_lse``, its log-sum-exp ``(B, H, g, b, 1)``."""
    p, dead, sizes, lse = _probs(q, sources, allowed, maybe_dead, want_lse)
    parts = _split(p, sizes)
    out = sources[0].apply(parts[0])
    for src, pp in zip(sources[1:], parts[1:]):
        out = out + src.apply(pp)
    return (out if dead is None else out.masked_fill(dead, 0.0)), lse


def _group_backward(
    q: Tensor, sources: list[Source], allowed: Tensor, maybe_dead: bool, do: Tensor, skip: Tensor | None,
    dlse: Tensor | None,
) -> Tensor:
    """Gradient of one query group's (scaled) queries given its output gradient ``do`` and log-sum-exp
    gradient ``dlse`` (None: none; rows in ``skip`` get none); the sources accumulate their
    keys'/values' gradients. The probabilities are recomputed (nothing was saved), ``ds`` is softmax's
    backward of ``dp = do V^T`` plus ``p * dlse`` (``d lse / d s = p``)."""
    p, dead, sizes, _ = _probs(q, sources, allowed, maybe_dead)
    zero = dead if skip is None else skip if dead is None else dead | skip
    if zero is not None:
        do = do.masked_fill(zero, 0.0)
        dlse = None if dlse is None else dlse.masked_fill(zero, 0.0)
    dps = [src.dp(do) for src in sources]
    ds = torch._softmax_backward_data(dps[0] if len(dps) == 1 else torch.cat(dps, dim=-1), p, -1, p.dtype)
    if dlse is not None:
        ds = ds.addcmul_(p, dlse)
    dq = None
    for src, dss, pp in zip(sources, _split(ds, sizes), _split(p, sizes)):
        g = src.backward(dss, pp, q, do)
        dq = g if dq is None else dq + g
    assert dq is not None
    return dq



# ---- one call: query groups, gathers and scatters ---------------------------------------------------
GROUP_BYTES = {"cpu": 4 << 20, "cuda": 256 << 20}
"""Default scores size of one query group, in bytes, per device type (others: the CUDA value). A
group's other temporaries (gathered keys and values, probabilities, their gradients) are of the same
order, so this bounds the working set; larger groups mean fewer, larger matmuls."""


@dataclass
class _Operands:
    """The call's tensors in the compute dtype: keys/values ``(B, H, Lk, .)`` and as blocks ``(B, H, nkb,
    b, .)`` (zero-padded), the global keys' rows, the extra nodes and, for a column part, all keys/values
    in the transposed block layout ``(B, H, b, nkb, .)``."""

    k: Tensor
    v: Tensor
    kb: Tensor
    vb: Tensor
    kg: Tensor | None
    vg: Tensor | None
    nk: Tensor | None
    nv: Tensor | None
    kt: Tensor | None
    vt: Tensor | None


@dataclass
class _Grads:
    """Gradient accumulators: keys/values ``(B, H, nkb * b, .)`` (padded to whole blocks), the extra
    nodes (None: not wanted) and the column part's, in its transposed layout."""

    dk: Tensor
    dv: Tensor
    dnk: Tensor | None
    dnv: Tensor | None
    dkt: Tensor | None
    dvt: Tensor | None


class _Call:
    """The geometry of one call: query groups of ``group`` blocks, the key sources of a group (its
    gathered keys, the column part) with their bool mask, and the dense rows of global queries."""

    def __init__(
        self, plan: Plan, pattern: Pattern, mask: Mask, scale: float, nodes: Nodes | None, q: Tensor, k: Tensor,
        v: Tensor, dt: torch.dtype, group_bytes: int,
    ) -> None:
        self.plan, self.bs, self.scale, self.nodes, self.causal = plan, pattern.block, scale, nodes, mask.causal
        self.B, self.H, self.Lq, self.E = q.shape
        self.Lk, self.Ev = k.shape[2], v.shape[3]
        bs, dev = self.bs, q.device
        self.ar = torch.arange(bs, device=dev)
        self.qpos = (plan.qblk[:, None] * bs + self.ar)[:, :, None]  # (nqb, b, 1)
        self.kp = mask.key_padding
        self.kp_pad = None if self.kp is None else F.pad(self.kp, (0, plan.nkb * bs - self.Lk), value=True)
        self.S = plan.idx.shape[1] if plan.block_allowed is not None else 0
        self.G = 0 if plan.gk is None else plan.gk.numel()
        self.m = 0 if nodes is None else nodes.k.shape[2]
        self.kmain = self.S * bs + self.G + self.m  # gathered keys per query block
        self.ncol = plan.nkb if plan.column_allowed is not None else 0
        width = self.kmain + self.ncol
        if width == 0:
            raise ValueError("the pattern lets no query see any key")
        row_bytes = self.B * self.H * torch.finfo(dt).bits // 8
        self.group = max(1, group_bytes // (row_bytes * bs * width))
        # rows of global queries: tiles of (up to) all of them x enough keys to fill a group
        self.row_group = max(1, group_bytes // (row_bytes * 512))
        ngq = 0 if plan.gq is None else plan.gq.numel()
        self.row_keys = max(1, group_bytes // (row_bytes * min(ngq or 1, self.row_group)))
        # rows with no allowed key (zeroed) can only come from padding, extra nodes or the plan
        self.maybe_dead = self.kp is not None or nodes is not None or plan.dead_rows
        self.skip = None  # query positions (padded, in blocks) whose rows the global-query rows replace
        if plan.gq is not None:
            self.skip = torch.zeros(plan.nqb * bs, dtype=torch.bool, device=dev)
            self.skip[plan.gq + plan.lpad] = True
            self.skip = self.skip.view(plan.nqb, bs, 1)

    # ---- tensors -------------------------------------------------------------------------------
    def operands(self, k: Tensor, v: Tensor, nk: Tensor | None, nv: Tensor | None) -> _Operands:
        kg = vg = kt = vt = None
        n = self.plan.nkb
        kb, vb = (_rows(x, 0, n * self.bs).unflatten(2, (n, self.bs)) for x in (k, v))  # a copy only if padded
        if self.G:
            kg, vg = k[:, :, self.plan.gk], v[:, :, self.plan.gk]
        if self.ncol:
            kt, vt = kb.transpose(2, 3).contiguous(), vb.transpose(2, 3).contiguous()
        return _Operands(k, v, kb, vb, kg, vg, nk, nv, kt, vt)

    def grads(self, k: Tensor, v: Tensor, nk: Tensor | None, nodes_grad: bool) -> _Grads:
        n, bs = self.plan.nkb, self.bs
        zeros = lambda *shape: torch.zeros(*shape, dtype=k.dtype, device=k.device)  # noqa: E731
        dnk = dnv = dkt = dvt = None
        if nk is not None and nodes_grad:
            dnk, dnv = zeros(*nk.shape), zeros(*nk.shape[:3], self.Ev)
        if self.ncol:
            dkt, dvt = zeros(self.B, self.H, bs, n, self.E), zeros(self.B, self.H, bs, n, self.Ev)
        dk, dv = zeros(self.B, self.H, n * bs, self.E), zeros(self.B, self.H, n * bs, self.Ev)
        return _Grads(dk, dv, dnk, dnv, dkt, dvt)

    def _rows_of(self, x: Tensor, j0: int, j1: int) -> Tensor:
        """Rows of query blocks ``j0:j1`` of ``x (B, H, Lq, D)`` as ``(B, H, g, b, D)``."""
        a = j0 * self.bs - self.plan.lpad
        return _rows(x, a, a + (j1 - j0) * self.bs).unflatten(2, (j1 - j0, self.bs))

    def gather(self, xb: Tensor, xg: Tensor | None, xn: Tensor | None, j0: int, j1: int) -> Tensor:
        """The keys (or values) query blocks ``j0:j1`` see, ``(B, H, g, kmain, D)``: the layout's blocks
        of ``xb (B, H, nkb, b, D)`` (one ``index_select``), then the global keys and the extra nodes."""
        B, H, _, bs, D = xb.shape
        g = j1 - j0
        out = xb.index_select(2, self.plan.idx[j0:j1].flatten()).view(B, H, g, self.S * bs, D)
        extra = [x[:, :, None].expand(B, H, g, *x.shape[2:]) for x in (xg, xn) if x is not None]
        return torch.cat([out, *extra], dim=3) if extra else out

    def scatter(self, acc: Tensor, nacc: Tensor | None, grad: Tensor, j0: int, j1: int) -> None:
        """The adjoint of :meth:`gather`: adds ``grad (B, H, g, kmain, D)`` into ``acc (B, H, nkb * b, D)``
        and the extra nodes' part into ``nacc``. (Slots of the layout that are not valid got exactly
        zero gradient, so adding them to the block they were clamped to changes nothing.)"""
        plan, bs = self.plan, self.bs
        B, H, g, _, D = grad.shape
        o = self.S * bs
        blocks = grad[:, :, :, :o].reshape(B, H, g * self.S, bs, D)
        acc.unflatten(2, (plan.nkb, bs)).index_add_(2, plan.idx[j0:j1].flatten(), blocks)
        if self.G:
            acc.index_add_(2, plan.gk, grad[:, :, :, o:o + self.G].sum(2))  # type: ignore[arg-type]
            o += self.G
        if nacc is not None:
            nacc += grad[:, :, :, o:].sum(2)

    # ---- query groups --------------------------------------------------------------------------
    def groups(self) -> list[tuple[int, int]]:
        n = self.plan.nqb
        return [(j, min(j + self.group, n)) for j in range(0, n, self.group)]

    def queries(self, q: Tensor, j0: int, j1: int) -> Tensor:
        return self._rows_of(q, j0, j1) * self.scale

    def sources(self, ops: _Operands, grads: _Grads | None, j0: int, j1: int) -> list[Source]:
        out: list[Source] = []
        if self.kmain:
            kk = self.gather(ops.kb, ops.kg, ops.nk, j0, j1)
            vv = self.gather(ops.vb, ops.vg, ops.nv, j0, j1)
            scatter = None
            if grads is not None:
                def scatter(dk: Tensor, dv: Tensor, g: _Grads = grads) -> None:
                    self.scatter(g.dk, g.dnk, dk, j0, j1)
                    self.scatter(g.dv, g.dnv, dv, j0, j1)
            out.append(_Gathered(kk, vv, scatter))
        if self.ncol:
            assert ops.kt is not None and ops.vt is not None
            out.append(_Column(ops.kt, ops.vt, grads and grads.dkt, grads and grads.dvt))
        return out

    def allowed(self, j0: int, j1: int) -> Tensor:
        """Bool ``(B|1, 1, g, b, kmain + ncol)``: which of a group's keys each of its queries may see."""
        plan, kp, kp_pad = self.plan, self.kp, self.kp_pad
        parts = []
        if self.S:
            a = plan.block_allowed[j0:j1][None, None]  # type: ignore[index]
            if kp_pad is not None:
                a = a & ~kp_pad[:, plan.block_kpos[j0:j1]][:, None]  # type: ignore[index]
            parts.append(a)
        if self.G:
            a = plan.global_allowed[j0:j1][None, None]  # type: ignore[index]
            if kp is not None:
                a = a & ~kp[:, plan.gk][:, None, None, None, :]
            parts.append(a)
        if self.nodes is not None:
            parts.append(self.nodes.mask(self.qpos[j0:j1]))
        if self.ncol:
            a = plan.column_allowed[j0:j1][None, None]  # type: ignore[index]
            if kp_pad is not None:
                a = a & ~kp_pad[:, plan.column_kpos][:, None]
            parts.append(a)
        if len(parts) == 1:
            return parts[0]
        lead = torch.broadcast_shapes(*[a.shape[:-1] for a in parts])
        return torch.cat([a.expand(*lead, a.shape[-1]) for a in parts], dim=-1)

    # ---- dense rows of global queries -----------------------------------------------------------
    def row_chunks(self) -> list[tuple[Tensor, int]]:
        """Chunks of the global queries' rows, each with its last query's index (a Python int)."""
        gq, ints, n = self.plan.gq, self.plan.gq_list, self.row_group
        if gq is None:
            return []
        return [(rows, max(ints[i:i + n])) for i, rows in zip(range(0, len(ints), n), gq.split(n))]

    def row_queries(self, q: Tensor, rows: Tensor) -> Tensor:
        return (q.index_select(2, rows) * self.scale)[:, :, None]  # (B, H, 1, c, E)

    def row_tiles(
        self, ops: _Operands, grads: _Grads | None, rows: Tensor, last: int,
    ) -> Iterator[tuple[_Shared, Tensor | None]]:
        """Global queries (``rows``, the last at index ``last``) see every key (and every allowed extra
        node): tiles of ``row_keys`` keys with their bool masks (causally empty tiles skipped), then the
        extra nodes."""
        qpos = rows + (self.Lk - self.Lq)
        end = min(self.Lk, last + self.Lk - self.Lq + 1) if self.causal else self.Lk
        for k0 in range(0, end, self.row_keys):
            k1 = min(k0 + self.row_keys, self.Lk)
            a = None
            if self.causal:
                a = (torch.arange(k0, k1, device=rows.device) <= qpos[:, None])[None, None, None]
            if self.kp is not None:
                pad = ~self.kp[:, None, None, None, k0:k1]
                a = pad if a is None else a & pad
            acc = (None, None) if grads is None else (grads.dk[:, :, k0:k1], grads.dv[:, :, k0:k1])
            yield _Shared(ops.k[:, :, k0:k1], ops.v[:, :, k0:k1], *acc), a
        if ops.nk is not None and ops.nv is not None:
            assert self.nodes is not None
            acc = (None, None) if grads is None else (grads.dnk, grads.dnv)
            yield _Shared(ops.nk, ops.nv, *acc), self.nodes.mask(qpos[None, :, None])

    # ---- forward and backward -------------------------------------------------------------------
    def forward(self, q: Tensor, ops: _Operands, want_lse: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """The output, the log-sum-exp of the global-query rows as the backward needs it (0 for rows
        with no key; None: there are none) and, if ``want_lse``, every row's log-sum-exp ``(B, H, Lq,
        1)`` (``-inf`` for rows with no key)."""
        out = q.new_empty(self.B, self.H, self.Lq, self.Ev)
        lse = q.new_empty(self.B, self.H, self.Lq, 1) if want_lse else None
        for j0, j1 in self.groups():
            o, lse_g = _group_forward(
                self.queries(q, j0, j1), self.sources(ops, None, j0, j1), self.allowed(j0, j1), self.maybe_dead,
                want_lse,
            )
            _put_rows(out, j0 * self.bs - self.plan.lpad, o.flatten(2, 3))
            if lse is not None and lse_g is not None:
                _put_rows(lse, j0 * self.bs - self.plan.lpad, lse_g.flatten(2, 3))
        lses = []
        for rows, last in self.row_chunks():
            qr = self.row_queries(q, rows)
            alive: list[Tensor] = []

            def tiles(rows: Tensor = rows, last: int = last, qr: Tensor = qr, alive: list[Tensor] = alive) -> Iterator:
                for src, a in self.row_tiles(ops, None, rows, last):
                    s = _mask_(src.scores(qr), a)
                    if want_lse:
                        alive.append(torch.isfinite(s).any(-1, keepdim=True))
                    yield tile_stats(s, src.apply)

            o, row_lse = merge_tiles(tiles())
            out.index_copy_(2, rows, o[:, :, 0])
            lses.append(row_lse)
            if lse is not None:
                seen = torch.stack(alive).any(0)
                lse.index_copy_(2, rows, row_lse.masked_fill(~seen, float("-inf"))[:, :, 0])
        return out, torch.cat(lses, dim=3) if lses else None, lse

    def backward(
        self, q: Tensor, ops: _Operands, out: Tensor, row_lse: Tensor | None, do: Tensor, dlse: Tensor | None,
        grads: _Grads,
    ) -> Tensor:
        """dq from the output's and the log-sum-exp's (``(B, H, Lq, 1)``, None: none) gradients; the
        keys'/values' gradients accumulate into ``grads``."""
        dq = q.new_empty(q.shape)
        for j0, j1 in self.groups():
            skip = None if self.skip is None else self.skip[j0:j1]
            g = _group_backward(
                self.queries(q, j0, j1), self.sources(ops, grads, j0, j1), self.allowed(j0, j1), self.maybe_dead,
                self._rows_of(do, j0, j1), skip, None if dlse is None else self._rows_of(dlse, j0, j1),
            )
            _put_rows(dq, j0 * self.bs - self.plan.lpad, g.flatten(2, 3), self.scale)
        c0 = 0
        for rows, last in self.row_chunks():  # flash-style: p = exp(s - lse) tile by tile
            assert row_lse is not None
            qr, lse = self.row_queries(q, rows), row_lse[:, :, :, c0:c0 + len(rows)]
            c0 += len(rows)
            d_o = do.index_select(2, rows)[:, :, None]
            delta = (d_o * out.index_select(2, rows)[:, :, None]).sum(-1, keepdim=True)
            if dlse is not None:  # d lse / d s = p: the softmax backward with delta - dlse
                delta = delta - dlse.index_select(2, rows)[:, :, None]
            dqr = torch.zeros_like(qr)
            for src, a in self.row_tiles(ops, grads, rows, last):
                p = _mask_(src.scores(qr), a).sub_(lse).exp_()
                dqr += src.backward(src.dp(d_o).sub_(delta).mul_(p), p, qr, d_o)
            dq.index_copy_(2, rows, dqr[:, :, 0] * self.scale)
        if self.ncol:
            assert grads.dkt is not None and grads.dvt is not None
            grads.dk.unflatten(2, (self.plan.nkb, self.bs)).add_(grads.dkt.transpose(2, 3))
            grads.dv.unflatten(2, (self.plan.nkb, self.bs)).add_(grads.dvt.transpose(2, 3))
        return dq


class _BlockSparse(torch.autograd.Function):
    """Forward group by group, saving only the inputs and the output (and the log-sum-exp of the
    global-query rows); backward recomputes each group's probabilities (flash-style), so no tensor of
    all scores ever exists. Returns ``out`` or, with ``want_lse``, ``(out, lse)``."""

    @staticmethod
    def forward(
        ctx: Any, call: _Call, want_lse: bool, q: Tensor, k: Tensor, v: Tensor, nk: Tensor | None, nv: Tensor | None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        out, row_lse, lse = call.forward(q, call.operands(k, v, nk, nv), want_lse)
        ctx.call = call
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, nk, nv, out, row_lse)
        return (out, lse) if want_lse else out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, do: Tensor | None, dlse: Tensor | None = None) -> tuple[Tensor | None, ...]:
        call: _Call = ctx.call
        q, k, v, nk, nv, out, row_lse = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(out)
        nodes_grad = bool(ctx.needs_input_grad[5] or ctx.needs_input_grad[6])
        grads = call.grads(k, v, nk, nodes_grad)
        dq = call.backward(q, call.operands(k, v, nk, nv), out, row_lse, do, dlse, grads)
        lk = call.Lk
        dk, dv = grads.dk[:, :, :lk], grads.dv[:, :, :lk]
        if dk.shape[2] != grads.dk.shape[2]:
            dk, dv = dk.contiguous(), dv.contiguous()
        return None, None, dq, dk, dv, grads.dnk, grads.dnv


def block_sparse_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, pattern: Pattern, nodes: Nodes | None = None,
    plan: Plan | None = None, group_bytes: int | None = None, *, return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Sparse attention of ``q (B, H, Lq, E)`` over ``k, v (B, H, Lk, .)`` under ``pattern`` (and the
    causal / key-padding ``mask``), optionally with extra ``nodes``.

    ``plan``: the :class:`~fastattn.ops.sparse.plan.Plan` of this pattern, these lengths and causality
    (default: :func:`~fastattn.ops.sparse.plan.cached_plan`, built once and kept across calls).
    ``group_bytes``: the size of one query group's scores (default :data:`GROUP_BYTES` of the device).
    Returns ``out (B, H, Lq, Ev)`` in ``q``'s dtype or, with ``return_lse``, ``(out, lse)`` where ``lse
    (B, H, Lq)`` (compute dtype: float32 for half inputs) is each query's log-sum-exp of its allowed
    scores (``-inf`` where it sees no key), differentiable, for merging with other partial results.

    Example::

        pat = Pattern(64, (Window(128),))
        out, lse = block_sparse_attention(q, k, v, Mask(n, n, causal=True), d ** -0.5, pat, return_lse=True)
    """
    mask.require_only("key_padding", "causal", op="block-sparse attention")
    if plan is None:
        plan = cached_plan(pattern, q.shape[2], k.shape[2], mask.causal, q.device)
    if group_bytes is None:
        group_bytes = GROUP_BYTES.get(q.device.type, GROUP_BYTES["cuda"])
    dt = compute_dtype(q.dtype)
    q_, k_, v_ = q.to(dt), k.to(dt), v.to(dt)
    if compiled.active() and q.device.type == "cpu":  # the compiled backend (backend="cpp"), if it takes the call
        res = compiled.attention(q_, k_, v_, mask, scale, pattern.block, plan, nodes)
        if res is not None:
            out = res[0].to(q.dtype)
            return (out, res[1]) if return_lse else out
    nk = nv = None
    if nodes is not None:
        nk, nv = nodes.k.to(dt), nodes.v.to(dt)
    call = _Call(plan, pattern, mask, scale, nodes, q_, k_, v_, dt, group_bytes)
    tensors = [t for t in (q_, k_, v_, nk, nv) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        res = _BlockSparse.apply(call, return_lse, q_, k_, v_, nk, nv)
        out, lse = res if return_lse else (res, None)
    else:  # inference: one pass, nothing saved
        out, _, lse = call.forward(q_, call.operands(k_, v_, nk, nv), return_lse)
    out = out.to(q.dtype)
    return (out, lse[..., 0]) if lse is not None else out
