"""Defining properties of performer, lightning, transnormer, fastmax, rfa and hedgehog."""

from __future__ import annotations

import math

import pytest
import torch

import fastattn
from fastattn.core.masks import Mask
from fastattn.mechanisms.kernel.decayed import srms_norm, tnl_decay
from fastattn.mechanisms.kernel.fastmax import fastmax_normalize, taylor_features
from fastattn.ops.features import draw_gaussian_projection

from helpers import grads, make_mech, qkv, rel_err


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests run many tiny ops, which a second (shared, oversubscribed) thread only slows down."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- performer
def _performer(m, orthogonal=True, seed=0, e=8):
    spec = fastattn.get_method("performer")
    return make_mech(spec, h=1, hkv=1, e=e, seed=seed, num_features=m, orthogonal=orthogonal).double()


def _kernel_draws(m, orthogonal, draws, e=8):
    """``draws`` independent estimates of ``exp(q . k)``: a batch of draws is one long draw cut into
    ``m``-row pieces (independent i.i.d. rows, or independent orthogonal blocks when ``d | m``)."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(4, e, generator=g, dtype=torch.float64) * 0.3
    k = torch.randn(5, e, generator=g, dtype=torch.float64) * 0.3
    exact = torch.exp(q @ k.T)
    w = draw_gaussian_projection(draws * m, e, orthogonal=orthogonal, generator=torch.Generator().manual_seed(11),
                                 dtype=torch.float64).view(draws, m, e)
    fq = torch.exp(torch.einsum("rme,ie->rim", w, q) - 0.5 * (q * q).sum(-1)[None, :, None])
    fk = torch.exp(torch.einsum("rme,je->rjm", w, k) - 0.5 * (k * k).sum(-1)[None, :, None])
    return fq @ fk.transpose(-1, -2) / m, exact


def test_performer_kernel_estimate_uses_its_features():
    mech = _performer(16)
    q, k = torch.randn(3, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    w = mech.projection
    want = torch.exp(q @ w.T - 0.5 * (q * q).sum(-1, keepdim=True)) @ torch.exp(
        k @ w.T - 0.5 * (k * k).sum(-1, keepdim=True)).T / 16
    torch.testing.assert_close(mech.kernel_estimate(q, k), want)
    # the stabilised features, keys times exp(key_log_scale), give the estimate up to a per-query factor
    mask = Mask(lq=3, lk=4)
    fq = mech.features(q, is_query=True, scale=1.0, mask=mask)
    fk = mech.features(k, is_query=False, scale=1.0, mask=mask)
    fk = fk * mech.key_log_scale(k, scale=1.0, mask=mask).exp()[:, None]
    ratio = (fq @ fk.T) / want
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio))


def test_performer_estimate_is_unbiased():
    est, exact = _kernel_draws(m=4, orthogonal=False, draws=20000)
    mean, sem = est.mean(0), est.std(0) / math.sqrt(est.shape[0])
    assert ((mean - exact).abs() < 4 * sem + 1e-3).all()
    est, exact = _kernel_draws(m=8, orthogonal=True, draws=20000)  # orthogonal: still unbiased
    mean, sem = est.mean(0), est.std(0) / math.sqrt(est.shape[0])
    assert ((mean - exact).abs() < 4 * sem + 1e-3).all()


def test_performer_error_falls_with_features_and_orthogonal_no_worse():
    mse = {}
    for orth in (False, True):
        for m in (8, 128):
            est, exact = _kernel_draws(m=m, orthogonal=orth, draws=2000)
            mse[orth, m] = ((est - exact) ** 2).mean().item()
    assert mse[False, 128] < mse[False, 8] / 4 and mse[True, 128] < mse[True, 8] / 4
    assert mse[True, 8] <= 1.1 * mse[False, 8] and mse[True, 128] <= 1.1 * mse[False, 128]


def test_performer_approximates_softmax_attention():
    q, k, v = qkv(h=1, hkv=1, e=8, lq=40, b=1)
    q, k = q * 0.5, k * 0.5
    exact = fastattn.attention(q, k, v, method="softmax")
    errs = []
    for m in (16, 1024):
        spec = fastattn.get_method("performer")
        mech = make_mech(spec, h=1, hkv=1, e=8, num_features=m).double()
        errs.append(rel_err(mech.run(q, k, v), exact))
    assert errs[1] < 0.2 and errs[1] < errs[0] / 2


def test_orthogonal_projection_rows_are_orthogonal_within_blocks():
    w = draw_gaussian_projection(16, 8, orthogonal=True, generator=torch.Generator().manual_seed(0),
                                 dtype=torch.float64)
    u = w[:8] / w[:8].norm(dim=1, keepdim=True)
    torch.testing.assert_close(u @ u.T, torch.eye(8, dtype=torch.float64))


def test_performer_redraw_and_generator_reproducibility():
    spec = fastattn.get_method("performer")
    a = make_mech(spec, seed=4)
    b = make_mech(spec, seed=4)
    assert torch.equal(a.projection, b.projection)
    before = a.projection.clone()
    a.redraw()
    assert not torch.equal(a.projection, before)
    assert "projection" in a.state_dict()


def test_performer_no_overflow_at_65536_and_no_future_dependence():
    spec = fastattn.get_method("performer")
    mech = make_mech(spec, h=1, hkv=1, e=16, num_features=16, chunk=1024)
    g = torch.Generator().manual_seed(0)
    n = 65536
    q, k, v = (torch.randn(1, 1, n, 16, generator=g) * 3 for _ in range(3))
    out = mech.run(q, k, v, is_causal=True)
    assert torch.isfinite(out).all()
    # shifted key features are at most 1 (each key's largest is 1), whatever the key
    worst = mech.projection[None, None] / math.sqrt(0.25)
    fk = mech.features(torch.cat([worst, k[:, :, :100] * 100], dim=2), is_query=False, scale=0.25, mask=Mask(1, 1))
    torch.testing.assert_close(fk.amax(-1), torch.ones(fk.shape[:-1]))
    # a huge future key changes nothing in the past (no global max over keys), even numerically
    k2 = k.clone()
    k2[:, :, -1] = 40.0
    out2 = mech.run(q, k2, v, is_causal=True)
    assert torch.equal(out[:, :, :-1024], out2[:, :, :-1024])


# ---------------------------------------------------------------- lightning / transnormer
def _decay_masked_dense(fq, fk, v, lam, causal=True):
    n = fq.shape[2]
    t = torch.arange(n)
    dist = (t[:, None] - t[None, :]).double()
    m = torch.where(dist >= 0, lam.view(-1, 1, 1).double() ** dist.clamp_min(0), torch.zeros(()).double())
    return srms_norm((fq @ fk.transpose(-1, -2) * m) @ v)


@pytest.mark.parametrize("name,act", [("lightning", lambda x: x), ("transnormer", torch.nn.functional.silu)])
def test_decayed_equals_dense_decay_masked_reference(name, act):
    spec = fastattn.get_method(name)
    q, k, v = qkv(hkv=4, requires_grad=True)
    mech = make_mech(spec, hkv=4, chunk=16, decay="paper", norm="srms").double()  # the paper's text
    out = mech.run(q, k, v, is_causal=True)
    lam = tnl_decay(4, 8.0, 0.0)
    want = _decay_masked_dense(act(q), act(k), v, lam)
    torch.testing.assert_close(out, want)
    for a, b in zip(grads(out, (q, k, v)), grads(want, (q, k, v))):
        torch.testing.assert_close(a, b)


def test_tnl_decay_rates():
    lam = tnl_decay(8, 8.0, 0.0)
    assert lam[0] == 1.0 and (lam[1:] < lam[:-1]).all()
    torch.testing.assert_close(lam[4], torch.tensor(math.exp(-4.0), dtype=torch.float64))
    assert (tnl_decay(8, 8.0, 0.5) > lam[:]).sum() == 7  # deeper layers decay less


# ---------------------------------------------------------------- fastmax
@pytest.mark.parametrize("order", [1, 2])
def test_fastmax_factorised_equals_dense_polynomial(order):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 7, 6, generator=g, dtype=torch.float64), torch.randn(2, 3, 9, 6, generator=g, dtype=torch.float64)
    qh, kh = fastmax_normalize(q), fastmax_normalize(k)
    s = qh @ kh.transpose(-1, -2)
    dense = 1 + s + (s * s / 2 if order == 2 else 0)
    fact = taylor_features(qh, order) @ taylor_features(kh, order).transpose(-1, -2)
    torch.testing.assert_close(fact, dense)
    assert (dense > 0).all()


@pytest.mark.parametrize("order", [1, 2])
def test_fastmax_forward_equals_paper_formula(order):
    spec = fastattn.get_method("fastmax")
    mech = make_mech(spec, order=order)
    q, k, v = qkv()
    for causal in (False, True):
        out = mech.run(q, k, v, is_causal=causal)
        torch.testing.assert_close(out, mech.run(q, k, v, is_causal=causal, reference=True))
    # normalised q, k: invariant to a shift and a scale of each token's features
    torch.testing.assert_close(mech.run(q * 3 + 1, k, v), mech.run(q, k, v))


# ---------------------------------------------------------------- rfa
def _rfa(seed=0, h=2, **opts):
    return make_mech(fastattn.get_method("rfa"), h=h, hkv=h, e=8, seed=seed, **opts).double()


def test_rfa_features_approximate_the_gaussian_kernel_and_error_falls():
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(7, 8, generator=g, dtype=torch.float64), dim=-1)
    sigma = 0.8
    exact = torch.exp(-torch.cdist(x, y) ** 2 / (2 * sigma**2))
    err = {}
    for d in (8, 512):
        errs = []
        for seed in range(20):
            mech = _rfa(seed=seed, num_features=d, sigma=sigma)
            errs.append(((mech.feature_map(x) @ mech.feature_map(y).T - exact) ** 2).mean())
        err[d] = torch.stack(errs).mean().item()
    assert err[512] < err[8] / 10 and err[512] < 1e-3


def test_rfa_gaussian_unbiased_over_draws():
    g = torch.Generator().manual_seed(1)
    x = torch.nn.functional.normalize(torch.randn(3, 8, generator=g, dtype=torch.float64), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(4, 8, generator=g, dtype=torch.float64), dim=-1)
    exact = torch.exp(-torch.cdist(x, y) ** 2 / 2)
    mech = _rfa(num_features=4)
    gen = torch.Generator().manual_seed(2)
    est = []
    for _ in range(3000):
        mech.redraw(gen)
        est.append(mech.feature_map(x) @ mech.feature_map(y).T)
    est = torch.stack(est)
    assert ((est.mean(0) - exact).abs() < 4 * est.std(0) / math.sqrt(3000) + 1e-3).all()


def test_gated_rfa_decays_the_state():
    mech = _rfa(gate=True, num_features=8)
    q, k, v = qkv(h=2, hkv=2, e=8, ev=3, b=1, lq=30)
    logits = torch.zeros(1, 2, 30, dtype=torch.float64, requires_grad=True)  # g = sigmoid(0) = 0.5
    out, state = mech.step_gated(q, k, v, logits, None)
    # literal recurrence S_t = g S_{t-1} + (1 - g) phi(k_t) v_t^T with g = 0.5
    mask = Mask(lq=30, lk=30, causal=True)
    fk = mech.features(k, is_query=False, scale=1.0, mask=mask)
    w = 0.5 ** torch.arange(29, -1, -1, dtype=torch.float64)[:, None] * 0.5
    torch.testing.assert_close(state.kv, torch.einsum("bhld,bhle->bhde", fk * w, v))
    # the influence of the first token on later outputs falls geometrically
    v2 = v.clone()
    v2[:, :, 0] += 10.0
    delta = (mech.run_gated(q, k, v2, logits) - mech.run_gated(q, k, v, logits)).norm(dim=-1)
    assert (delta[..., 20] < 1e-3 * delta[..., 1]).all()
    ungated = _rfa(num_features=8)
    d0 = (ungated.run(q, k, v2, is_causal=True) - ungated.run(q, k, v, is_causal=True)).norm(dim=-1)
    assert (d0[..., 20] > 1e-2 * d0[..., 1]).all()
    # gradients reach the gate logits; the gate needs the layer input (not an operator) and the causal form
    (g,) = torch.autograd.grad(mech.run_gated(q, k, v, logits).sum(), logits)
    assert g.abs().sum() > 0
    with pytest.raises(ValueError, match="layer input"):
        fastattn.attention(q, k, v, method="rfa", is_causal=True, gate=True)
    with pytest.raises(ValueError, match="layer input"):
        mech.run(q, k, v, is_causal=True)
    layer = fastattn.MultiheadAttention(16, 2, "rfa", gate=True, num_features=8, batch_first=True)
    with pytest.raises(ValueError, match="causal"):
        layer(torch.randn(1, 5, 16))


# ---------------------------------------------------------------- hedgehog
def test_hedgehog_mimicry_training_halves_the_kl():
    torch.manual_seed(0)
    spec = fastattn.get_method("hedgehog")
    mech = make_mech(spec, h=2, hkv=2, e=8, distill=True).train()
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 32, 8, generator=g) * 1.5
    k = torch.randn(2, 2, 32, 8, generator=g) * 1.5
    v = torch.randn(2, 2, 32, 8, generator=g)
    opt = torch.optim.Adam(mech.parameters(), lr=2e-2)
    mech.run(q, k, v, is_causal=True)
    first = mech.aux_loss.item()
    mask = Mask(32, 32, causal=True)
    for _ in range(200):  # the loss alone (what forward stores as aux_loss), to keep the test fast
        opt.zero_grad()
        mech.mimicry_loss(q, k, mask, 8 ** -0.5).backward()
        opt.step()
    mech.run(q, k, v, is_causal=True)
    assert mech.aux_loss.item() < first / 2


def test_hedgehog_aux_loss_is_opt_in_and_zero_when_student_equals_teacher():
    spec = fastattn.get_method("hedgehog")
    mech = make_mech(spec, h=2, hkv=2, e=8)
    q, k, v = qkv(h=2, hkv=2, e=8, dtype=torch.float32)
    mech.run(q, k, v)
    assert mech.aux_loss.item() == 0.0
    mech = make_mech(spec, h=2, hkv=2, e=8, distill=True)
    mech.run(q, k, v, is_causal=True)
    assert mech.aux_loss.item() > 0
    # KL is 0 only for identical weights: one key visible (the first query under a causal mask)
    loss_first_row = mech.mimicry_loss(q[:, :, :1], k[:, :, :1], Mask(1, 1, causal=True), 1.0)
    assert loss_first_row.abs().item() < 1e-6
