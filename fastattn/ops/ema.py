"""Multi-dimensional damped exponential moving average: a diagonal linear recurrence per channel.

Every channel ``d`` of ``x (B, L, D)`` runs ``N`` scalar recurrences (the "dimensions" of the EMA) with
its own input weight ``a_{d,n}``, decay ``q_{d,n}`` and output weight ``c_{d,n}``:

    h_t = a * x_t + q * h_{t-1}        (h (B, D, N); h_{-1} = state, zero by default)
    y_t = sum_n c * h_t

Unrolled, ``y`` is the causal convolution of ``x`` with the kernel ``K_d[t] = sum_n c a q^t`` plus the
decaying initial state ``sum_n c q^{t+1} h_{-1}``. :func:`damped_ema` evaluates the convolution by FFT
(``O(B D L log L)``; the kernel ``O(D N L)``) and returns the state after the last token, so that a
sequence split into pieces (decoding) gives the same outputs as in one call.
:func:`damped_ema_recurrence` is the recurrence written literally, token by token: the reference.

Both take the EMA's coefficients as given: how a mechanism parametrises them (Mega: ``a = p beta``,
``q = 1 - p delta`` with sigmoids, ``c = gamma / sqrt(N)``) is its own business. This is not the kernel
engine's per-head decay (one scalar per head acting on a matrix state): here every channel has ``N``
decays of its own.

The FFT runs in float32 for half-precision inputs (float64 stays float64) and the result is cast back.

Example:
    >>> x = torch.randn(2, 100, 8)
    >>> q = torch.rand(8, 4); a = torch.randn(8, 4); c = torch.randn(8, 4)
    >>> y, h = damped_ema(x, q, a, c)                          # y (2, 100, 8), h (2, 8, 4)
    >>> y1, h1 = damped_ema(x[:, :60], q, a, c)
    >>> y2, _ = damped_ema(x[:, 60:], q, a, c, state=h1)      # torch.cat([y1, y2], 1) == y
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["damped_ema", "damped_ema_recurrence", "ema_kernel"]


def _check(x: Tensor, decay: Tensor, weight_in: Tensor, weight_out: Tensor, state: Tensor | None) -> None:
    if x.dim() != 3:
        raise ValueError(f"x must be (B, L, D), got shape {tuple(x.shape)}")
    d = x.shape[-1]
    for name, t in (("decay", decay), ("weight_in", weight_in), ("weight_out", weight_out)):
        if t.dim() != 2 or t.shape[0] != d:
            raise ValueError(f"{name} must be (D, N) with D = {d} channels, got shape {tuple(t.shape)}")
    if not decay.shape == weight_in.shape == weight_out.shape:
        raise ValueError("decay, weight_in and weight_out must have the same shape (D, N)")
    if state is not None and state.shape != (x.shape[0], *decay.shape):
        raise ValueError(f"state must be (B, D, N) = {(x.shape[0], *decay.shape)}, got {tuple(state.shape)}")


def _powers(decay: Tensor, start: int, length: int) -> Tensor:
    """``decay ** t`` for ``t = start .. start + length - 1``: ``(D, N, length)`` (``0 ** 0 = 1``)."""
    t = torch.arange(start, start + length, device=decay.device, dtype=decay.dtype)
    return torch.pow(decay[..., None], t)


def ema_kernel(decay: Tensor, weight_in: Tensor, weight_out: Tensor, length: int) -> Tensor:
    """The convolution kernel ``K[d, t] = sum_n c a q^t`` for ``t < length``: ``(D, length)``."""
    return torch.einsum("dnl,dn->dl", _powers(decay, 0, length), weight_in * weight_out)


def damped_ema(
    x: Tensor, decay: Tensor, weight_in: Tensor, weight_out: Tensor, state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The EMA of ``x (B, L, D)`` (module docstring) by FFT convolution. ``decay``, ``weight_in`` and
    ``weight_out`` are ``(D, N)``; ``state`` ``(B, D, N)`` is the hidden state before the first token
    (``None``: zeros). Returns ``y (B, L, D)`` and the state after the last token ``(B, D, N)``."""
    _check(x, decay, weight_in, weight_out, state)
    n = x.shape[1]
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    xs = x.to(work).transpose(1, 2)  # (B, D, L)
    q, a, c = decay.to(work), weight_in.to(work), weight_out.to(work)
    powers = _powers(q, 0, n + 1)  # q^0 .. q^L
    kernel = torch.einsum("dnl,dn->dl", powers[..., :n], a * c)
    size = 2 * n
    y = torch.fft.irfft(torch.fft.rfft(xs, n=size) * torch.fft.rfft(kernel, n=size), n=size)[..., :n]
    # the state after the last token: sum_t a q^(L-1-t) x_t (+ q^L h0)
    new_state = torch.einsum("bdl,dnl->bdn", xs, powers[..., :n].flip(-1)) * a
    if state is not None:
        h0 = state.to(work)
        y = y + torch.einsum("bdn,dnl->bdl", h0, powers[..., 1:] * c[..., None])
        new_state = new_state + powers[..., n] * h0
    return y.transpose(1, 2).to(x.dtype), new_state.to(x.dtype)


def damped_ema_recurrence(
    x: Tensor, decay: Tensor, weight_in: Tensor, weight_out: Tensor, state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """:func:`damped_ema` as the recurrence ``h_t = a x_t + q h_{t-1}``, ``y_t = sum_n c h_t``, one token
    at a time (the reference)."""
    _check(x, decay, weight_in, weight_out, state)
    h = x.new_zeros(x.shape[0], *decay.shape) if state is None else state
    ys = []
    for t in range(x.shape[1]):
        h = weight_in * x[:, t, :, None] + decay * h
        ys.append((weight_out * h).sum(-1))
    y = torch.stack(ys, 1) if ys else x.new_zeros(x.shape)
    return y, h
