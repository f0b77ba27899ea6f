"""ops/ema: the FFT form of the multi-dimensional damped EMA equals its recurrence, carries its state
across pieces, and keeps half precision finite."""

from __future__ import annotations

import pytest
import torch

from fastattn.ops.ema import damped_ema, damped_ema_recurrence, ema_kernel


def _coeffs(d=5, n=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    decay = torch.rand(d, n, generator=g, dtype=dtype) * 0.98 + 0.01
    return decay, torch.randn(d, n, generator=g, dtype=dtype), torch.randn(d, n, generator=g, dtype=dtype)


def _x(b=2, l=23, d=5, seed=1, dtype=torch.float64):
    return torch.randn(b, l, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("length", [1, 23, 64])
@pytest.mark.parametrize("with_state", [False, True])
def test_fft_equals_the_recurrence_values_state_and_grads(length, with_state):
    q, a, c = (t.requires_grad_(True) for t in _coeffs())
    x = _x(l=length).requires_grad_(True)
    h0 = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True) if with_state else None
    y, h = damped_ema(x, q, a, c, h0)
    yr, hr = damped_ema_recurrence(x, q, a, c, h0)
    torch.testing.assert_close(y, yr, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h, hr, rtol=1e-10, atol=1e-12)
    w, wh = torch.randn_like(y), torch.randn_like(h)
    inputs = [x, q, a, c] + ([h0] if with_state else [])
    g = torch.autograd.grad((y * w).sum() + (h * wh).sum(), inputs)
    gr = torch.autograd.grad((yr * w).sum() + (hr * wh).sum(), inputs)
    for u, v in zip(g, gr):
        torch.testing.assert_close(u, v, rtol=1e-9, atol=1e-11)


def test_the_kernel_is_the_impulse_response():
    q, a, c = _coeffs()
    impulse = torch.zeros(1, 9, 5, dtype=torch.float64)
    impulse[:, 0] = 1
    y, _ = damped_ema_recurrence(impulse, q, a, c)
    torch.testing.assert_close(y[0].T, ema_kernel(q, a, c, 9), rtol=1e-12, atol=1e-14)


def test_pieces_with_carried_state_equal_one_call():
    q, a, c = _coeffs()
    x = _x(l=31)
    y, h = damped_ema(x, q, a, c)
    parts, state = [], None
    for piece in x.split([1, 7, 16, 7], dim=1):
        out, state = damped_ema(piece, q, a, c, state)
        parts.append(out)
    torch.testing.assert_close(torch.cat(parts, 1), y, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(state, h, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    q, a, c = _coeffs()
    x = _x(l=200)
    y, _ = damped_ema(x.to(dtype), q.to(dtype), a.to(dtype), c.to(dtype))
    ref, _ = damped_ema_recurrence(x, q, a, c)
    assert y.dtype == dtype and torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), ref, rtol=0.05, atol=0.1)


def test_shapes_are_checked():
    q, a, c = _coeffs()
    with pytest.raises(ValueError, match="x must be"):
        damped_ema(torch.zeros(3, 5), q, a, c)
    with pytest.raises(ValueError, match="decay must be"):
        damped_ema(_x(), q[:4], a, c)
    with pytest.raises(ValueError, match="state must be"):
        damped_ema(_x(), q, a, c, torch.zeros(1, 5, 3, dtype=torch.float64))
