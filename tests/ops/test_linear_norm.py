"""SRMSNorm (the output norm of lightning / transnormer): its one-pass backward equals autograd's on the
formula, and a zero row stays zero with a finite gradient."""

from __future__ import annotations

import torch

from fastattn.mechanisms.kernel.decayed import srms_norm


def test_srms_norm_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 7, 5, generator=g, dtype=torch.float64)
    x[0, 0, 0] = 0
    x.requires_grad_()
    out = srms_norm(x)
    ref = x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    torch.testing.assert_close(out, ref)
    assert (out[0, 0, 0] == 0).all()
    go = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got, want = torch.autograd.grad(out, x, go)[0], torch.autograd.grad(ref, x, go)[0]
    torch.testing.assert_close(got, want)
    assert torch.isfinite(got).all()
    half = srms_norm(x.detach().half())
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.double(), ref.detach(), atol=2e-3, rtol=2e-3)
