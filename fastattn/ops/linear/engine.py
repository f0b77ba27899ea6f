"""The linear-attention engine shared by every kernel mechanism.

Given feature maps ``Q' = phi(Q)`` ``(B, H, Lq, D)`` and ``K' = phi(K)`` ``(B, H, Lk, D)``, it computes

* non-causal: ``out = Q' (K'^T V) / (Q' K'^T 1)`` -- two matrix products, O(n D Ev);
* causal, with an optional per-head decay ``lambda`` in (0, 1]:
  ``out_t = sum_{s<=t} lambda^(t-s) (q'_t . k'_s) v_s  /  sum_{s<=t} lambda^(t-s) q'_t . k'_s``,
  or per-token gates ``g_s`` in (0, 1] (``decay`` of shape ``(B, H, Lk)``; RFA's gated form): the weight
  of key ``s`` for query ``t`` is ``prod_{s<r<=t} g_r``, i.e. the state recursion ``S_t = g_t S_{t-1} +
  k'_t v_t^T``; a per-head ``lambda`` is the constant gate. A padded key's per-token gate counts as 1.
  by a **chunked scan** (Lightning Attention-2's intra/inter-block split): inside a chunk of ``chunk``
  tokens the masked (decayed) quadratic form; across chunks a running ``D x Ev`` state. Memory is
  O(n chunk + (n / chunk) D Ev), never the O(n D Ev) of a cumulative sum over outer products, and there
  is no Python loop over tokens;
* recurrent decoding: the same scan started from a saved :class:`LinearState` -- ``step`` and the
  parallel causal forward are one code path.

``normalize=False`` drops the denominator (Lightning / TransNormer use a norm after instead). Padding
keys are removed by zeroing their features and values. Half-precision inputs are computed in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fastattn.core.masks import Mask
from fastattn.core.state import DecodingState
from fastattn.ops.softmax.online import compute_dtype
from .tiled import FeatureMap, causal_linear_attention, noncausal_linear_attention

__all__ = ["LinearState", "linear_attention", "dense_kernel_attention"]


@dataclass
class LinearState(DecodingState):
    """Constant-size decoding state: ``S = sum lambda^(t-s) k'_s v_s^T`` ``(B, H, D, Ev)``, the
    normaliser ``z = sum lambda^(t-s) k'_s`` ``(B, H, D)`` and the positions seen (``length``). Padded
    keys enter it as zeros."""

    kv: Tensor
    z: Tensor
    length: int = 0

    batched = ("kv", "z")


def _safe_divide(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` with 0 where ``den == 0`` (a query that sees no real key)."""
    zero = den == 0
    return num / torch.where(zero, torch.ones_like(den), den)


def _finish(num: Tensor, den: Tensor | None, dtype: torch.dtype) -> Tensor:
    out = num if den is None else _safe_divide(num, den.unsqueeze(-1))
    return out.to(dtype)


def linear_attention(
    fq: Tensor,
    fk: Tensor,
    v: Tensor,
    mask: Mask,
    *,
    phi: FeatureMap | None = None,
    decay: Tensor | None = None,
    normalize: bool = True,
    chunk: int = 64,
    state: LinearState | None = None,
    return_state: bool = False,
    log_decay: bool = False,
) -> Tensor | tuple[Tensor, LinearState]:
    """Linear attention over feature maps; see the module docstring.

    Args:
        fq, fk: query/key features ``(B, H, Lq, D)``, ``(B, H, Lk, D)`` -- or, with ``phi``, the raw
            queries and keys.
        v: values ``(B, H, Lk, Ev)``.
        mask: only ``key_padding`` and ``causal`` are honoured (``bias`` is an error).
        phi: a token-wise, parameter-free feature map ``phi(x, is_query)``; where it can, the engine
            applies it tile by tile inside :mod:`fastattn.ops.linear.tiled` (full feature tensors never
            exist), else it computes the features first.
        decay: per-head ``lambda`` ``(H,)`` or per-token gates ``(B, H, Lk)``, in (0, 1] (causal only).
        normalize: divide by ``q' . sum k'`` (True) or not.
        chunk: chunk length of the causal scan.
        state: a previous :class:`LinearState` to continue from (causal only).
        return_state: also return the state after the last key (causal only).
        log_decay: ``decay`` holds ``log lambda`` / ``log g`` (<= 0, finite where a gate underflows).
    """
    mask.require_only("key_padding", "causal", "bias", op="linear attention")
    if mask.bias is not None:
        raise ValueError("kernel attention cannot apply an arbitrary attn_mask")
    if not mask.causal and (decay is not None or state is not None or return_state):
        raise ValueError("decay and decoding state need the causal form")
    dtype = v.dtype
    dt = compute_dtype(dtype)
    fq, fk, v = fq.to(dt), fk.to(dt), v.to(dt)
    keep = mask.key_keep(dt)
    lq, lk = fq.shape[2], fk.shape[2]
    tiled = decay is None and state is None and not return_state and (not mask.causal or lq == lk)
    if phi is not None and not (tiled and keep is None):
        fq, fk, phi = phi(fq, True), phi(fk, False), None
    if keep is not None:
        fk, v = fk * keep, v * keep
    if tiled:
        if mask.causal:
            return causal_linear_attention(fq, fk, v, phi=phi, normalize=normalize, chunk=chunk).to(dtype)
        return noncausal_linear_attention(fq, fk, v, phi=phi, normalize=normalize).to(dtype)

    if lq < lk:  # bottom-right alignment: the queries are the last lq positions
        fq = F.pad(fq, (0, 0, lk - lq, 0))
    log_g = _log_gates(decay, fk, keep, log_decay)
    out, new_state = _causal_scan(fq, fk, v, log_g, normalize, chunk, state, want_state=return_state)
    out = _finish(out[0], out[1], dtype)[:, :, lk - lq:].contiguous()  # the last lq rows, not a view
    return (out, new_state) if return_state else out


def _log_gates(decay: Tensor | None, fk: Tensor, keep: Tensor | None, is_log: bool = False) -> Tensor | None:
    """``log g`` ``(B|1, H, Lk)`` from a per-head ``(H,)`` or per-token ``(B, H, Lk)`` decay; padded keys'
    per-token gates become 1 (they never act on the state). A per-head decay is positional: it counts
    every position, padded or not."""
    if decay is None:
        return None
    log = (lambda x: x) if is_log else torch.log  # noqa: E731
    b, h, n, _ = fk.shape
    if decay.dim() == 1:
        if decay.shape[0] != h:
            raise ValueError(f"per-head decay must have shape ({h},), got {tuple(decay.shape)}")
        return log(decay.to(fk.dtype)).view(1, h, 1).expand(1, h, n)
    if tuple(decay.shape) != (b, h, n):
        raise ValueError(f"per-token decay must have shape (B, H, Lk) = ({b}, {h}, {n}), got {tuple(decay.shape)}")
    log_g = log(decay.to(fk.dtype))
    return log_g if keep is None else log_g * keep[..., 0]


def _causal_scan(
    fq: Tensor, fk: Tensor, v: Tensor, log_g: Tensor | None, normalize: bool, chunk: int,
    state: LinearState | None, want_state: bool = True,
) -> tuple[tuple[Tensor, Tensor | None], LinearState | None]:
    b, h, n, d = fq.shape
    ev = v.shape[-1]
    c = max(1, min(chunk, n))
    m = math.ceil(n / c)
    pad = m * c - n
    if pad:
        fq, fk, v = (F.pad(t, (0, 0, 0, pad)) for t in (fq, fk, v))
    qc = fq.view(b, h, m, c, d)
    kc = fk.view(b, h, m, c, d)
    vc = v.view(b, h, m, c, ev)
    idx = torch.arange(c, device=fq.device)
    causal = idx[:, None] >= idx[None, :]
    if log_g is None:
        intra_w = causal.to(fq.dtype)  # (c, c)
        q_in = k_out = None
    else:
        if pad:
            log_g = F.pad(log_g, (0, pad))
        cum = torch.cumsum(log_g.reshape(log_g.shape[0], h, m, c), dim=-1)  # G_i: gates 0..i of the chunk
        diff = cum[..., :, None] - cum[..., None, :]  # G_i - G_j = log prod_{j<r<=i} g_r
        intra_w = torch.exp(diff.masked_fill(~causal, float("-inf")))  # (B|1, h, m, c, c)
        q_in = torch.exp(cum).unsqueeze(-1)  # decay of the chunk-start state up to query i
        k_out = torch.exp(cum[..., -1:] - cum).unsqueeze(-1)  # key j to the chunk's end
        lam_c = torch.exp(cum[..., -1])  # (B|1, h, m): the whole chunk
    # intra-chunk: masked quadratic form
    a = torch.matmul(qc, kc.transpose(-1, -2)) * intra_w
    num = torch.matmul(a, vc)
    den = a.sum(dim=-1) if normalize else None
    # inter-chunk: states at each chunk's start
    kd = kc if k_out is None else kc * k_out
    kv_c = torch.matmul(kd.transpose(-1, -2), vc)  # (b, h, m, d, ev)
    z_c = kd.sum(dim=3)  # (b, h, m, d)
    init_kv = state.kv.to(fq.dtype) if state is not None else torch.zeros(b, h, d, ev, dtype=fq.dtype, device=fq.device)
    init_z = state.z.to(fq.dtype) if state is not None else torch.zeros(b, h, d, dtype=fq.dtype, device=fq.device)
    if log_g is None:
        kv_start = torch.cumsum(kv_c, dim=2) - kv_c + init_kv[:, :, None]
        z_start = torch.cumsum(z_c, dim=2) - z_c + init_z[:, :, None]
    else:
        starts_kv, starts_z = [], []
        s_kv, s_z = init_kv, init_z
        for j in range(m):  # a loop over chunks (n / chunk steps), not tokens
            starts_kv.append(s_kv)
            starts_z.append(s_z)
            s_kv = s_kv * lam_c[:, :, j, None, None] + kv_c[:, :, j]
            s_z = s_z * lam_c[:, :, j, None] + z_c[:, :, j]
        kv_start = torch.stack(starts_kv, dim=2)
        z_start = torch.stack(starts_z, dim=2)
    qi = qc if q_in is None else qc * q_in
    num = num + torch.matmul(qi, kv_start)
    if normalize:
        den = den + torch.matmul(qi, z_start.unsqueeze(-1)).squeeze(-1)
    num = num.reshape(b, h, m * c, ev)[:, :, :n]
    den = den.reshape(b, h, m * c)[:, :, :n] if den is not None else None
    if not want_state:
        return (num, den), None
    # state after the last real token: lambda^n S_init + sum_s lambda^(n-1-s) k'_s v_s^T
    fk_r, v_r = fk[:, :, :n], v[:, :, :n]
    if log_g is None:
        new_kv = init_kv + torch.matmul(fk_r.transpose(-1, -2), v_r)
        new_z = init_z + fk_r.sum(dim=2)
    else:
        cum_n = torch.cumsum(log_g[..., :n], dim=-1)
        w = torch.exp(cum_n[..., -1:] - cum_n).unsqueeze(-1)  # prod_{s<r<n} g_r
        lam_n = torch.exp(cum_n[..., -1]).view(cum_n.shape[0], h, 1, 1)
        new_kv = init_kv * lam_n + torch.matmul((fk_r * w).transpose(-1, -2), v_r)
        new_z = init_z * lam_n.squeeze(-1) + (fk_r * w).sum(dim=2)
    return (num, den), LinearState(new_kv, new_z, n + (state.length if state is not None else 0))


def dense_kernel_attention(
    fq: Tensor, fk: Tensor, v: Tensor, mask: Mask, *, decay: Tensor | None = None, normalize: bool = True,
    log_decay: bool = False,
) -> Tensor:
    """The reference: ``A = phi(Q) phi(K)^T`` (times ``lambda^(t-s)``), masked, row-normalised, ``A V``.
    Dense O(n^2), written as the formula."""
    a = torch.matmul(fq, fk.transpose(-1, -2))
    lq, lk = fq.shape[2], fk.shape[2]
    if decay is not None:
        keep = mask.key_keep(fq.dtype)
        cum = torch.cumsum(_log_gates(decay, fk, keep, log_decay), dim=-1)  # (B|1, H, Lk): G_s = sum_{r<=s} log g_r
        t = torch.arange(lq, device=fq.device) + mask.offset
        g_t = cum[..., t]  # G at each query's position
        diff = (g_t[..., :, None] - cum[..., None, :]).clamp_max(0)  # log prod_{s<r<=t} g_r (s <= t)
        a = a * torch.exp(diff)
    allowed = mask.allowed(fq.device)
    if allowed is not None:
        a = a * allowed.to(a.dtype)
    out = torch.matmul(a, v)
    if normalize:
        out = _safe_divide(out, a.sum(dim=-1, keepdim=True))
    return out
