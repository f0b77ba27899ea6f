"""The tiled linear-attention kernels: one forward and one hand-written backward, causal and not, with
an initial state in, the final state out, and per-head decay or per-token gates.

Over features ``q' = phi(q)``, ``k' = phi(k)``, values ``v``, log-gates ``a_t = log g_t <= 0`` and an
initial state ``(S_0, z_0)``, the causal form is the recurrence::

    S_t = g_t S_{t-1} + k'_t v_t^T      z_t = g_t z_{t-1} + k'_t      num_t = q'_t S_t      den_t = q'_t . z_t

and ``out_t = num_t / den_t`` (or ``num_t`` unnormalised); the final state ``(S_n, z_n)`` is returned.
With ``A_t = a_1 + .. + a_t``, query ``t`` weighs key ``s <= t`` by ``exp(A_t - A_s)`` and the initial
state by ``exp(A_t)``. A per-head decay ``lambda_h`` is the constant gate (given as one log-gate per
row). Without gates the weights are 1 and the kernel runs the plain, faster code. The non-causal form
has no gates: ``S = S_0 + sum_s k'_s v_s^T`` is seen by every query.

Work is cut into *tiles*: a group of (batch, head) rows times a span of tokens, sized so that each
temporary is about 1 MiB. Tiles are processed one after another; the causal form carries its ``D x Ev``
running state from one token span to the next, and inside a span it works in *chunks* of ``c`` tokens
(Lightning Attention-2's split): the exact masked (decayed) quadratic form inside a chunk, the state
across chunks, the chunk-start states of a span in one batched matmul with a (decayed) triangular
matrix. Nothing n-sized is allocated except the outputs and the gradients: on CPU a fresh large tensor
costs page faults that exceed the arithmetic of these kernels, and cache-sized temporaries are reused by
the allocator. Gate arithmetic (cumulative log-gates, their differences and exponentials) is done in
float64 (float32 on MPS) -- it is O(n c) per row, not O(n D) -- so no precision is lost to differences
of large sums.

Grouped-query attention is native: ``k``, ``v``, the gates and the states have ``Hkv`` heads, ``q`` has
``H = g Hkv``; a tile's rows are key/value heads, and the ``g`` query heads of a row are folded into the
chunk's query axis (``(g c) x c`` scores, masked per head), so key-side work and states are not repeated.

With a token-wise feature map ``phi`` the features are computed tile by tile and recomputed in
backward, so the (often wider than the input) feature tensors are never stored; without it ``q``, ``k``
are the features.

The backward is written by hand. With ``G = dout / den`` and ``g_t = -(dout_t . out_t) / den_t`` (the
denominator's gradient) the gradients are again linear attentions (``dW_ts = G_t . v_s + g_t`` over the
visible pairs, ``W_ts = exp(A_t - A_s) q'_t . k'_s``)::

    dq'_t = sum_s exp(A_t - A_s) dW_ts k'_s + exp(A_t) (S_0 G_t + g_t z_0)
    dk'_s = sum_t exp(A_t - A_s) dW_ts q'_t + exp(A_n - A_s) (dS_n v_s + dz_n)
    dv_s  = sum_t W_ts G_t + exp(A_n - A_s) dS_n^T k'_s
    dS_0  = sum_t exp(A_t) q'_t G_t^T + exp(A_n) dS_n        (dz_0 alike with g_t, dz_n)

A sweep backwards over the spans gives ``dk'``, ``dv`` and ``dS_0`` (suffix states ``sum exp(..)
q'_t G_t^T`` started from ``dS_n``), a sweep forwards gives ``dq'`` (prefix states started from ``S_0``).
The gradient of the cumulative log-gate ``A_t`` is ``q'_t . dq'_t - k'_t . dk'_t`` (plus ``<S_n, dS_n> +
<z_n, dz_n>`` at the last token), so ``d a_r = sum_{t >= r} dA_t`` comes for free from the feature
gradients; for a per-row constant ``log lambda`` it is ``sum_t t dA_t`` (``t`` from 1). Non-causal:
``dq'_t = G_t S^T + g_t z^T`` while summing ``dS``, ``dz`` (from ``dS_n``, ``dz_n``); then ``dk'_s =
dS v_s + dz``, ``dv_s = dS^T k'_s``, ``dS_0 = dS``. Saved for backward: the inputs and the outputs.

Entry points: :func:`tiled_linear_attention` (autograd-aware; without ``phi`` it calls the
``torch.library`` custom ops ``fastattn::linear_attention`` / ``fastattn::linear_attention_backward``, so
``torch.compile`` keeps one graph around them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["FeatureMap", "gate_dtype", "tile_length", "tiled_linear_attention"]

_TILE_FLOATS = 1 << 18  # CPU: about 1 MiB of float32 per tile-sized temporary (stays in cache)
_TILE_FLOATS_ACCEL = 1 << 24  # GPU: 64 MiB; small tiles would be kernel-launch bound there


def gate_dtype(device: torch.device) -> torch.dtype:
    """float64 for the O(n c) gate arithmetic, except where the device has none (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64

FeatureMap = Callable[[Tensor, bool], Tensor]  # phi(x, is_query) for x (..., L, E), token by token


def _budget(device: torch.device) -> int:
    return _TILE_FLOATS if device.type == "cpu" else _TILE_FLOATS_ACCEL


def tile_length(rows: int, chunk: int, width: int, budget: int | None = None) -> int:
    """Tokens per span for a group of ``rows``: a multiple of ``chunk`` whose largest temporary
    ``(rows, T, width)`` is about ``budget`` (default :data:`_TILE_FLOATS`) elements, never less than
    one chunk."""
    per_token = max(1, rows * max(width, chunk))
    return max(chunk, ((budget or _TILE_FLOATS) // per_token) // chunk * chunk)


def _to_chunks(x: Tensor, c: int) -> Tensor:
    """``(G, L, w)`` as ``(G * chunks, c, w)``, zero-padded to whole chunks (a view where possible)."""
    pad = -x.shape[1] % c
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    return x.reshape(-1, c, x.shape[-1])


def _exclusive_prefix(per_chunk: Tensor, carry: Tensor, loglam: Tensor | None = None,
                      reverse: bool = False) -> Tensor:
    """For each chunk ``j`` the state before it: ``carry`` decayed through the earlier chunks plus the
    earlier chunks' sums, each decayed through the chunks between (``reverse``: the same from the later
    chunks and a carry at the end). ``per_chunk`` ``(G, m, ...)``, ``carry`` ``(G, ...)``, ``loglam``
    ``(G, m)`` float64 log-decay of each whole chunk (None: no decay). One batched matmul with a strictly
    triangular matrix: torch's ``cumsum`` along a non-last axis is a strided scalar loop, several times
    slower."""
    g, m = per_chunk.shape[:2]
    dt, dev = per_chunk.dtype, per_chunk.device
    base = carry.reshape(g, 1, -1)
    if m == 1:  # one chunk (a decoding step, a short span): nothing before it but the carry
        return base.expand(g, 1, base.shape[-1]).reshape(per_chunk.shape)
    if loglam is None:
        ones = torch.ones(m, m, dtype=dt, device=dev)
        tri = (ones.triu(1) if reverse else ones.tril(-1)).expand(g, m, m)
    else:
        incl = loglam.cumsum(1)  # C_j: chunks 0..j
        excl = incl - loglam  # chunks 0..j-1
        keep = torch.ones(m, m, dtype=torch.bool, device=dev)
        if reverse:  # chunk l > j reaches the end of chunk j through chunks j+1..l-1
            expo, keep, coef = excl[:, None, :] - incl[:, :, None], keep.triu(1), incl[:, -1:] - incl
        else:  # chunk l < j reaches the start of chunk j through chunks l+1..j-1
            expo, keep, coef = excl[:, :, None] - incl[:, None, :], keep.tril(-1), excl
        tri = expo.masked_fill(~keep, float("-inf")).exp_().to(dt)
        base = base * coef.exp().to(dt).unsqueeze(-1)
    return torch.baddbmm(base, tri, per_chunk.reshape(g, m, -1)).view(per_chunk.shape)


def _carry(prefix: Tensor, per_chunk: Tensor, loglam: Tensor | None, reverse: bool = False) -> Tensor:
    """The state after the span (``reverse``: before it) from an :func:`_exclusive_prefix`."""
    j = 0 if reverse else -1
    if loglam is None:
        return prefix[:, j] + per_chunk[:, j]
    lam = loglam[:, j].exp().to(prefix.dtype).view(-1, *([1] * (prefix.dim() - 2)))
    return prefix[:, j] * lam + per_chunk[:, j]


def _divide(num: Tensor, den: Tensor) -> Tensor:
    """``num /= den`` in place, by 1 where ``den == 0``."""
    return num.div_(torch.where(den == 0, torch.ones_like(den), den))


class _Decay(NamedTuple):
    """The gates of one span in chunk form: ``w`` the intra-chunk weights ``exp(A_i - A_j)`` (``(G*m, c,
    c)``, or ``(rows, 1, c, c)`` shared by the chunks of a row for a constant gate; upper triangle
    arbitrary), ``q_in`` ``(G*m, c, 1)`` the decay from the chunk start to each query, ``k_out`` from each
    key to the chunk end, ``loglam`` ``(rows, m)`` float64 log-decay of each whole chunk."""

    w: Tensor
    q_in: Tensor
    k_out: Tensor
    loglam: Tensor

    def weigh(self, a: Tensor, gq: int) -> Tensor:
        """Chunk scores ``a`` ``(G*m, gq * c, c)`` times the intra-chunk weights, lower triangle kept, in
        place (``gq`` query heads share a key/value head's gates)."""
        n, c = a.shape[0], a.shape[-1]
        a4 = a.view(n, gq, c, c)
        if self.w.dim() == 4:
            a4.view(self.w.shape[0], -1, gq, c, c).mul_(self.w.unsqueeze(2))
        else:
            a4.mul_(self.w.unsqueeze(1))
        a4.tril_()
        return a


class _Tiles:
    """The tiling of one call and everything done per tile: slicing, feature maps (and pulling
    gradients back through them), the chunk layout, gates, writing results.

    ``(B, H, L, w)`` tensors are handled as *planes* ``(rows, L, w)``: one plane of ``B * H`` rows when
    the batch and head axes merge without a copy, else one plane per batch element (e.g. the
    ``(B, L, H, E)``-transposed layout of a projection). A *group* is ``(plane, r0, r1)``; the token
    *spans* are shared by all groups. ``chunk=None`` (the non-causal form) makes a span one chunk."""

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, phi: FeatureMap | None, chunk: int | None,
                 log_g: Tensor | None = None) -> None:
        self.phi = phi
        self.b, self.h = k.shape[:2]  # rows are key/value heads
        self.gq = q.shape[1] // self.h  # query heads per key/value head (grouped-query attention)
        q = q.unflatten(1, (self.h, self.gq))  # (B, Hkv, gq, L, E)
        self.flat = self.b == 1 or all(x.stride(0) == self.h * x.stride(1) for x in (q, k, v))
        self.c = None if chunk is None else max(1, min(chunk, k.shape[2]))
        self.d = q.shape[-1] if phi is None else phi(q[:1, :1, :1, :1], True).shape[-1]
        self.ev = v.shape[-1]
        width = max(self.d, self.ev, self.c or 1) * self.gq
        rows = self.b * self.h if self.flat else self.h
        n = max(q.shape[3], k.shape[2])
        budget = _budget(q.device)
        per_group = max(1, budget // (n * width))  # rows whose whole sequence fits a tile
        if per_group > 1 or n * width <= budget:
            size, span = min(rows, per_group), n
        else:
            size, span = 1, tile_length(1, self.c or 1, width, budget)
        self.groups = [(p, r0, min(rows, r0 + size)) for p in range(1 if self.flat else self.b)
                       for r0 in range(0, rows, size)]
        self.q_spans = [(t0, min(q.shape[3], t0 + span)) for t0 in range(0, q.shape[3], span)]
        self.k_spans = [(t0, min(k.shape[2], t0 + span)) for t0 in range(0, k.shape[2], span)]
        self.q, self.k, self.v = self.planes(q), self.planes(k), self.planes(v)
        # log-gates as planes (rows, L, 1), or (rows, 1, 1) for one constant gate per row
        self.lg = None if log_g is None else self.planes(log_g.unsqueeze(-1))
        self.const = log_g is not None and log_g.shape[-1] == 1

    def planes(self, x: Tensor) -> list[Tensor]:
        """Planes of a per-row tensor ``(B, Hkv, ...)``: ``(rows, ...)``."""
        return [x.reshape(-1, *x.shape[2:])] if self.flat else list(x.unbind(0))

    def qplanes(self, x: Tensor) -> list[Tensor]:
        """Planes of a query-side tensor ``(B, H, L, w)``: ``(rows, gq, L, w)``."""
        return self.planes(x.unflatten(1, (self.h, self.gq)))

    def rows(self, planes: list[Tensor] | None, grp: tuple[int, int, int]) -> Tensor | None:
        """The rows of a group in a per-row tensor's planes (a state ``(rows, D, Ev)``)."""
        return None if planes is None else planes[grp[0]][grp[1]:grp[2]]

    def chunks(self, planes: list[Tensor], grp: tuple[int, int, int], t0: int, t1: int) -> Tensor:
        """Key-side rows ``t0:t1`` of a group as chunks ``(rows * chunks, c, w)``."""
        p, r0, r1 = grp
        return _to_chunks(planes[p][r0:r1, t0:t1], self.c or (t1 - t0))

    def qchunks(self, planes: list[Tensor], grp: tuple[int, int, int], t0: int, t1: int) -> Tensor:
        """Query-side rows ``t0:t1`` of a group as chunks ``(rows * chunks, gq * c, w)``: a chunk's
        tokens of all query heads of a key/value head together (head-major)."""
        p, r0, r1 = grp
        return self._fold(planes[p][r0:r1, :, t0:t1])

    def _fold(self, x: Tensor) -> Tensor:
        c = self.c or x.shape[2]
        if self.gq == 1:
            return _to_chunks(x[:, 0], c)
        pad = -x.shape[2] % c
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
        x = x.unflatten(2, (-1, c)).transpose(1, 2)  # (rows, chunks, gq, c, w)
        return x.reshape(-1, self.gq * c, x.shape[-1])

    def _unfold(self, val: Tensor, rows: int, length: int) -> Tensor:
        """The inverse of :meth:`_fold`: ``(rows, gq, length, w)``."""
        w = val.shape[-1]
        c = self.c or length
        val = val.view(rows, -1, self.gq, c, w).transpose(1, 2).reshape(rows, self.gq, -1, w)
        return val[:, :, :length]

    def features(self, grp: tuple[int, int, int], t0: int, t1: int, is_query: bool,
                 grad: bool = False) -> tuple[Tensor, Tensor | None]:
        """Chunked features of rows ``t0:t1`` of q (or k); with ``grad`` and a ``phi``, the unchunked
        features and the leaf they were computed from (to pull a gradient back through ``phi``)."""
        p, r0, r1 = grp
        x = self.q[p][r0:r1, :, t0:t1] if is_query else self.k[p][r0:r1, t0:t1]
        chunk = self._fold if is_query else (lambda y: _to_chunks(y, self.c or (t1 - t0)))
        if self.phi is None:
            return chunk(x), None
        if not grad:
            return chunk(self.phi(x, is_query)), None
        leaf = x.detach().requires_grad_()
        with torch.enable_grad():
            f = self.phi(leaf, is_query)
        return f, leaf

    def chunked(self, f: Tensor, leaf: Tensor | None) -> Tensor:
        """The chunked, detached features of a :meth:`features` ``(f, leaf)`` pair."""
        if leaf is None:
            return f
        return self._fold(f.detach()) if f.dim() == 4 else _to_chunks(f.detach(), self.c or f.shape[1])

    def pull(self, f: Tensor, leaf: Tensor | None, df: Tensor, grp: tuple[int, int, int], t0: int, t1: int,
             is_query: bool) -> Tensor:
        """The gradient w.r.t. the raw rows given ``df`` w.r.t. their chunked features (``(rows, gq, T,
        E)`` for queries, ``(rows, T, E)`` for keys)."""
        if is_query:
            df = self._unfold(df, grp[2] - grp[1], t1 - t0)
        else:
            df = df.view(-1, self._padded(t1 - t0), df.shape[-1])[:, : t1 - t0]
        return df if leaf is None else torch.autograd.grad(f, leaf, df)[0]

    def _padded(self, length: int) -> int:
        c = self.c or length
        return -(-length // c) * c

    def put(self, planes: list[Tensor], grp: tuple[int, int, int], t0: int, t1: int, val: Tensor) -> None:
        """Write a key-side tile result (chunked, or ``(rows, L, w)``) into rows ``t0:t1`` of a group."""
        p, r0, r1 = grp
        if val.shape[:2] != (r1 - r0, t1 - t0):
            val = val.view(r1 - r0, self._padded(t1 - t0), val.shape[-1])[:, : t1 - t0]
        planes[p][r0:r1, t0:t1] = val

    def qput(self, planes: list[Tensor], grp: tuple[int, int, int], t0: int, t1: int, val: Tensor) -> None:
        """Write a query-side tile result (chunked, or ``(rows, gq, L, w)``) into rows ``t0:t1``."""
        p, r0, r1 = grp
        if val.dim() == 3:
            val = self._unfold(val, r1 - r0, t1 - t0)
        planes[p][r0:r1, :, t0:t1] = val

    def tril(self, a: Tensor) -> Tensor:
        """Keep the causal lower triangle of chunk scores ``(N, gq * c, c)``, in place."""
        return a.view(a.shape[0], self.gq, -1, a.shape[-1]).tril_().view(a.shape)

    def qscale(self, x: Tensor, s: Tensor, inplace: bool = False) -> Tensor:
        """Query-side chunks ``(N, gq * c, w)`` times a per-token ``(N, c, 1)`` factor."""
        v4 = x.view(x.shape[0], self.gq, -1, x.shape[-1])
        return (v4.mul_(s.unsqueeze(1)) if inplace else v4 * s.unsqueeze(1)).view(x.shape)

    def qsum(self, x: Tensor) -> Tensor:
        """Query-side chunks ``(N, gq * c, w)`` summed over the query heads: ``(N, c, w)``."""
        return x if self.gq == 1 else x.view(x.shape[0], self.gq, -1, x.shape[-1]).sum(1)

    def decay(self, grp: tuple[int, int, int], t0: int, t1: int) -> _Decay | None:
        """The gates of a span in chunk form (None without gates). Padding to whole chunks has gate 1."""
        if self.lg is None:
            return None
        p, r0, r1 = grp
        rows, c, dt = r1 - r0, self.c, self.v[0].dtype
        lg = self.lg[p][r0:r1].to(gate_dtype(self.lg[p].device))
        cum = _to_chunks(lg.expand(rows, t1 - t0, 1) if self.const else lg[:, t0:t1], c).cumsum(1)
        q_in = cum.exp().to(dt)
        k_out = (cum[:, -1:] - cum).exp_().to(dt)
        loglam = cum[:, -1, 0].view(rows, -1)
        if self.const:  # exp((i - j) log lambda): one (c, c) matrix per row, exact
            idx = torch.arange(c, dtype=lg.dtype, device=lg.device)
            w = ((idx[:, None] - idx[None, :]).clamp_min(0) * lg).exp_().to(dt).unsqueeze(1)
        else:
            w = (cum - cum.transpose(1, 2)).clamp_max_(0).to(dt).exp_()
        return _Decay(w, q_in, k_out, loglam)

    def grads(self, dout: list[Tensor], out: list[Tensor], den: list[Tensor] | None,
              dden: list[Tensor] | None, grp: tuple[int, int, int], t0: int, t1: int) -> tuple[Tensor, Tensor | None]:
        """``G = dout / den`` ``(G*chunks, c, Ev)`` and the denominator's gradient ``g = -(dout . out) /
        den (+ dden)`` ``(G*chunks, c, 1)`` (None if not normalised); zero where ``den == 0`` (the
        output there is the numerator)."""
        g_out = self.qchunks(dout, grp, t0, t1)
        if den is None:
            return g_out, None
        d = self.qchunks(den, grp, t0, t1)
        zero = d == 0
        d = torch.where(zero, torch.ones_like(d), d)
        g_den = -(g_out * self.qchunks(out, grp, t0, t1)).sum(-1, keepdim=True) / d
        g_den.masked_fill_(zero, 0)
        if dden is not None:
            g_den += self.qchunks(dden, grp, t0, t1)
        return g_out / d, g_den


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(-1, keepdim=True)


def _causal_forward(t: _Tiles, out: list[Tensor], den: list[Tensor] | None, s0: list[Tensor] | None,
                    z0: list[Tensor] | None, s_n: list[Tensor], z_n: list[Tensor] | None) -> None:
    c, d, ev = t.c, t.d, t.ev
    normalize = den is not None
    for grp in t.groups:
        rows = grp[2] - grp[1]
        new = t.v[0].new_zeros
        state = new(rows, d, ev) if s0 is None else t.rows(s0, grp)
        zsum = None if not normalize else new(rows, d) if z0 is None else t.rows(z0, grp)
        for t0, t1 in t.k_spans:
            fq, fk = t.features(grp, t0, t1, True)[0], t.features(grp, t0, t1, False)[0]
            val = t.chunks(t.v, grp, t0, t1)
            dec = t.decay(grp, t0, t1)
            loglam = None if dec is None else dec.loglam
            a = torch.bmm(fq, fk.transpose(1, 2))
            a = t.tril(a) if dec is None else dec.weigh(a, t.gq)
            num = torch.bmm(a, val)
            kd = fk if dec is None else fk * dec.k_out
            qi = fq if dec is None else t.qscale(fq, dec.q_in)
            kv = torch.bmm(kd.transpose(1, 2), val).view(rows, -1, d, ev)
            pre = _exclusive_prefix(kv, state, loglam)
            num.baddbmm_(qi, pre.view(-1, d, ev))
            state = _carry(pre, kv, loglam)
            if normalize:
                kz = kd.view(rows, -1, c, d).sum(2)  # (rows, chunks, d)
                pre = _exclusive_prefix(kz, zsum, loglam)
                dn = a.sum(-1).unsqueeze(-1).baddbmm_(qi, pre.view(-1, d, 1))
                zsum = _carry(pre, kz, loglam)
                _divide(num, dn)
                t.qput(den, grp, t0, t1, dn)
            t.qput(out, grp, t0, t1, num)
        t.rows(s_n, grp).copy_(state)
        if normalize:
            t.rows(z_n, grp).copy_(zsum)


def _causal_backward(t: _Tiles, dq: list[Tensor], dk: list[Tensor], dv: list[Tensor], ds0: list[Tensor],
                     dz0: list[Tensor] | None, dcum: list[Tensor] | None, s0: list[Tensor] | None,
                     z0: list[Tensor] | None, out: list[Tensor], den: list[Tensor] | None,
                     dout: list[Tensor], dden: list[Tensor] | None, dsn: list[Tensor] | None,
                     dzn: list[Tensor] | None) -> None:
    """Fills ``dq``, ``dk``, ``dv``, ``ds0``, ``dz0`` and (with gates) ``dcum``, the gradient w.r.t. the
    cumulative log-gate without the final-state term (added by the caller)."""
    c, d, ev = t.c, t.d, t.ev
    normalize = den is not None
    dcum_k = None if dcum is None else [torch.empty_like(x) for x in dcum]

    def d_scores(g: Tensor, g_den: Tensor | None, val: Tensor, dec: _Decay | None) -> Tensor:
        """``dA_ts = (G_t . v_s + g_t)`` (times the gate weights) for ``s <= t``, zero above."""
        da = torch.bmm(g, val.transpose(1, 2))
        if g_den is not None:
            da += g_den
        return t.tril(da) if dec is None else dec.weigh(da, t.gq)

    def tile(grp: tuple[int, int, int], t0: int, t1: int, grad_of_keys: bool) -> tuple:
        """``(fq, q_leaf, fk, k_leaf, v, G, g, gates)`` of a tile; the features of the side whose gradient
        is pulled back come unchunked with their leaf (see :meth:`_Tiles.features`)."""
        fq = t.features(grp, t0, t1, True, grad=not grad_of_keys)
        fk = t.features(grp, t0, t1, False, grad=grad_of_keys)
        return (*fq, *fk, t.chunks(t.v, grp, t0, t1), *t.grads(dout, out, den, dden, grp, t0, t1),
                t.decay(grp, t0, t1))

    for grp in t.groups:
        rows = grp[2] - grp[1]
        new = t.v[0].new_zeros
        # backwards over the spans: dk', dv, dS_0 (intra-chunk parts and the later chunks' suffix states)
        rstate = new(rows, d, ev) if dsn is None else t.rows(dsn, grp)
        rsum = None if not normalize else new(rows, d) if dzn is None else t.rows(dzn, grp)
        for t0, t1 in reversed(t.k_spans):
            fq, _, fk_, leaf, val, g, g_den, dec = tile(grp, t0, t1, grad_of_keys=True)
            fk = t.chunked(fk_, leaf)
            loglam = None if dec is None else dec.loglam
            qi = fq if dec is None else t.qscale(fq, dec.q_in)
            qg = torch.bmm(qi.transpose(1, 2), g).view(rows, -1, d, ev)
            later = _exclusive_prefix(qg, rstate, loglam, reverse=True)
            rstate = _carry(later, qg, loglam, reverse=True)
            later = later.view(-1, d, ev)
            dfk = torch.bmm(d_scores(g, g_den, val, dec).transpose(1, 2), fq)
            # the later chunks' part of dk' (scaled by k_out with gates)
            tail = dfk.baddbmm_(val, later.transpose(1, 2)) if dec is None else torch.bmm(val, later.transpose(1, 2))
            if g_den is not None:
                qz = torch.bmm(g_den.transpose(1, 2), qi).view(rows, -1, d)
                later_z = _exclusive_prefix(qz, rsum, loglam, reverse=True)
                rsum = _carry(later_z, qz, loglam, reverse=True)
                tail += later_z.view(-1, 1, d)
            if dec is not None:
                dfk += tail.mul_(dec.k_out)
            a = torch.bmm(fq, fk.transpose(1, 2))
            a = t.tril(a) if dec is None else dec.weigh(a, t.gq)
            kd = fk if dec is None else fk * dec.k_out
            t.put(dv, grp, t0, t1, torch.bmm(a.transpose(1, 2), g).baddbmm_(kd, later))
            t.put(dk, grp, t0, t1, t.pull(fk_, leaf, dfk, grp, t0, t1, False))
            if dcum_k is not None:
                t.put(dcum_k, grp, t0, t1, _rowdot(fk, dfk))
        t.rows(ds0, grp).copy_(rstate)
        if normalize:
            t.rows(dz0, grp).copy_(rsum)
        # forwards over the spans: dq' (prefix states)
        state = new(rows, d, ev) if s0 is None else t.rows(s0, grp)
        zsum = None if not normalize else new(rows, d) if z0 is None else t.rows(z0, grp)
        for t0, t1 in t.k_spans:
            fq_, leaf, fk, _, val, g, g_den, dec = tile(grp, t0, t1, grad_of_keys=False)
            loglam = None if dec is None else dec.loglam
            kd = fk if dec is None else fk * dec.k_out
            kv = torch.bmm(kd.transpose(1, 2), val).view(rows, -1, d, ev)
            pre = _exclusive_prefix(kv, state, loglam)
            state = _carry(pre, kv, loglam)
            dfq = torch.bmm(d_scores(g, g_den, val, dec), fk)
            # the earlier chunks' part of dq' (scaled by q_in with gates)
            prev = pre.view(-1, d, ev).transpose(1, 2)
            head = dfq.baddbmm_(g, prev) if dec is None else torch.bmm(g, prev)
            if g_den is not None:
                kz = kd.view(rows, -1, c, d).sum(2)
                pre = _exclusive_prefix(kz, zsum, loglam)
                zsum = _carry(pre, kz, loglam)
                head.addcmul_(g_den, pre.view(-1, 1, d))
            if dec is not None:
                dfq += t.qscale(head, dec.q_in, inplace=True)
            t.qput(dq, grp, t0, t1, t.pull(fq_, leaf, dfq, grp, t0, t1, True))
            if dcum is not None:
                t.put(dcum, grp, t0, t1, t.qsum(_rowdot(t.chunked(fq_, leaf), dfq)))
    if dcum is not None:
        for x, y in zip(dcum, dcum_k):
            x -= y


def _noncausal_forward(t: _Tiles, out: list[Tensor], den: list[Tensor] | None, s0: list[Tensor] | None,
                       z0: list[Tensor] | None, s_n: list[Tensor], z_n: list[Tensor] | None) -> None:
    normalize = den is not None
    for grp in t.groups:
        kv = t.rows(s_n, grp)
        kv.zero_() if s0 is None else kv.copy_(t.rows(s0, grp))
        z = None
        if normalize:
            z = t.rows(z_n, grp).unsqueeze(-1)
            z.zero_() if z0 is None else z.copy_(t.rows(z0, grp).unsqueeze(-1))
        for t0, t1 in t.k_spans:
            fk = t.features(grp, t0, t1, False)[0]
            kv.baddbmm_(fk.transpose(1, 2), t.chunks(t.v, grp, t0, t1))
            if normalize:
                z += fk.sum(1).unsqueeze(-1)
        for t0, t1 in t.q_spans:
            fq = t.features(grp, t0, t1, True)[0]
            num = torch.bmm(fq, kv)
            if normalize:
                dn = torch.bmm(fq, z)
                _divide(num, dn)
                t.qput(den, grp, t0, t1, dn)
            t.qput(out, grp, t0, t1, num)


def _noncausal_backward(t: _Tiles, dq: list[Tensor], dk: list[Tensor], dv: list[Tensor], ds0: list[Tensor],
                        dz0: list[Tensor] | None, s_n: list[Tensor], z_n: list[Tensor] | None,
                        out: list[Tensor], den: list[Tensor] | None, dout: list[Tensor],
                        dden: list[Tensor] | None, dsn: list[Tensor] | None, dzn: list[Tensor] | None) -> None:
    normalize = den is not None
    for grp in t.groups:
        kv = t.rows(s_n, grp)
        dkv = t.rows(ds0, grp)
        dkv.zero_() if dsn is None else dkv.copy_(t.rows(dsn, grp))
        z = dz = None
        if normalize:
            z = t.rows(z_n, grp).unsqueeze(-1)
            dz = t.rows(dz0, grp).unsqueeze(-1)
            dz.zero_() if dzn is None else dz.copy_(t.rows(dzn, grp).unsqueeze(-1))
        for t0, t1 in t.q_spans:
            f, leaf = t.features(grp, t0, t1, True, grad=True)
            fq = t.chunked(f, leaf)
            g, g_den = t.grads(dout, out, den, dden, grp, t0, t1)
            dfq = torch.bmm(g, kv.transpose(1, 2))
            dkv.baddbmm_(fq.transpose(1, 2), g)
            if g_den is not None:
                dfq.baddbmm_(g_den, z.transpose(1, 2))
                dz.baddbmm_(fq.transpose(1, 2), g_den)
            t.qput(dq, grp, t0, t1, t.pull(f, leaf, dfq, grp, t0, t1, True))
        for t0, t1 in t.k_spans:
            f, leaf = t.features(grp, t0, t1, False, grad=True)
            fk = t.chunked(f, leaf)
            dfk = torch.bmm(t.chunks(t.v, grp, t0, t1), dkv.transpose(1, 2))
            if normalize:
                dfk += dz.transpose(1, 2)
            t.put(dv, grp, t0, t1, torch.bmm(fk, dkv))
            t.put(dk, grp, t0, t1, t.pull(f, leaf, dfk, grp, t0, t1, False))


def _forward(q: Tensor, k: Tensor, v: Tensor, log_g: Tensor | None, s0: Tensor | None, z0: Tensor | None,
             phi: FeatureMap | None, causal: bool, normalize: bool, chunk: int) -> tuple[Tensor, ...]:
    t = _Tiles(q, k, v, phi, chunk if causal else None, log_g if causal else None)
    b, h, lq = q.shape[:3]
    hkv = k.shape[1]
    out = v.new_empty(b, h, lq, t.ev)
    den = v.new_empty(b, h, lq, 1) if normalize else v.new_empty(0)
    s_n = v.new_empty(b, hkv, t.d, t.ev)
    z_n = v.new_empty(b, hkv, t.d) if normalize else v.new_empty(0)
    inp = (None if s0 is None else t.planes(s0), None if z0 is None or not normalize else t.planes(z0))
    dens = (t.qplanes(den), t.planes(z_n)) if normalize else (None, None)
    (_causal_forward if causal else _noncausal_forward)(t, t.qplanes(out), dens[0], *inp, t.planes(s_n), dens[1])
    return out, den, s_n, z_n


def _backward(q: Tensor, k: Tensor, v: Tensor, log_g: Tensor | None, s0: Tensor | None, z0: Tensor | None,
              out: Tensor, den: Tensor, s_n: Tensor, z_n: Tensor, dout: Tensor | None, dden: Tensor | None,
              dsn: Tensor | None, dzn: Tensor | None, phi: FeatureMap | None, causal: bool, normalize: bool,
              chunk: int) -> tuple[Tensor, ...]:
    """``(dq, dk, dv, dlog_g, ds0, dz0)``; empty tensors stand for inputs that were None."""
    t = _Tiles(q, k, v, phi, chunk if causal else None, log_g if causal else None)
    if dout is None:
        dout = torch.zeros_like(out)
    if not normalize:
        dden = dzn = None
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    ds0 = torch.empty_like(s_n)
    dz0 = torch.empty_like(z_n)
    P, Q = t.planes, t.qplanes  # per-row (key/value head) and query-side tensors
    opt = (lambda x, f=P: None if x is None else f(x)) if normalize else (lambda x, f=P: None)
    grads = Q(dq), P(dk), P(dv), P(ds0), opt(dz0)
    tail = opt(den, Q), Q(dout), opt(dden, Q), None if dsn is None else P(dsn), opt(dzn)
    if not causal:
        _noncausal_backward(t, *grads, P(s_n), opt(z_n), Q(out), *tail)
        return dq, dk, dv, v.new_empty(0), ds0, dz0
    dcum = None if log_g is None else v.new_empty(*k.shape[:3], 1)
    inp = (None if s0 is None else P(s0), None if z0 is None else opt(z0))
    _causal_backward(t, *grads, None if dcum is None else P(dcum), *inp, Q(out), *tail)
    if dcum is None:
        return dq, dk, dv, v.new_empty(0), ds0, dz0
    return dq, dk, dv, log_gate_grad(dcum.squeeze(-1), log_g, s_n, z_n, dsn, dzn), ds0, dz0


def log_gate_grad(dcum: Tensor, log_g: Tensor, s_n: Tensor, z_n: Tensor | None, dsn: Tensor | None,
                  dzn: Tensor | None) -> Tensor:
    """The log-gates' gradient from ``dA_t = q'_t . dq'_t - k'_t . dk'_t`` ``(B, Hkv, L)`` (modified in
    place): the final state's term at the last token, then ``d a_r = sum_{t >= r} dA_t`` per token, or
    ``sum_t t dA_t`` for one constant gate per row (``log_g`` ``(B, Hkv, 1)``)."""
    last = 0
    if dsn is not None:
        last = (s_n * dsn).sum((-1, -2))
    if dzn is not None and z_n is not None:
        last = last + (z_n * dzn).sum(-1)
    dcum[..., -1] += last
    if log_g.shape[-1] == 1 and dcum.shape[-1] != 1:  # d log(lambda) = sum_t t dA_t (t from 1)
        pos = torch.arange(1, dcum.shape[-1] + 1, dtype=dcum.dtype, device=dcum.device)
        dlog_g = (dcum * pos).sum(-1, keepdim=True)
    else:  # d a_r = sum_{t >= r} dA_t
        dlog_g = dcum.flip(-1).cumsum(-1).flip(-1)
    return dlog_g.to(log_g.dtype)


_FWD = ("(Tensor q, Tensor k, Tensor v, Tensor? log_g, Tensor? s0, Tensor? z0, bool causal, bool normalize, "
        "int chunk) -> (Tensor, Tensor, Tensor, Tensor)")
_BWD = ("(Tensor q, Tensor k, Tensor v, Tensor? log_g, Tensor? s0, Tensor? z0, Tensor out, Tensor den, "
        "Tensor s_n, Tensor z_n, Tensor? dout, Tensor? dden, Tensor? dsn, Tensor? dzn, bool causal, "
        "bool normalize, int chunk) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")


@torch.library.custom_op("fastattn::linear_attention", mutates_args=(), schema=_FWD)
def _linear_op(q, k, v, log_g, s0, z0, causal, normalize, chunk):
    return _forward(q, k, v, log_g, s0, z0, None, causal, normalize, chunk)


@_linear_op.register_fake
def fake_forward(q, k, v, log_g, s0, z0, causal, normalize, chunk=0):
    """The output shapes of the forward op (shared with the compiled backend's op)."""
    b, h, lq, d = q.shape
    hkv, ev = k.shape[1], v.shape[-1]
    return (v.new_empty(b, h, lq, ev), v.new_empty(b, h, lq, 1) if normalize else v.new_empty(0),
            v.new_empty(b, hkv, d, ev), v.new_empty(b, hkv, d) if normalize else v.new_empty(0))


@torch.library.custom_op("fastattn::linear_attention_backward", mutates_args=(), schema=_BWD)
def _linear_op_backward(q, k, v, log_g, s0, z0, out, den, s_n, z_n, dout, dden, dsn, dzn, causal, normalize,
                        chunk):
    return _backward(q, k, v, log_g, s0, z0, out, den, s_n, z_n, dout, dden, dsn, dzn, None, causal,
                     normalize, chunk)


@_linear_op_backward.register_fake
def fake_backward(q, k, v, log_g, s0, z0, out, den, s_n, z_n, dout, dden, dsn, dzn, causal, normalize, chunk=0):
    """The output shapes of the backward op (shared with the compiled backend's op)."""
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            v.new_empty(0) if log_g is None or not causal else log_g.new_empty(log_g.shape),
            torch.empty_like(s_n), torch.empty_like(z_n))


def _to_input_grads(grads: tuple[Tensor, ...], has: tuple[bool, bool, bool]) -> tuple[Tensor | None, ...]:
    dq, dk, dv, dlog_g, ds0, dz0 = grads
    return dq, dk, dv, *(g if h else None for g, h in zip((dlog_g, ds0, dz0), has))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, log_g, s0, z0, causal, normalize, chunk = inputs
    ctx.save_for_backward(q, k, v, log_g, s0, z0, *output)
    ctx.args = (causal, normalize, chunk)
    ctx.has = (log_g is not None and causal, s0 is not None, z0 is not None and normalize)


def _op_backward(ctx, dout, dden, dsn, dzn):
    grads = torch.ops.fastattn.linear_attention_backward(*ctx.saved_tensors, dout, dden, dsn, dzn, *ctx.args)
    return *_to_input_grads(grads, ctx.has), None, None, None


_linear_op.register_autograd(_op_backward, setup_context=_setup_context)


class _FusedPhi(torch.autograd.Function):
    """The eager path with a token-wise feature map applied tile by tile (``phi`` is a Python callable,
    which a custom op cannot take)."""

    @staticmethod
    def forward(ctx, q, k, v, log_g, s0, z0, phi, causal, normalize, chunk):
        ctx.set_materialize_grads(False)
        output = _forward(q, k, v, log_g, s0, z0, phi, causal, normalize, chunk)
        _setup_context(ctx, (q, k, v, log_g, s0, z0, causal, normalize, chunk), output)
        ctx.phi = phi
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dden, dsn, dzn):
        grads = _backward(*ctx.saved_tensors, dout, dden, dsn, dzn, ctx.phi, *ctx.args)
        return *_to_input_grads(grads, ctx.has), None, None, None, None


def _one_token(q: Tensor, k: Tensor, v: Tensor, log_g: Tensor | None, s0: Tensor | None, z0: Tensor | None,
               normalize: bool) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    """The causal recurrence for one token, in plain differentiable ops: ``S = g S_0 + k' v^T``, ``z = g
    z_0 + k'``, ``num = q' S``, ``den = q' . z`` (grouped-query heads read their key/value head's state)."""
    b, hkv, _, d = k.shape
    gq = q.shape[1] // hkv
    lam = None if log_g is None else log_g.exp().to(v.dtype).view(b, hkv, 1, 1)
    s_n = torch.matmul(k.transpose(-1, -2), v)
    if s0 is not None:
        s_n = s_n + (s0 if lam is None else s0 * lam)
    qg = q.reshape(b, hkv, gq, d)
    out = torch.matmul(qg, s_n).view(b, hkv * gq, 1, -1)
    if not normalize:
        return out, None, s_n, None
    z_n = k[:, :, 0]
    if z0 is not None:
        z_n = z_n + (z0 if lam is None else z0 * lam[..., 0])
    den = torch.matmul(qg, z_n.unsqueeze(-1)).view(b, hkv * gq, 1, 1)
    return out / torch.where(den == 0, torch.ones_like(den), den), den, s_n, z_n


def tiled_linear_attention(
    q: Tensor, k: Tensor, v: Tensor, *, phi: FeatureMap | None = None, log_g: Tensor | None = None,
    s0: Tensor | None = None, z0: Tensor | None = None, causal: bool = True, normalize: bool = True,
    chunk: int = 64,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    """Linear attention, tiled, with the hand-written backward: ``(out, den, S_n, z_n)``.

    Args:
        q, k: ``(B, H, L, E)``, ``(B, Hkv, L, E)`` (``H`` a multiple of ``Hkv``: grouped-query heads, one
            state per key/value head) features, or with ``phi`` the raw inputs of a token-wise feature map
            ``phi(x, is_query)`` applied tile by tile (and recomputed in backward) so the full feature
            tensors never exist. ``phi`` must map each token on its own, the same way in every head,
            and hold no trainable parameters (their gradients would be lost). Causal: equal lengths.
        v: values ``(B, Hkv, Lk, Ev)``.
        log_g: causal only; log-gates ``<= 0`` per token ``(B, Hkv, Lk)``, or ``(B, Hkv, 1)`` one per
            row (a per-head decay); finite (the caller floors them).
        s0, z0: initial state ``(B, Hkv, D, Ev)`` and normaliser ``(B, Hkv, D)`` (``z0`` only when
            normalised); None is zero.
        normalize: divide by the denominator; ``den`` and ``z_n`` are None otherwise.

    Rows with ``den == 0`` return the numerator (zero for positive features). Every tensor output is
    differentiable, and gradients reach ``q``, ``k``, ``v``, ``log_g``, ``s0``, ``z0``.
    """
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"the causal kernel needs equal query and key lengths, got {q.shape[2]} and {k.shape[2]}")
    if not causal and log_g is not None:
        raise ValueError("gates (decay) need the causal form")
    if causal and q.shape[2] == 1:  # one token (a decoding step): a handful of ops, no tiling
        if phi is not None:
            q, k = phi(q, True), phi(k, False)
        return _one_token(q, k, v, log_g, s0, z0, normalize)
    if phi is None or torch.compiler.is_compiling():
        if phi is not None:
            q, k = phi(q, True), phi(k, False)
        out, den, s_n, z_n = _linear_op(q, k, v, log_g, s0, z0, causal, normalize, chunk)
    else:
        out, den, s_n, z_n = _FusedPhi.apply(q, k, v, log_g, s0, z0, phi, causal, normalize, chunk)
    return out, (den if normalize else None), s_n, (z_n if normalize else None)
