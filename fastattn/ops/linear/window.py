"""Softmax over a sliding window plus linear attention over everything older, under one normaliser.

Query ``i`` (position ``p_i``) splits its visible keys into the *window* -- causal: ``0 <= p_i - p_j < w``
(its last ``w`` positions, itself included); non-causal: ``|p_i - p_j| < w`` (a band) -- and the rest,
which it reads through feature maps ``phi``::

    y_i = [ sum_{j in window} g e^{s_ij - m_i} v_j + sum_{j rest} phi(q_i).phi(k_j) v_j ]
          / [ sum_{j in window} g e^{s_ij - m_i}     + sum_{j rest} phi(q_i).phi(k_j)     ]

with ``s_ij = q_i . k_j * scale``, ``m_i`` the row maximum of the window scores and ``g`` a per-head
weight of the window term. ``m_i`` is part of the form (the linear term is not divided by ``e^{m_i}``),
so its gradient is kept, as in the LoLCATs authors' code. With ``w`` at least the sequence length every
visible key is in the window: exactly softmax attention. Padding keys are dropped from both terms but keep
their positions (the window is counted in positions, so a left-padded row equals the row alone).

:func:`window_linear_attention` costs O(n w d + n D Ev): the window term in query chunks of ``w``
against a ``2w`` key span (band mask), the rest by the linear engine on keys shifted by ``w`` (query at
``p`` reads the causal state of keys ``<= p - w``; non-causal adds the same on the reversed sequence for
keys ``>= p + w``). :func:`dense_window_linear_attention` is the formula, dense. :class:`WindowLinearState`
is the decoding state: the linear state of keys that left the window and a ring of the last ``w``
keys / values (raw: the window term needs them).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from fastattn.core.checks import repeat_kv
from fastattn.core.masks import Mask
from fastattn.core.state import DecodingState
from fastattn.ops.softmax.online import compute_dtype

from .engine import linear_attention
from .state import LinearState

__all__ = ["WindowLinearState", "dense_window_linear_attention", "dense_window_linear_weights",
           "window_linear_attention"]


class WindowLinearState(DecodingState):
    """Decoding state of window + linear attention after ``length`` positions: ``kv``, ``z`` the linear
    state ``(B, Hkv, D, Ev)``, ``(B, Hkv, D)`` of the keys older than the window (None before any left
    it), and the window's raw keys / values ``k``, ``v`` ``(B, Hkv, <= w, E)``, their features ``fk``
    (folded into ``kv``, ``z`` when they leave the window) and padding ``pad`` (bool ``(B, <= w)``, True =
    padding)."""

    batched = ("k", "v", "fk", "pad", "kv", "z")

    def __init__(self, k: Tensor, v: Tensor, fk: Tensor, pad: Tensor, kv: Tensor | None, z: Tensor | None,
                 length: int) -> None:
        self.k, self.v, self.fk, self.pad, self.kv, self.z, self.length = k, v, fk, pad, kv, z, length

    @property
    def linear(self) -> LinearState | None:
        return None if self.kv is None else LinearState(self.kv, self.z, self.length - self.k.shape[2])


def _check(q: Tensor, k: Tensor, mask: Mask, window: int) -> None:
    mask.require_only("key_padding", "causal", op="window + linear attention")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    lq, lk = q.shape[2], k.shape[2]
    if mask.causal and lq > lk:
        raise ValueError(f"causal window + linear attention needs Lq <= Lk, got Lq={lq}, Lk={lk}")
    if not mask.causal and lq != lk:
        raise ValueError(f"non-causal window + linear attention needs Lq == Lk, got Lq={lq}, Lk={lk}")


def _band(q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, weight: Tensor, *, window: int, scale: float,
          causal: bool) -> tuple[Tensor, Tensor]:
    """The window term ``(sum g e^{s - m} v, sum g e^{s - m})`` ``(B, H, Lq, Ev)``, ``(B, H, Lq)``: query
    chunks of ``w`` against spans of ``2w`` (causal) / ``3w`` (band) keys; queries sit bottom-right."""
    b, h, lq, _ = q.shape
    lk, w = k.shape[2], window
    o = lk - lq  # query i at position o + i
    c = -(-lq // w)
    span, left = (2 * w, w) if causal else (3 * w, w)  # key span of chunk t starts at position o + t w - left
    right = (c - 1) * w + span - left - lq  # enough keys after the last query for c spans
    kk = F.pad(k, (0, 0, left, right))[:, :, o:].unfold(2, span, w)[:, :, :c]  # (B, H, C, E, span)
    vv = F.pad(v, (0, 0, left, right))[:, :, o:].unfold(2, span, w)[:, :, :c]
    real = torch.ones(b, 1, lk, dtype=torch.bool, device=q.device) if keep is None else keep[..., 0] > 0
    real = F.pad(real.expand(b, real.shape[1], lk), (left, right), value=False)[:, :, o:].unfold(2, span, w)[:, :, :c]
    qc = F.pad(q, (0, 0, 0, c * w - lq)).view(b, h, c, w, -1)
    s = torch.einsum("bhcrd,bhcda->bhcra", qc, kk) * scale  # (B, H, C, w, span)
    r = torch.arange(w, device=q.device)[:, None]
    a = torch.arange(span, device=q.device)[None, :]
    dist = r + left - a  # query position minus key position
    inside = (dist >= 0) & (dist < w) if causal else dist.abs() < w
    allowed = inside & real[:, :, :, None, :]  # (B, 1|H, C, w, span)
    s = s.masked_fill(~allowed, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m) * weight.to(s.dtype).view(1, h, 1, 1, 1)
    num = torch.einsum("bhcra,bhcea->bhcre", e, vv).reshape(b, h, c * w, -1)[:, :, :lq]
    return num, e.sum(-1).reshape(b, h, c * w)[:, :, :lq]


def _older(fq: Tensor, fk: Tensor, v: Tensor, pad: Tensor | None, *, window: int, chunk: int,
           state: LinearState | None = None) -> tuple[Tensor, Tensor, LinearState | None]:
    """``(sum phi(q).phi(k) v, sum phi(q).phi(k))`` over keys at positions ``<= p - w`` (queries
    bottom-right), plus ``state`` (keys before these), by the linear engine on shifted keys; and the
    state after the keys that left every query's window (``None`` when none did and no state was given)."""
    b, h, lq, _ = fq.shape
    lk = fk.shape[2]
    i0 = max(0, window - (lk - lq))  # queries before i0 see no key of these old enough
    nk = lk - window
    num = fq.new_zeros(b, h, lq, v.shape[-1], dtype=compute_dtype(v.dtype))
    den = num.new_zeros(b, h, lq)
    new_state = state
    if nk > 0:
        mask = Mask(lq=lq - i0, lk=nk, key_padding=None if pad is None else pad[:, :nk], causal=True)
        (n1, d1), new_state = linear_attention(fq[:, :, i0:], fk[:, :, :nk], v[:, :, :nk], mask, chunk=chunk,
                                               state=state, return_state=True, partial=True)
        num = torch.cat([num[:, :, :i0], n1], dim=2)
        den = torch.cat([den[:, :, :i0], d1], dim=2)
    if state is not None and (nk <= 0 or i0 > 0):  # rows that see the state and no key of these
        n0 = min(lq, i0) if nk > 0 else lq
        g = h // state.kv.shape[1]
        fq0 = fq[:, :, :n0].to(num.dtype)
        num0 = torch.matmul(fq0, repeat_kv(state.kv.to(num.dtype), g))
        den0 = (fq0 * repeat_kv(state.z.to(num.dtype)[:, :, None], g)).sum(-1)
        num = torch.cat([num[:, :, :n0] + num0, num[:, :, n0:]], dim=2)
        den = torch.cat([den[:, :, :n0] + den0, den[:, :, n0:]], dim=2)
    return num, den, new_state


def window_linear_attention(
    q: Tensor, k: Tensor, fq: Tensor, fk: Tensor, v: Tensor, mask: Mask, *, window: int, scale: float,
    weight: Tensor, chunk: int = 64, state: WindowLinearState | None = None, return_state: bool = False,
) -> Tensor | tuple[Tensor, WindowLinearState]:
    """Window softmax + linear attention (see the module docstring), O(n w d + n D Ev).

    Args:
        q, k, v: ``(B, H, Lq, E)``, ``(B, Hkv, Lk, E)``, ``(B, Hkv, Lk, Ev)`` (grouped-query heads native).
        fq, fk: their features ``phi(q)`` ``(B, H, Lq, D)``, ``phi(k)`` ``(B, Hkv, Lk, D)``.
        mask: ``key_padding`` and ``causal`` (bottom-right, ``Lq <= Lk``); non-causal needs ``Lq == Lk``.
        window: ``w >= 1``; weight: the window term's per-head factor ``g`` ``(H,)``.
        chunk: chunk length of the linear engine's causal scan.
        state: a :class:`WindowLinearState` to continue from (causal; ``k``, ``v``, ``fk`` are then the new
            tokens only); return_state: also return the state after the last key.
    """
    _check(q, k, mask, window)
    if state is not None and not mask.causal:
        raise ValueError("a window + linear state continues causal attention only")
    dtype = v.dtype
    dt = compute_dtype(dtype)
    q, k, fq, fk, v = (x.to(dt) for x in (q, k, fq, fk, v))
    pad = mask.key_padding
    if pad is not None:
        pad = pad.to(q.device)
    lin = None
    total = k.shape[2] + (0 if state is None else state.length)
    if state is not None:  # the window's keys come first
        b, t = k.shape[0], k.shape[2]
        new_pad = torch.zeros(b, t, dtype=torch.bool, device=q.device) if pad is None else pad
        pad = torch.cat([state.pad.to(new_pad.device), new_pad], dim=1)
        k, v = torch.cat([state.k.to(dt), k], dim=2), torch.cat([state.v.to(dt), v], dim=2)
        lin = state.linear
        fk = torch.cat([state.fk.to(dt), fk], dim=2)
    keep = None if pad is None else (~pad)[:, None, :, None].to(dt)
    groups = q.shape[1] // k.shape[1]
    num_w, den_w = _band(q, repeat_kv(k, groups), repeat_kv(v, groups), keep, weight, window=window, scale=scale,
                         causal=mask.causal)
    num_l, den_l, lin_new = _older(fq, fk, v, pad, window=window, chunk=chunk, state=lin)
    if not mask.causal:  # keys at positions >= p + w: the same on the reversed sequence
        flip = None if pad is None else pad.flip(1)
        n2, d2, _ = _older(fq.flip(2), fk.flip(2), v.flip(2), flip, window=window, chunk=chunk)
        num_l, den_l = num_l + n2.flip(2), den_l + d2.flip(2)
    num, den = num_w + num_l, den_w + den_l
    out = (num / torch.where(den == 0, torch.ones_like(den), den)[..., None]).to(dtype)
    if not return_state:
        return out
    w = min(window, k.shape[2])
    if pad is None:
        pad = torch.zeros(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device)
    kv = None if lin_new is None else lin_new.kv
    z = None if lin_new is None else lin_new.z
    return out, WindowLinearState(k[:, :, k.shape[2] - w:], v[:, :, k.shape[2] - w:], fk[:, :, k.shape[2] - w:],
                                  pad[:, k.shape[2] - w:], kv, z, total)


def dense_window_linear_weights(q: Tensor, k: Tensor, fq: Tensor, fk: Tensor, mask: Mask, *, window: int,
                                scale: float, weight: Tensor) -> Tensor:
    """The unnormalised weights ``(B, H, Lq, Lk)`` of the formula: ``g e^{s - m}`` in the window,
    ``phi(q).phi(k)`` outside it, 0 where masked. Dense O(n^2); grouped-query heads are expanded."""
    _check(q, k, mask, window)
    groups = q.shape[1] // k.shape[1]
    k, fk = repeat_kv(k, groups), repeat_kv(fk, groups)
    allowed = mask.allowed(q.device)
    if allowed is None:
        allowed = torch.ones(1, 1, q.shape[2], k.shape[2], dtype=torch.bool, device=q.device)
    dist = mask.q_pos(q.device)[..., :, None] - mask.k_pos(q.device)[..., None, :]
    band = ((dist >= 0) & (dist < window)) if mask.causal else dist.abs() < window
    in_window, older = allowed & band, allowed & ~band
    s = (torch.matmul(q, k.transpose(-1, -2)) * scale).masked_fill(~in_window, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    a_w = torch.exp(s - m) * weight.to(s.dtype).view(1, -1, 1, 1)
    a_l = torch.matmul(fq, fk.transpose(-1, -2)) * older.to(fq.dtype)
    return a_w + a_l


def dense_window_linear_attention(q: Tensor, k: Tensor, fq: Tensor, fk: Tensor, v: Tensor, mask: Mask, *,
                                  window: int, scale: float, weight: Tensor) -> Tensor:
    """The reference: :func:`dense_window_linear_weights`, row-normalised, times ``v`` (rows with no
    visible key give 0)."""
    a = dense_window_linear_weights(q, k, fq, fk, mask, window=window, scale=scale, weight=weight)
    den = a.sum(-1, keepdim=True)
    return torch.matmul(a / torch.where(den == 0, torch.ones_like(den), den), repeat_kv(v, q.shape[1] // v.shape[1]))
