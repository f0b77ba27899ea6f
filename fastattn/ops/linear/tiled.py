"""The tiled linear-attention kernels: forwards and hand-written backwards, causal and not.

Over features ``q' = phi(q)``, ``k' = phi(k)`` and values ``v``::

    num_t = sum_s (q'_t . k'_s) v_s        den_t = sum_s q'_t . k'_s        out_t = num_t / den_t

with ``s <= t`` in the causal form. Work is cut into *tiles*: a group of (batch, head) rows times a
span of tokens, sized so that each temporary is about 1 MiB. Tiles are processed one after another;
the causal form carries its ``D x Ev`` running state from one token span to the next, and inside a
span it works in *chunks* of ``c`` tokens (the exact masked quadratic form inside a chunk, the state
across chunks, as in :mod:`fastattn.ops.linear.engine`). Nothing n-sized is allocated except the output
and the gradients: on CPU a fresh large tensor costs page faults that exceed the arithmetic of these
kernels, and cache-sized temporaries are reused by the allocator.

With a token-wise feature map ``phi`` the features are computed tile by tile and recomputed in
backward, so the (often wider than the input) feature tensors are never stored; without it ``q``, ``k``
are the features.

The backward is written by hand. With ``G = dout / den`` and ``g_t = -(dout_t . out_t) / den_t`` (the
denominator's gradient), the gradients are again linear attentions (``dA_ts = G_t . v_s + g_t`` over the
visible pairs)::

    dq'_t = sum_s dA_ts k'_s          dk'_s = sum_t dA_ts q'_t          dv_s = sum_t (q'_t . k'_s) G_t

Causal: a sweep backwards over the spans gives ``dk'``, ``dv`` (suffix states ``sum q'_t G_t^T``), a
sweep forwards gives ``dq'`` (prefix states). Non-causal: ``dq'_t = G_t KV^T + g_t z^T`` while summing
``dKV``, ``dz``; then ``dk'_s = dKV v_s + dz``, ``dv_s = dKV^T k'_s``. Saved for backward: the inputs,
the output and the denominator.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["FeatureMap", "causal_linear_attention", "noncausal_linear_attention", "tile_length"]

_TILE_FLOATS = 1 << 18  # CPU: about 1 MiB of float32 per tile-sized temporary (stays in cache)
_TILE_FLOATS_ACCEL = 1 << 24  # GPU: 64 MiB; small tiles would be kernel-launch bound there

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


def _exclusive_prefix(per_chunk: Tensor, carry: Tensor, reverse: bool = False) -> Tensor:
    """``carry + sum of the earlier chunks`` (``reverse``: of the later chunks) for each chunk;
    ``per_chunk`` ``(G, m, ...)``, ``carry`` ``(G, ...)``. One batched matmul with a strictly triangular
    ones matrix: torch's ``cumsum`` along a non-last axis is a strided scalar loop, several times slower."""
    g, m = per_chunk.shape[:2]
    ones = torch.ones(m, m, dtype=per_chunk.dtype, device=per_chunk.device)
    tri = ones.triu(1) if reverse else ones.tril(-1)
    out = torch.baddbmm(carry.reshape(g, 1, -1), tri.expand(g, m, m), per_chunk.reshape(g, m, -1))
    return out.view(per_chunk.shape)


def _divide(num: Tensor, den: Tensor) -> Tensor:
    """``num /= den`` in place, by 1 where ``den == 0``."""
    return num.div_(torch.where(den == 0, torch.ones_like(den), den))


class _Tiles:
    """The tiling of one call and everything done per tile: slicing, feature maps (and pulling
    gradients back through them), the chunk layout, writing results.

    ``(B, H, L, w)`` tensors are handled as *planes* ``(rows, L, w)``: one plane of ``B * H`` rows when
    the batch and head axes merge without a copy, else one plane per batch element (e.g. the
    ``(B, L, H, E)``-transposed layout of a projection). A *group* is ``(plane, r0, r1)``; the token
    *spans* are shared by all groups. ``chunk=None`` (the non-causal form) makes a span one chunk."""

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, phi: FeatureMap | None, chunk: int | None) -> None:
        self.phi = phi
        self.b, self.h = q.shape[:2]
        self.flat = self.b == 1 or all(x.stride(0) == self.h * x.stride(1) for x in (q, k, v))
        self.c = None if chunk is None else max(1, min(chunk, k.shape[2]))
        self.d = q.shape[-1] if phi is None else phi(q[:1, :1, :1], True).shape[-1]
        self.ev = v.shape[-1]
        width = max(self.d, self.ev, self.c or 1)
        rows = self.b * self.h if self.flat else self.h
        n = max(q.shape[2], k.shape[2])
        budget = _budget(q.device)
        per_group = max(1, budget // (n * width))  # rows whose whole sequence fits a tile
        if per_group > 1 or n * width <= budget:
            size, span = min(rows, per_group), n
        else:
            size, span = 1, tile_length(1, self.c or 1, width, budget)
        self.groups = [(p, r0, min(rows, r0 + size)) for p in range(1 if self.flat else self.b)
                       for r0 in range(0, rows, size)]
        self.q_spans = [(t0, min(q.shape[2], t0 + span)) for t0 in range(0, q.shape[2], span)]
        self.k_spans = [(t0, min(k.shape[2], t0 + span)) for t0 in range(0, k.shape[2], span)]
        self.q, self.k, self.v = self.planes(q), self.planes(k), self.planes(v)

    def planes(self, x: Tensor) -> list[Tensor]:
        return [x.reshape(-1, *x.shape[2:])] if self.flat else list(x.unbind(0))

    def chunks(self, planes: list[Tensor], grp: tuple[int, int, int], t0: int, t1: int) -> Tensor:
        p, r0, r1 = grp
        return _to_chunks(planes[p][r0:r1, t0:t1], self.c or (t1 - t0))

    def features(self, grp: tuple[int, int, int], t0: int, t1: int, is_query: bool,
                 grad: bool = False) -> tuple[Tensor, Tensor | None]:
        """Chunked features of rows ``t0:t1`` of q (or k); with ``grad`` and a ``phi``, the unchunked
        features and the leaf they were computed from (to pull a gradient back through ``phi``)."""
        p, r0, r1 = grp
        x = (self.q if is_query else self.k)[p][r0:r1, t0:t1]
        c = self.c or (t1 - t0)
        if self.phi is None:
            return _to_chunks(x, c), None
        if not grad:
            return _to_chunks(self.phi(x, is_query), c), None
        leaf = x.detach().requires_grad_()
        with torch.enable_grad():
            f = self.phi(leaf, is_query)
        return f, leaf

    def chunked(self, f: Tensor, leaf: Tensor | None) -> Tensor:
        """The chunked, detached features of a :meth:`features` ``(f, leaf)`` pair."""
        return f if leaf is None else _to_chunks(f.detach(), self.c or f.shape[1])

    def pull(self, f: Tensor, leaf: Tensor | None, df: Tensor, t0: int, t1: int) -> Tensor:
        """The gradient w.r.t. the raw rows given ``df`` w.r.t. their chunked features."""
        df = df.view(-1, self._padded(t1 - t0), df.shape[-1])[:, : t1 - t0]
        return df if leaf is None else torch.autograd.grad(f, leaf, df)[0]

    def _padded(self, length: int) -> int:
        c = self.c or length
        return -(-length // c) * c

    def put(self, planes: list[Tensor], grp: tuple[int, int, int], t0: int, t1: int, val: Tensor) -> None:
        """Write a tile result (chunked, or ``(G, L, w)``) into rows ``t0:t1`` of a group."""
        p, r0, r1 = grp
        if val.shape[:2] != (r1 - r0, t1 - t0):
            val = val.view(r1 - r0, self._padded(t1 - t0), val.shape[-1])[:, : t1 - t0]
        planes[p][r0:r1, t0:t1] = val

    def grads(self, dout: list[Tensor], out: list[Tensor], den: list[Tensor] | None,
              grp: tuple[int, int, int], t0: int, t1: int) -> tuple[Tensor, Tensor | None]:
        """``G = dout / den`` ``(G*chunks, c, Ev)`` and the denominator's gradient ``g = -(dout . out) /
        den`` ``(G*chunks, c, 1)`` (None if not normalised); both zero where ``den == 0`` (the output
        there is the numerator)."""
        g_out = self.chunks(dout, grp, t0, t1)
        if den is None:
            return g_out, None
        d = self.chunks(den, grp, t0, t1)
        zero = d == 0
        d = torch.where(zero, torch.ones_like(d), d)
        g_den = -(g_out * self.chunks(out, grp, t0, t1)).sum(-1, keepdim=True) / d
        return g_out / d, g_den.masked_fill_(zero, 0)


def _outputs(t: _Tiles, q: Tensor, v: Tensor, normalize: bool) -> tuple[Tensor, Tensor | None]:
    out = v.new_empty(t.b, t.h, q.shape[2], t.ev)
    return out, (v.new_empty(t.b, t.h, q.shape[2], 1) if normalize else None)


class _CausalLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, phi: FeatureMap | None, normalize: bool,  # noqa: D102
                chunk: int) -> Tensor:
        t = _Tiles(q, k, v, phi, chunk)
        c, d, ev = t.c, t.d, t.ev
        out, den_all = _outputs(t, q, v, normalize)
        outs, dens = t.planes(out), (t.planes(den_all) if normalize else None)
        for grp in t.groups:
            rows = grp[2] - grp[1]
            state, zsum = v.new_zeros(rows, d, ev), v.new_zeros(rows, d)
            for t0, t1 in t.k_spans:
                fq, fk = t.features(grp, t0, t1, True)[0], t.features(grp, t0, t1, False)[0]
                val = t.chunks(t.v, grp, t0, t1)
                a = torch.bmm(fq, fk.transpose(1, 2)).tril_()
                num = torch.bmm(a, val)
                kv = torch.bmm(fk.transpose(1, 2), val).view(rows, -1, d, ev)
                pre = _exclusive_prefix(kv, state)
                num.baddbmm_(fq, pre.view(-1, d, ev))
                state = pre[:, -1] + kv[:, -1]
                if normalize:
                    kz = fk.view(rows, -1, c, d).sum(2)  # (rows, chunks, d)
                    pre = _exclusive_prefix(kz, zsum)
                    den = a.sum(-1).unsqueeze(-1).baddbmm_(fq, pre.view(-1, d, 1))
                    zsum = pre[:, -1] + kz[:, -1]
                    _divide(num, den)
                    t.put(dens, grp, t0, t1, den)
                t.put(outs, grp, t0, t1, num)
        ctx.phi, ctx.chunk = phi, chunk
        ctx.save_for_backward(q, k, v, out, den_all)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout: Tensor):  # noqa: D102
        q, k, v, out, den_all = ctx.saved_tensors
        t = _Tiles(q, k, v, ctx.phi, ctx.chunk)
        c, d, ev = t.c, t.d, t.ev
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dqs, dks, dvs = t.planes(dq), t.planes(dk), t.planes(dv)
        douts, outs = t.planes(dout), t.planes(out)
        dens = None if den_all is None else t.planes(den_all)

        def d_scores(g: Tensor, g_den: Tensor | None, val: Tensor) -> Tensor:
            """``dA_ts = G_t . v_s + g_t`` for ``s <= t``, zero above the diagonal."""
            da = torch.bmm(g, val.transpose(1, 2))
            if g_den is not None:
                da += g_den
            return da.tril_()

        for grp in t.groups:
            rows = grp[2] - grp[1]
            # backwards over the spans: dk' and dv (intra-chunk parts and the later chunks' suffix states)
            rstate, rsum = v.new_zeros(rows, d, ev), v.new_zeros(rows, d)
            for t0, t1 in reversed(t.k_spans):
                fq = t.features(grp, t0, t1, True)[0]
                fk_, leaf = t.features(grp, t0, t1, False, grad=True)
                fk = t.chunked(fk_, leaf)
                val = t.chunks(t.v, grp, t0, t1)
                g, g_den = t.grads(douts, outs, dens, grp, t0, t1)
                qg = torch.bmm(fq.transpose(1, 2), g).view(rows, -1, d, ev)
                later = _exclusive_prefix(qg, rstate, reverse=True)
                rstate = later[:, 0] + qg[:, 0]
                later = later.view(-1, d, ev)
                dfk = torch.bmm(d_scores(g, g_den, val).transpose(1, 2), fq).baddbmm_(val, later.transpose(1, 2))
                if g_den is not None:
                    qz = torch.bmm(g_den.transpose(1, 2), fq).view(rows, -1, d)
                    later_z = _exclusive_prefix(qz, rsum, reverse=True)
                    dfk += later_z.view(-1, 1, d)
                    rsum = later_z[:, 0] + qz[:, 0]
                a = torch.bmm(fq, fk.transpose(1, 2)).tril_()
                t.put(dvs, grp, t0, t1, torch.bmm(a.transpose(1, 2), g).baddbmm_(fk, later))
                t.put(dks, grp, t0, t1, t.pull(fk_, leaf, dfk, t0, t1))
            # forwards over the spans: dq' (prefix states)
            state, zsum = v.new_zeros(rows, d, ev), v.new_zeros(rows, d)
            for t0, t1 in t.k_spans:
                fq_, leaf = t.features(grp, t0, t1, True, grad=True)
                fk = t.features(grp, t0, t1, False)[0]
                val = t.chunks(t.v, grp, t0, t1)
                g, g_den = t.grads(douts, outs, dens, grp, t0, t1)
                kv = torch.bmm(fk.transpose(1, 2), val).view(rows, -1, d, ev)
                pre = _exclusive_prefix(kv, state)
                dfq = torch.bmm(d_scores(g, g_den, val), fk).baddbmm_(g, pre.view(-1, d, ev).transpose(1, 2))
                state = pre[:, -1] + kv[:, -1]
                if g_den is not None:
                    kz = fk.view(rows, -1, c, d).sum(2)
                    pre = _exclusive_prefix(kz, zsum)
                    dfq.addcmul_(g_den, pre.view(-1, 1, d))
                    zsum = pre[:, -1] + kz[:, -1]
                t.put(dqs, grp, t0, t1, t.pull(fq_, leaf, dfq, t0, t1))
        return dq, dk, dv, None, None, None


class _NonCausalLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, phi: FeatureMap | None, normalize: bool) -> Tensor:  # noqa: D102
        t = _Tiles(q, k, v, phi, None)
        out, den_all = _outputs(t, q, v, normalize)
        outs, dens = t.planes(out), (t.planes(den_all) if normalize else None)
        kvs, zs = [], []
        for grp in t.groups:
            rows = grp[2] - grp[1]
            kv, z = v.new_zeros(rows, t.d, t.ev), v.new_zeros(rows, t.d, 1)
            for t0, t1 in t.k_spans:
                fk = t.features(grp, t0, t1, False)[0]
                kv.baddbmm_(fk.transpose(1, 2), t.chunks(t.v, grp, t0, t1))
                z += fk.sum(1).unsqueeze(-1)
            for t0, t1 in t.q_spans:
                fq = t.features(grp, t0, t1, True)[0]
                num = torch.bmm(fq, kv)
                if normalize:
                    den = torch.bmm(fq, z)
                    _divide(num, den)
                    t.put(dens, grp, t0, t1, den)
                t.put(outs, grp, t0, t1, num)
            kvs.append(kv)
            zs.append(z)
        ctx.phi = phi
        ctx.save_for_backward(q, k, v, out, den_all, *kvs, *zs)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout: Tensor):  # noqa: D102
        q, k, v, out, den_all, *states = ctx.saved_tensors
        t = _Tiles(q, k, v, ctx.phi, None)
        kvs, zs = states[: len(t.groups)], states[len(t.groups):]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dqs, dks, dvs = t.planes(dq), t.planes(dk), t.planes(dv)
        douts, outs = t.planes(dout), t.planes(out)
        dens = None if den_all is None else t.planes(den_all)
        for grp, kv, z in zip(t.groups, kvs, zs):
            dkv, dz = torch.zeros_like(kv), torch.zeros_like(z)
            for t0, t1 in t.q_spans:
                f, leaf = t.features(grp, t0, t1, True, grad=True)
                fq = t.chunked(f, leaf)
                g, g_den = t.grads(douts, outs, dens, grp, t0, t1)
                dfq = torch.bmm(g, kv.transpose(1, 2))
                dkv.baddbmm_(fq.transpose(1, 2), g)
                if g_den is not None:
                    dfq.baddbmm_(g_den, z.transpose(1, 2))
                    dz.baddbmm_(fq.transpose(1, 2), g_den)
                t.put(dqs, grp, t0, t1, t.pull(f, leaf, dfq, t0, t1))
            for t0, t1 in t.k_spans:
                f, leaf = t.features(grp, t0, t1, False, grad=True)
                fk = t.chunked(f, leaf)
                dfk = torch.bmm(t.chunks(t.v, grp, t0, t1), dkv.transpose(1, 2))
                if den_all is not None:
                    dfk += dz.transpose(1, 2)
                t.put(dvs, grp, t0, t1, torch.bmm(fk, dkv))
                t.put(dks, grp, t0, t1, t.pull(f, leaf, dfk, t0, t1))
        return dq, dk, dv, None, None


def causal_linear_attention(
    q: Tensor, k: Tensor, v: Tensor, *, phi: FeatureMap | None = None, normalize: bool = True, chunk: int = 64
) -> Tensor:
    """Causal linear attention (no decay, equal query and key lengths) ``(B, H, n, Ev)``, tiled, with
    the hand-written backward. ``q``, ``k`` ``(B, H, n, E)`` are the features themselves, or with
    ``phi`` the raw inputs of a token-wise feature map ``phi(x, is_query)``, applied tile by tile (and
    recomputed in backward) so the full feature tensors never exist. ``phi`` must map each token on
    its own, the same way in every head, and hold no trainable parameters (their gradients would be
    lost). Rows with ``den == 0`` return the numerator (zero for positive features)."""
    return _CausalLinear.apply(q, k, v, phi, normalize, chunk)


def noncausal_linear_attention(
    q: Tensor, k: Tensor, v: Tensor, *, phi: FeatureMap | None = None, normalize: bool = True
) -> Tensor:
    """Non-causal linear attention ``phi(Q) (phi(K)^T V) / phi(Q) phi(K)^T 1`` (any query and key
    lengths), tiled, with the hand-written backward; ``phi`` as in :func:`causal_linear_attention`."""
    return _NonCausalLinear.apply(q, k, v, phi, normalize)
