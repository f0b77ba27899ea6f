"""Linear attention: the op every kernel mechanism calls, its dense reference, and the closed-form state.

Given feature maps ``Q' = phi(Q)`` ``(B, H, Lq, D)`` and ``K' = phi(K)`` ``(B, H, Lk, D)``,
:func:`linear_attention` computes

* non-causal: ``out = Q' (S_0 + K'^T V) / Q' (z_0 + K'^T 1)`` -- two matrix products, O(n D Ev);
* causal, bottom-right aligned, with an optional per-head decay ``lambda_h`` or per-token gates ``g_t``
  in [0, 1]: the recurrence ``S_t = g_t S_{t-1} + k'_t v_t^T`` (the same for ``z``) read out as
  ``out_t = q'_t S_t / q'_t z_t``, i.e. query ``t`` weighs key ``s <= t`` by ``prod_{s<r<=t} g_r``; a
  per-head ``lambda`` is the constant gate. Gates may be given as logs (``log_decay``, e.g. from
  ``logsigmoid``), which is exact where a gate underflows to 0. Log-gates are floored at
  :data:`LOG_GATE_FLOOR` (a gate below ``exp(-60)`` acts as ``exp(-60)``), so a gate of exactly 0 gives
  finite values and gradients.

Every case runs on the tiled kernels of :mod:`fastattn.ops.linear.tiled` (one implementation of the
recurrence, with its hand-written backward), or, under the compiled backend (``backend="cpp"``), on the
C++ kernels of :mod:`fastattn.ops.linear.compiled` (same contract). Keys before the first query (``Lq < Lk``, causal) are
folded into the initial state by :func:`linear_state`. A previous :class:`LinearState` may be given
(``state``) and the final one returned (``return_state``): ``step`` and the parallel forward are one
code path, and a sequence split in two equals the whole. ``partial=True`` returns the unnormalised
``(numerator, denominator)`` (float32 for half inputs) so that callers can combine pieces (sequence
parallelism, prefill); with ``normalize=False`` the denominator is None.

Grouped-query heads are native: ``fk``, ``v``, the decay / gates and the state may have ``Hkv`` heads
(``H`` a multiple of ``Hkv``); the state is then kept per key/value head.

Key log-scales (``key_log_scale``): feature maps whose features are exponentials (Performer's positive
random features) underflow in float32 for keys of moderate norm, and 0 / 0 then reads as 0. Such a map
gives its key features shifted, ``k'_s exp(-c_s)``, with per-token log-scales ``c_s`` (part of the
features: gradients reach them). The op keeps the state in units of ``exp(M)``, ``M_t = max_{s <= t}
c_s`` the running maximum (the state's own ``log_scale`` included), as online softmax does with its row
maximum: keys enter as ``k'_s exp(-c_s) exp(c_s - M_s)`` (at most their shifted size) and the state is
rescaled by ``exp(M_{t-1} - M_t)`` when the maximum grows -- exactly a per-token log-gate (float64, not
floored), so the gated kernels do it, and query ``t`` reads ``num_t, den_t`` in units of ``exp(M_t)``, a
factor common to both that cancels (so ``M`` is a constant for autograd, as online softmax treats its
maximum: the gradients are exact). Inside a chunk each query uses its own ``M_t`` (the gate weights
``exp(A_t - A_s)``), so every factor a query sees depends only on keys ``<= t``: no leak, not even at
rounding level -- a later key enters an earlier query's sums with weight exactly 0, and past outputs are
bit-identical whatever the future keys (tested). Non-causal: one maximum over the (unpadded) keys and
the state. Needs ``normalize``; with ``partial`` each query's ``M_t`` is returned too. Cost: the
per-token gated kernels instead of the plain ones.

``normalize=False`` drops the denominator (Lightning / TransNormer use a norm after instead). Padding
keys are removed by zeroing their features and values (and their per-token gates become 1; a per-head
decay is positional and counts every position). Half-precision inputs are computed in float32.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastattn.core.checks import repeat_kv
from fastattn.core.masks import Mask
from fastattn.ops.softmax.online import compute_dtype

from . import compiled
from .state import LinearState
from .tiled import FeatureMap, gate_dtype, tiled_linear_attention

__all__ = [
    "LOG_GATE_FLOOR",
    "LinearState",
    "dense_kernel_attention",
    "linear_attention",
    "linear_state",
    "log_gates",
]

LOG_GATE_FLOOR = -60.0  # log-gates below this act as this: exp(-60) ~ 1e-26 (no -inf, no NaN)


def _safe_divide(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` with 0 where ``den == 0`` (a query that sees no real key)."""
    zero = den == 0
    return num / torch.where(zero, torch.ones_like(den), den)


def log_gates(decay: Tensor | None, log_decay: Tensor | None, fk: Tensor,
              keep: Tensor | None = None) -> tuple[Tensor | None, bool]:
    """Floored log-gates for the kernels and whether they are per token: ``(B, H, Lk)`` from per-token
    ``decay`` / ``log_decay`` (padded keys' gates become 1), ``(B, H, 1)`` from a per-head ``(H,)`` one."""
    if decay is not None and log_decay is not None:
        raise ValueError("give decay or log_decay, not both")
    x = decay if log_decay is None else log_decay
    if x is None:
        return None, False
    b, h, n = fk.shape[:3]
    per_token = x.dim() != 1
    if not per_token and x.shape[0] != h:
        raise ValueError(f"per-head decay must have shape ({h},), got {tuple(x.shape)}")
    if per_token and tuple(x.shape) != (b, h, n):
        raise ValueError(f"per-token decay must have shape (B, H, Lk) = ({b}, {h}, {n}), got {tuple(x.shape)}")
    x = x.to(fk.dtype)
    lg = x.clamp_min(LOG_GATE_FLOOR) if log_decay is not None else torch.log(x.clamp_min(math.exp(LOG_GATE_FLOOR)))
    if not per_token:
        return lg.view(1, h, 1).expand(b, h, 1), False
    return (lg if keep is None else lg * keep[..., 0]), True


def _key_shift(c: Tensor, keep: Tensor | None, state: LinearState | None,
               causal: bool) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """The running maximum of key log-scales ``c`` ``(B, H, n)``: ``(log_k, M, log_g, m0)``.

    ``log_k = c - M`` (``<= 0``, -inf on padding, differentiable in ``c``) is the log-factor each key's
    shifted features are multiplied by; ``M`` (no gradient) is per key, the maximum up to and including
    it and the state's (non-causal: one maximum ``(B, H, 1)``); ``log_g = M_{t-1} - M_t`` the per-token
    log-gates (causal; None otherwise); ``m0`` ``(B, H)`` the state's scale (0: natural units; without a
    state, the first maximum). All in the gate dtype (float64)."""
    c_grad = c.to(gate_dtype(c.device))
    if keep is not None:
        c_grad = c_grad.masked_fill(keep[..., 0] == 0, float("-inf"))
    c = c_grad.detach()
    m0 = c.new_zeros(c.shape[:2]) if state is None or state.log_scale is None else state.log_scale.to(c)
    if not causal:
        m = c.amax(-1, keepdim=True) if c.shape[-1] else c.new_full((*c.shape[:2], 1), float("-inf"))
        if state is not None:
            m = torch.maximum(m, m0[..., None])
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        return c_grad - m, m, None, m0
    if not c.shape[-1]:
        return c_grad, c, c, m0
    m = torch.cummax(c, dim=-1).values
    if state is not None:
        m = torch.maximum(m, m0[..., None])
    else:  # no key yet (leading padding): the first finite maximum (nothing to rescale before it)
        first = torch.where(torch.isfinite(m), m, float("inf")).amin(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.where(torch.isfinite(first), first, torch.zeros_like(first)))
        m0 = m[..., 0]
    prev = torch.cat([m0[..., None], m[..., :-1]], dim=-1)
    return c_grad - m, m, prev - m, m0


def _scaled_keys(phi: FeatureMap) -> FeatureMap:
    """``phi`` for keys carrying their log-factor as one more (last) column: ``phi(k) exp(log_k)``."""

    def scaled(x: Tensor, is_query: bool) -> Tensor:
        if is_query:
            return phi(x, True)
        return phi(x[..., :-1], False) * x[..., -1:].exp()

    return scaled


def linear_state(fk: Tensor, v: Tensor, *, log_g: Tensor | None = None, s0: Tensor | None = None,
                 z0: Tensor | None = None, normalize: bool = True) -> tuple[Tensor, Tensor | None]:
    """The state after keys ``fk`` ``(B, H, n, D)`` and values ``v``, in closed form (autograd):
    ``S = exp(A_n) S_0 + sum_s exp(A_n - A_s) k'_s v_s^T`` and ``z`` alike (None unless ``normalize``);
    ``log_g`` as returned by :func:`log_gates`."""
    n = fk.shape[2]
    lam = None
    if log_g is not None:
        cum = log_g.to(gate_dtype(log_g.device)).expand(*log_g.shape[:2], n).cumsum(-1)
        fk = fk * (cum[..., -1:] - cum).exp().to(fk.dtype).unsqueeze(-1)
        lam = cum[..., -1].exp().to(fk.dtype)  # (B, H)
    kv = torch.matmul(fk.transpose(-1, -2), v)
    z = fk.sum(dim=2) if normalize else None
    if s0 is not None:
        kv = kv + (s0 if lam is None else s0 * lam[..., None, None])
    if z0 is not None and normalize:
        z = z + (z0 if lam is None else z0 * lam[..., None])
    return kv, z


def linear_attention(
    fq: Tensor,
    fk: Tensor,
    v: Tensor,
    mask: Mask,
    *,
    phi: FeatureMap | None = None,
    decay: Tensor | None = None,
    log_decay: Tensor | None = None,
    normalize: bool = True,
    chunk: int = 64,
    state: LinearState | None = None,
    return_state: bool = False,
    partial: bool = False,
    key_log_scale: Tensor | None = None,
) -> Tensor | tuple:
    """Linear attention over feature maps; see the module docstring.

    Args:
        fq, fk: query/key features ``(B, H, Lq, D)``, ``(B, Hkv, Lk, D)`` -- or, with ``phi``, the raw
            queries and keys.
        v: values ``(B, Hkv, Lk, Ev)``.
        mask: only ``key_padding`` and ``causal`` are honoured (``bias`` is an error); causal needs
            ``Lq <= Lk``.
        phi: a token-wise, parameter-free feature map ``phi(x, is_query)``; where it can, the op
            applies it tile by tile inside the kernels (full feature tensors never exist), else it
            computes the features first.
        decay: per-head ``lambda`` ``(Hkv,)`` or per-token gates ``(B, Hkv, Lk)``, in [0, 1] (causal only).
        log_decay: the same as logs (``<= 0``), instead of ``decay``.
        normalize: divide by ``q' . z`` (True) or not.
        chunk: chunk length of the causal kernel.
        state: a previous :class:`LinearState` to continue from (its tokens precede these keys).
        return_state: also return the state after the last key.
        partial: return ``(numerator, denominator)`` unnormalised instead of the output (with
            ``key_log_scale``: ``(num, den, M)``, both in units of ``exp(M)``, ``M`` ``(B, H, Lq)``).
        key_log_scale: per-token log-scales ``c`` ``(B, Hkv, Lk)`` of shifted key features: the true
            features are ``fk * exp(c)`` (or ``phi(k, False) * exp(c)``); see the module docstring.
            Needs ``normalize``. Gradients reach ``c`` (the running maximum is a constant).

    Returns:
        the output ``(B, H, Lq, Ev)`` (or ``(num, den)``), followed by the :class:`LinearState` if
        ``return_state``.
    """
    mask.require_only("key_padding", "causal", "bias", op="linear attention")
    if mask.bias is not None:
        raise ValueError("kernel attention cannot apply an arbitrary attn_mask")
    if (decay is not None or log_decay is not None) and not mask.causal:
        raise ValueError("decay and gates need the causal form")
    lq, lk = fq.shape[2], fk.shape[2]
    if fq.shape[1] % fk.shape[1]:
        raise ValueError(f"query heads ({fq.shape[1]}) must be a multiple of key/value heads ({fk.shape[1]})")
    if mask.causal and lq > lk:
        raise ValueError(f"causal linear attention needs Lq <= Lk, got Lq={lq}, Lk={lk}")
    if state is not None and tuple(state.kv.shape[:2]) != tuple(fk.shape[:2]):
        raise ValueError(f"the state is for (B, H) = {tuple(state.kv.shape[:2])}, the keys are {tuple(fk.shape[:2])}")
    if state is not None and normalize and state.z is None:
        raise ValueError("a normalised call cannot continue from a state without its normaliser z")
    if key_log_scale is not None:
        if not normalize:
            raise ValueError("key_log_scale needs normalize=True (the shift cancels only in num / den)")
        if tuple(key_log_scale.shape) != (*fk.shape[:2], lk):
            raise ValueError(f"key_log_scale must have shape (B, Hkv, Lk) = {(*fk.shape[:2], lk)}, "
                             f"got {tuple(key_log_scale.shape)}")
    elif state is not None and state.log_scale is not None:
        raise ValueError("the state is in shifted units (log_scale); continue it with key_log_scale")
    dtype = v.dtype
    dt = compute_dtype(dtype)
    fq, fk, v = fq.to(dt), fk.to(dt), v.to(dt)
    keep = mask.key_keep(dt)
    log_g, per_token = log_gates(decay, log_decay, fk, keep)
    if phi is not None and keep is not None:
        fq, fk, phi = phi(fq, True), phi(fk, False), None
    if keep is not None:
        fk, v = fk * keep, v * keep
    s0 = None if state is None else state.kv.to(dt)
    z0 = None if state is None or not normalize else state.z.to(dt)
    m_key = None
    if key_log_scale is not None:
        log_k, m_key, shift_g, m0 = _key_shift(key_log_scale, keep, state, mask.causal)
        if phi is None:
            fk = fk * log_k.exp().to(dt).unsqueeze(-1)
        else:
            fk, phi = torch.cat([fk, log_k.to(dt).unsqueeze(-1)], dim=-1), _scaled_keys(phi)
        if mask.causal:  # the rescaling as log-gates, in float64, not floored (exact, finite)
            log_g = shift_g if log_g is None else log_g.to(shift_g).expand_as(shift_g) + shift_g
            per_token = True
        elif state is not None:
            rescale = (m0 - m_key[..., 0]).exp().to(dt)
            s0 = s0 * rescale[..., None, None]
            z0 = z0 * rescale[..., None]
    if (mask.causal and lq == lk == 1 and s0 is not None and log_g is None and key_log_scale is None
            and phi is None and not partial):
        return _one_token(fq, fk, v, s0, z0, state.length, dtype, return_state)
    augment = partial and normalize  # the denominator as one more value column of ones
    if augment:
        v = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)
        if s0 is not None:
            s0, z0 = torch.cat([s0, z0.unsqueeze(-1)], dim=-1), None
    norm = normalize and not augment
    if mask.causal and lq < lk:  # keys before the first query: fold them into the initial state
        p = lk - lq
        kp = fk[:, :, :p] if phi is None else phi(fk[:, :, :p], False)
        lp = log_g if log_g is None or not per_token else log_g[..., :p]
        s0, z0 = linear_state(kp, v[:, :, :p], log_g=lp, s0=s0, z0=z0, normalize=norm)
        fk, v = fk[:, :, p:], v[:, :, p:]
        if per_token:
            log_g = log_g[..., p:]
    kernel = tiled_linear_attention
    if compiled.active() and fq.device.type == "cpu":  # the compiled backend's kernels (backend="cpp")
        kernel = compiled.linear_attention
    out, den, s_n, z_n = kernel(fq, fk, v, phi=phi, log_g=log_g, s0=s0, z0=z0, causal=mask.causal,
                                normalize=norm, chunk=chunk)
    if augment:
        out, den, s_n, z_n = out[..., :-1], out[..., -1], s_n[..., :-1], s_n[..., -1]
    elif den is not None:
        den = den.squeeze(-1)
    result = (out, den if normalize else None) if partial else out.to(dtype)
    if partial and m_key is not None:  # each query's units: M at its own position
        m_q = m_key[..., lk - lq:] if mask.causal else m_key.expand(*m_key.shape[:2], lq)
        result = (*result, m_q.repeat_interleave(fq.shape[1] // fk.shape[1], dim=1))
    if not return_state:
        return result
    m_n = None if m_key is None else m_key[..., -1] if lk else m0
    return result, LinearState(s_n, z_n, (0 if state is None else state.length) + lk, m_n)


def _one_token(fq: Tensor, fk: Tensor, v: Tensor, s0: Tensor, z0: Tensor | None, length: int, dtype: torch.dtype,
               return_state: bool) -> Tensor | tuple:
    """One decoding step without gates: ``S += k'^T v``, ``z += k'``, ``out = q' S / q' z`` -- the causal
    kernels' result for a single token, in a handful of ops (a step's cost is then per-call overhead,
    not a chunked sweep). Query heads are grouped over their key/value head."""
    b, hkv, d, e = s0.shape
    g = fq.shape[1] // hkv
    s_n = torch.baddbmm(s0.reshape(b * hkv, d, e), fk.reshape(b * hkv, d, 1), v.reshape(b * hkv, 1, e))
    q = fq.reshape(b * hkv, g, d)
    out = torch.bmm(q, s_n).view(b, hkv * g, 1, e)
    z_n = None
    if z0 is not None:
        z_n = z0 + fk[:, :, 0]
        den = torch.bmm(q, z_n.reshape(b * hkv, d, 1)).view(b, hkv * g, 1, 1)
        out = out / torch.where(den == 0, torch.ones_like(den), den)
    out = out.to(dtype)
    return (out, LinearState(s_n.view(b, hkv, d, e), z_n, length + 1, None)) if return_state else out


def dense_kernel_attention(
    fq: Tensor, fk: Tensor, v: Tensor, mask: Mask, *, decay: Tensor | None = None,
    log_decay: Tensor | None = None, normalize: bool = True, state: LinearState | None = None,
    key_log_scale: Tensor | None = None,
    scores: Tensor | None = None,
) -> Tensor:
    """The reference: ``A = phi(Q) phi(K)^T`` (times ``prod_{s<r<=t} g_r``), masked, ``A V`` plus the
    initial state's ``prod_{r<=t} g_r q'_t S_0``, row-normalised. Dense O(n^2), written as the formula.
    Grouped-query inputs (fewer key/value heads; gates and state per key/value head) are expanded.
    With ``key_log_scale`` ``c`` the key features are ``fk exp(c_s)``: row ``t`` is computed with the
    factor ``exp(c_s - m_t)`` (``m_t`` its largest visible ``c``, and the state's ``log_scale``), which
    cancels in the normalisation.

    ``scores`` ``(B, H, Lq, Lk)``: ``A`` itself where it is written otherwise than as a product of
    features (a positional rotation written as ``cos(theta (s - t))``); ``fq, fk`` then only give shapes."""
    lq, lk = fq.shape[2], fk.shape[2]
    w0 = None
    log_g, _ = log_gates(decay, log_decay, fk, mask.key_keep(fq.dtype))
    groups = fq.shape[1] // fk.shape[1]
    if key_log_scale is not None and not normalize:
        raise ValueError("key_log_scale needs normalize=True (the shift cancels only in num / den)")
    if groups > 1:
        fk, v = repeat_kv(fk, groups), repeat_kv(v, groups)
        log_g = None if log_g is None else log_g.repeat_interleave(groups, dim=1)
        key_log_scale = None if key_log_scale is None else key_log_scale.repeat_interleave(groups, dim=1)
        if state is not None:
            z = None if state.z is None else state.z.repeat_interleave(groups, dim=1)
            ls = None if state.log_scale is None else state.log_scale.repeat_interleave(groups, dim=1)
            state = LinearState(repeat_kv(state.kv, groups), z, state.length, ls)
    allowed = mask.allowed(fq.device)
    shift = shift0 = None
    if key_log_scale is not None:  # exp(c_s - m_t) per (query, key), exp(m0 - m_t) for the state
        c = key_log_scale.to(gate_dtype(fq.device))[..., None, :].expand(*fk.shape[:2], lq, lk)
        if allowed is not None:
            c = c.masked_fill(~allowed, float("-inf"))
        m = c.detach().amax(-1, keepdim=True) if lk else c.new_full((*c.shape[:3], 1), float("-inf"))
        if state is not None:
            m0 = c.new_zeros(c.shape[:2]) if state.log_scale is None else state.log_scale.to(c)
            m = torch.maximum(m, m0[..., None, None])
            shift0 = (m0[..., None, None] - m).exp().to(fq.dtype)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        shift = (c - m).exp().to(fq.dtype)
    elif state is not None and state.log_scale is not None:
        raise ValueError("the state is in shifted units (log_scale); continue it with key_log_scale")
    a = torch.matmul(fq, fk.transpose(-1, -2)) if scores is None else scores
    if shift is not None:
        a = a * shift
    if log_g is not None:
        cum = log_g.to(gate_dtype(log_g.device)).expand(*log_g.shape[:2], lk).cumsum(-1)  # A_s = sum_{r<=s} log g_r
        a_t = cum[..., torch.arange(lq, device=fq.device) + mask.offset]  # A at each query's position
        a = a * torch.exp((a_t[..., :, None] - cum[..., None, :]).clamp_max(0)).to(a.dtype)
        w0 = a_t.exp().to(a.dtype).unsqueeze(-1)
    if shift0 is not None:
        w0 = shift0 if w0 is None else w0 * shift0
    if allowed is not None:
        a = a * allowed.to(a.dtype)
    out = torch.matmul(a, v)
    den = a.sum(dim=-1, keepdim=True)
    if state is not None:
        out_0 = torch.matmul(fq, state.kv)
        den_0 = torch.matmul(fq, state.z.unsqueeze(-1)) if normalize else 0
        out = out + (out_0 if w0 is None else w0 * out_0)
        den = den + (den_0 if w0 is None else w0 * den_0)
    return _safe_divide(out, den) if normalize else out
