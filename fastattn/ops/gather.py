"""Gather attention: each query attends its own explicit list of keys (data-dependent sparsity such
as learned edges), without any ``Lq x Lk`` tensor.

Query ``i`` of head ``h`` sees keys ``idx[b, h, i, :]`` where ``valid``, with an optional additive
``bias`` per edge::

    s_ij = q_i . k_idx[i,j] * scale + bias_ij       (-inf where not valid)
    out_i = sum_j softmax_j(s_i) v_idx[i,j],         lse_i = log sum_j exp(s_ij)

**Memory.** Queries are processed in groups of rows whose gathered keys and values take about
:data:`~fastattn.ops.sparse.engine.GROUP_BYTES` (per device type), so no ``(B, H, Lq, K, E)`` tensor of
every query's keys exists. Under autograd a custom ``autograd.Function`` saves only the inputs, the
output and the log-sum-exp; backward regathers each group's keys and values, recomputes its
probabilities (``p = exp(s - lse)``) and adds the keys'/values' gradients back where they were gathered
from (``index_add_``, the adjoint of the gather). Working set: one group's temporaries plus O(n d + n K).
Keys/values may have fewer heads than the queries (grouped-query attention, ``H % Hkv == 0``): query
head ``h`` reads key head ``h // (H / Hkv)``, without repeating the keys. Double backward is not
supported. :func:`index_mask` gives the same edges as a dense mask (for references).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from fastattn.ops.softmax.online import compute_dtype
from fastattn.ops.sparse import engine

__all__ = ["index_attention", "index_mask"]


class _IndexCall:
    """The geometry of one call: the flat row of every edge's key in ``k.reshape(-1, E)`` and the
    query groups (``group`` rows at a time)."""

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, idx: Tensor, valid: Tensor, bias: Tensor | None,
                 scale: float, group_bytes: int) -> None:
        B, H, Lq, K = idx.shape
        hkv, lk = k.shape[1], k.shape[2]
        self.scale, self.K, self.E, self.Ev, self.Lq = scale, K, k.shape[3], v.shape[3], Lq
        head = torch.arange(H, device=idx.device) // (H // hkv)
        base = (torch.arange(B, device=idx.device)[:, None] * hkv + head[None, :]) * lk
        self.flat = torch.where(valid, idx, 0) + base[:, :, None, None]  # (B, H, Lq, K)
        self.valid, self.bias = valid, bias
        row_bytes = B * H * K * (self.E + self.Ev + 4) * q.element_size()
        self.group = max(1, group_bytes // row_bytes)

    def groups(self) -> list[tuple[int, int]]:
        return [(r, min(r + self.group, self.Lq)) for r in range(0, self.Lq, self.group)]

    def gather(self, x: Tensor, r0: int, r1: int) -> Tensor:
        """The keys (or values) of rows ``r0:r1``' edges, ``(B, H, r1 - r0, K, D)``."""
        fi = self.flat[:, :, r0:r1]
        return x.reshape(-1, x.shape[3]).index_select(0, fi.reshape(-1)).view(*fi.shape, x.shape[3])

    def scatter(self, acc: Tensor, grad: Tensor, r0: int, r1: int) -> None:
        """The adjoint of :meth:`gather`: adds ``grad (B, H, c, K, D)`` into ``acc`` (the keys' shape)."""
        fi = self.flat[:, :, r0:r1].reshape(-1)
        acc.view(-1, acc.shape[3]).index_add_(0, fi, grad.reshape(fi.numel(), -1))

    def scores(self, q: Tensor, kg: Tensor, r0: int, r1: int) -> Tensor:
        """Masked scores ``(B, H, c, K)`` of rows ``r0:r1``."""
        s = torch.matmul(kg, q[:, :, r0:r1, :, None]).squeeze(-1) * self.scale
        if self.bias is not None:
            s = s + self.bias[:, :, r0:r1]
        return s.masked_fill_(~self.valid[:, :, r0:r1], float("-inf"))

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """The output ``(B, H, Lq, Ev)`` and log-sum-exp ``(B, H, Lq)`` (``-inf`` for rows with no valid
        edge, whose output is 0)."""
        out = q.new_empty(*q.shape[:3], self.Ev)
        lse = q.new_empty(q.shape[:3])
        for r0, r1 in self.groups():
            s = self.scores(q, self.gather(k, r0, r1), r0, r1)
            m = torch.logsumexp(s, dim=-1, keepdim=True)
            p = torch.exp(s - torch.where(torch.isfinite(m), m, 0.0))
            out[:, :, r0:r1] = torch.matmul(p[..., None, :], self.gather(v, r0, r1)).squeeze(-2)
            lse[:, :, r0:r1] = m[..., 0]
        return out, lse

    def backward(
        self, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, do: Tensor, dlse: Tensor | None,
        dk: Tensor, dv: Tensor, dbias: Tensor | None,
    ) -> Tensor:
        """dq; the keys'/values' gradients accumulate into ``dk``/``dv`` and the bias's into ``dbias``."""
        dq = torch.empty_like(q)
        safe = torch.where(torch.isfinite(lse), lse, 0.0)
        for r0, r1 in self.groups():
            kg, vg = self.gather(k, r0, r1), self.gather(v, r0, r1)
            p = torch.exp(self.scores(q, kg, r0, r1) - safe[:, :, r0:r1, None])
            d_o = do[:, :, r0:r1]
            dp = torch.matmul(vg, d_o[..., None]).squeeze(-1)  # (B, H, c, K)
            delta = (d_o * out[:, :, r0:r1]).sum(-1, keepdim=True)
            if dlse is not None:  # d lse / d s = p
                delta = delta - dlse[:, :, r0:r1, None]
            ds = dp.sub_(delta).mul_(p)
            if dbias is not None:
                dbias[:, :, r0:r1] = ds
            ds = ds * self.scale
            dq[:, :, r0:r1] = torch.matmul(ds[..., None, :], kg).squeeze(-2)
            self.scatter(dk, ds[..., None] * q[:, :, r0:r1, None, :], r0, r1)
            self.scatter(dv, p[..., None] * d_o[:, :, :, None, :], r0, r1)
        return dq


class _IndexAttention(torch.autograd.Function):
    """Forward group by group saving only the inputs, the output and the log-sum-exp; backward
    regathers and recomputes each group. Returns ``(out, lse)``."""

    @staticmethod
    def forward(ctx: Any, call: _IndexCall, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
        out, lse = call.forward(q, k, v)
        ctx.call = call
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, bias, out, lse)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, do: Tensor | None, dlse: Tensor | None) -> tuple[Tensor | None, ...]:
        call: _IndexCall = ctx.call
        q, k, v, bias, out, lse = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(out)
        dk, dv = k.new_zeros(k.shape), v.new_zeros(v.shape)
        dbias = torch.empty_like(bias) if bias is not None and ctx.needs_input_grad[4] else None
        dq = call.backward(q, k, v, out, lse, do, dlse, dk, dv, dbias)
        return None, dq, dk, dv, dbias


def _check(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, valid: Tensor, bias: Tensor | None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, H, L, E); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, Lq, _ = q.shape
    if k.shape[:3] != v.shape[:3] or k.shape[0] != B or k.shape[3] != q.shape[3]:
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if H % k.shape[1]:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({k.shape[1]})")
    if idx.dim() != 4 or idx.shape[:3] != (B, H, Lq):
        raise ValueError(f"idx must be (B, H, Lq, K) = ({B}, {H}, {Lq}, K), got {tuple(idx.shape)}")
    if idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise ValueError(f"idx must be an integer tensor, got {idx.dtype}")
    if valid.shape != idx.shape or valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool tensor shaped like idx {tuple(idx.shape)}, got {valid.dtype} "
                         f"{tuple(valid.shape)}")
    if bias is not None and bias.shape != idx.shape:
        raise ValueError(f"bias must be shaped like idx {tuple(idx.shape)}, got {tuple(bias.shape)}")
    if idx.numel() and not torch.compiler.is_compiling():
        used = idx[valid]
        if used.numel() and (int(used.min()) < 0 or int(used.max()) >= k.shape[2]):
            raise ValueError(f"idx has valid entries outside [0, {k.shape[2]}) (the key length)")


def index_attention(
    q: Tensor, k: Tensor, v: Tensor, idx: Tensor, valid: Tensor, scale: float, bias: Tensor | None = None, *,
    return_lse: bool = False, group_bytes: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention of each query over its own list of keys (data-dependent sparsity, e.g. learned edges).

    ``q (B, H, Lq, E)``; ``k, v (B, Hkv, Lk, .)`` with ``H % Hkv == 0``. ``idx`` (integer) / ``valid``
    (bool) ``(B, H, Lq, K)``: query ``i`` sees keys ``idx[..., i, :]`` where ``valid`` (an index must not
    repeat among a row's valid entries; invalid entries are ignored, whatever their index); ``bias``
    ``(B, H, Lq, K)`` is added to those scores (differentiable). ``group_bytes``: the size of one query
    group's gathered keys and values (default :data:`~fastattn.ops.sparse.engine.GROUP_BYTES` of the
    device). Rows with no valid key return zeros.

    Returns ``out (B, H, Lq, Ev)`` in ``q``'s dtype or, with ``return_lse``, ``(out, lse)``, ``lse (B, H,
    Lq)`` (compute dtype) the log-sum-exp of each row's scores (``-inf`` for rows with no valid key),
    differentiable, for merging with other partial results. :func:`index_mask` gives the same edges as a
    dense mask.

    Example::

        idx = torch.stack([(i - 1).clamp(min=0), i], -1).expand(B, H, n, 2)   # previous token and self
        out = index_attention(q, k, v, idx, idx >= 0, d ** -0.5)
    """
    _check(q, k, v, idx, valid, bias)
    if group_bytes is None:
        group_bytes = engine.GROUP_BYTES.get(q.device.type, engine.GROUP_BYTES["cuda"])
    dt = compute_dtype(q.dtype)
    q_, k_, v_ = q.to(dt), k.to(dt).contiguous(), v.to(dt).contiguous()  # rows are gathered from flat views
    bias_ = None if bias is None else bias.to(dt)
    call = _IndexCall(q_, k_, v_, idx, valid, bias_, scale, group_bytes)
    tensors = [t for t in (q_, k_, v_, bias_) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        out, lse = _IndexAttention.apply(call, q_, k_, v_, bias_)
    else:  # inference: one pass, nothing saved
        out, lse = call.forward(q_, k_, v_)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def index_mask(idx: Tensor, valid: Tensor, lk: int, values: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """The edges of :func:`index_attention` as a dense bool ``(B, H, Lq, Lk)`` mask (True = may attend) and,
    given per-edge ``values``, the dense additive bias holding them (for references only)."""
    idx = torch.where(valid, idx, 0).long()
    allowed = torch.zeros(*idx.shape[:-1], lk, dtype=torch.int32, device=idx.device).scatter_add_(
        -1, idx, valid.to(torch.int32)
    ) > 0
    if values is None:
        return allowed, None
    dense = torch.zeros(*idx.shape[:-1], lk, dtype=values.dtype, device=idx.device)
    dense = dense.scatter_add(-1, idx, values.masked_fill(~valid, 0.0))
    return allowed, dense
