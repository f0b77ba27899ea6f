"""gmm_window (Graves 2013, arXiv:1308.0850, section 5.1): the defining properties.

``(α̂, β̂, κ̂) = W h_t + b``; ``α = exp(α̂)``, ``β = exp(β̂)``, ``κ_t = κ_{t-1} + exp(κ̂_t)``;
``φ(t, u) = Σ_k α_k exp(-β_k (κ_k - u)^2)`` over 1-based positions ``u``, unnormalised; ``w_t = Σ_u φ(t,
u) c_u``. The means only move forward, decoding carries ``κ``, padding gets no weight.
"""

from __future__ import annotations

import pytest
import torch

import fastattn
from fastattn.mechanisms.classic.gmm_window import GMMWindowState
from helpers import alignment, grads

B, LQ, LK, DQ, DK, K = 3, 7, 10, 5, 4, 3


def make(seed: int = 0, **options):
    return alignment("gmm_window", DQ, DK, seed=seed, init_scale=0.5, **{"components": K, **options})


def inputs(seed: int = 0, requires_grad: bool = False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, LQ, DQ, generator=g, dtype=torch.float64, requires_grad=requires_grad)
    k = torch.randn(B, LK, DK, generator=g, dtype=torch.float64, requires_grad=requires_grad)
    return q, k


def padding() -> torch.Tensor:
    m = torch.zeros(B, LK, dtype=torch.bool)
    m[1, 6:] = True
    m[2, 2:] = True
    return m


def graves(a, q, lk):
    """The paper's equations written independently (numbers from the layer's W and b)."""
    hat = q @ a.attn.window.weight.T + a.attn.window.bias
    alpha, beta, khat = hat.exp().chunk(3, dim=-1)
    kappa = torch.cumsum(khat, dim=1)
    u = torch.arange(1, lk + 1, dtype=q.dtype)
    return (alpha[..., None] * torch.exp(-beta[..., None] * (kappa[..., None] - u) ** 2)).sum(-2), kappa


def test_equals_the_paper_unnormalised_and_zero_on_padding():
    a = make(chunk_bytes=300)  # several query chunks
    q, k = inputs(requires_grad=True)
    kpm = padding()
    ctx, w = a(q, k, key_padding_mask=kpm)
    phi, _ = graves(a, q, LK)
    phi = phi.masked_fill(kpm[:, None], 0.0)
    torch.testing.assert_close(w, phi, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(ctx, phi @ k, rtol=1e-12, atol=1e-13)
    assert (w >= 0).all() and (w[kpm[:, None].expand_as(w)] == 0).all()
    assert not torch.allclose(w.sum(-1), torch.ones(B, LQ, dtype=w.dtype))  # not normalised
    params = list(a.parameters())
    for g1, g2 in zip(grads(ctx, [q, k, *params]), grads(phi @ k, [q, k, *params])):
        if g2 is None:
            assert g1 is None or (g1 == 0).all()
        else:
            torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)


def test_means_only_move_forward():
    for param in ("exp", "softplus"):
        a = make(parameterization=param)
        with torch.no_grad():
            a.attn.window.bias[2 * K:] -= 6.0  # tiny steps: still strictly increasing
        q, _ = inputs()
        _, _, kappa = a.attn.parameters_of(q)
        steps = kappa.diff(dim=1)
        assert (steps > 0).all() and (kappa[:, 0] > 0).all()


def test_one_sharp_component_selects_the_nearest_position():
    a = make(components=1)
    q, k = inputs()
    with torch.no_grad():
        a.attn.window.weight.zero_()
        a.attn.window.bias.copy_(torch.tensor([0.0, 6.0, 0.0], dtype=torch.float64))  # α = 1, β = e^6, κ += 1
    _, w = a(q, k)
    # κ_t = t + 1 (1-based positions): all weight on slot t
    torch.testing.assert_close(w, torch.eye(LQ, LK, dtype=w.dtype).expand(B, -1, -1), rtol=0, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_steps_of_any_size_equal_the_forward_and_carry_kappa(chunk):
    a = make()
    q, k = inputs()
    kpm = padding()
    ctx, w = a(q, k, key_padding_mask=kpm)
    _, kappa = graves(a, q, LK)
    state = None
    for t0 in range(0, LQ, chunk):
        c, wt, state = a.step(q[:, t0:t0 + chunk], k, state, kpm)
        torch.testing.assert_close(c, ctx[:, t0:t0 + chunk], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(wt, w[:, t0:t0 + chunk], rtol=1e-12, atol=1e-12)
        assert isinstance(state, GMMWindowState)
        torch.testing.assert_close(state.kappa, kappa[:, min(t0 + chunk, LQ) - 1], rtol=1e-12, atol=1e-12)
    assert state.length == LQ
    # the state moves with its tensors
    assert state.to("cpu").kappa.device.type == "cpu"
    # a step from a fresh state is not a step from the carried one: the state is used
    c_fresh, _, _ = a.step(q[:, :1], k, None, kpm)
    c_cont, _, _ = a.step(q[:, :1], k, state, kpm)
    assert not torch.allclose(c_fresh, c_cont)


def test_softplus_parameterisation_matches_its_reference_and_differs_from_exp():
    a, e = make(parameterization="softplus"), make()
    q, k = inputs()
    c, w = a(q, k, key_padding_mask=padding())
    cr, wr = a.reference(q, k, key_padding_mask=padding())
    torch.testing.assert_close(w, wr, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(c, cr, rtol=1e-12, atol=1e-13)
    assert not torch.allclose(w, e(q, k, key_padding_mask=padding())[1])


def test_bad_options():
    for bad in ({"components": 0}, {"parameterization": "relu"}, {"chunk_bytes": 0}):
        with pytest.raises(ValueError):
            fastattn.AlignmentAttention(4, 4, "gmm_window", **bad)
