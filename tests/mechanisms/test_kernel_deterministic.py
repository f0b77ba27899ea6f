"""Defining properties of efficient, realtime_fast, flatten, doubly_normalized, fourierformer, primal.

The contract tests (tests/test_contract.py) already compare each fast path with its ``reference`` on
values and gradients; here each mechanism is checked against its paper's formula written independently
in the test, and against the property the paper is about."""

from __future__ import annotations


import pytest
import torch

import fastattn
from fastattn.core.masks import Mask
from fastattn.mechanisms.kernel.flatten import focus
from fastattn.mechanisms.kernel.primal import ksvd_objective, ksvd_objective_dual
from helpers import grads, make_mech, padding_mask, qkv

D64 = torch.float64


def _mech(name, h=4, hkv=2, e=16, **options):
    return make_mech(fastattn.get_method(name), h=h, hkv=hkv, e=e, **options).double()


def _expand(q, k, v):
    g = q.shape[1] // k.shape[1]
    return k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)


def _keep(kpm):  # (B, 1, 1, Lk) 1 = real key
    return (~kpm)[:, None, None, :].to(D64)


# ---- efficient ----------------------------------------------------------------------------------
def test_efficient_scaling_variant_is_exactly_scaled_dot_product_attention():
    q, k, v = qkv()
    kpm = padding_mask()
    out = fastattn.attention(q, k, v, "efficient", normalization="scaling", key_padding_mask=kpm)
    ke, ve = _expand(q, k, v)
    n = (~kpm).sum(dim=1).to(D64).view(-1, 1, 1, 1)  # real keys per batch element
    ref = torch.matmul(torch.matmul(q, ke.transpose(-1, -2)) * _keep(kpm) / n, ve)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_efficient_softmax_variant_equals_its_dense_formula():
    q, k, v = qkv()
    kpm = padding_mask()
    out = fastattn.attention(q, k, v, "efficient", key_padding_mask=kpm)
    ke, ve = _expand(q, k, v)
    rho_q = torch.softmax(q, dim=-1)  # over each query's features
    logits = ke.masked_fill(kpm[:, None, :, None], float("-inf"))
    rho_k = torch.softmax(logits, dim=-2)  # over positions, padding excluded
    torch.testing.assert_close(rho_k.sum(dim=-2), torch.ones_like(rho_k.sum(dim=-2)))
    ref = torch.matmul(torch.matmul(rho_q, rho_k.transpose(-1, -2)), ve)  # the n x n form, then V
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="normalization"):
        fastattn.attention(q, k, v, "efficient", normalization="l2")


# ---- realtime_fast ------------------------------------------------------------------------------
def test_realtime_fast_is_mean_cosine_similarity_attention():
    q, k, v = qkv()
    kpm = padding_mask()
    out = fastattn.attention(q, k, v, "realtime_fast", key_padding_mask=kpm)
    ke, ve = _expand(q, k, v)
    cos = torch.nn.functional.cosine_similarity(q.unsqueeze(3), ke.unsqueeze(2), dim=-1)
    n = (~kpm).sum(dim=1).to(D64).view(-1, 1, 1, 1)
    torch.testing.assert_close(out, torch.matmul(cos * _keep(kpm) / n, ve), rtol=1e-12, atol=1e-12)


def test_realtime_fast_depends_only_on_directions():
    q, k, v = qkv()
    g = torch.Generator().manual_seed(3)
    sq = torch.rand(q.shape[:-1] + (1,), generator=g, dtype=D64) * 10 + 0.01
    sk = torch.rand(k.shape[:-1] + (1,), generator=g, dtype=D64) * 10 + 0.01
    a = fastattn.attention(q, k, v, "realtime_fast")
    torch.testing.assert_close(fastattn.attention(q * sq, k * sk, v, "realtime_fast"), a)
    assert not torch.allclose(fastattn.attention(q, k, v * sk, "realtime_fast"), a)


# ---- flatten ------------------------------------------------------------------------------------
def test_focusing_function_keeps_norms_and_sharpens_towards_dominant_axes():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(200, 16, generator=g, dtype=D64)
    for p in (1.0, 2.0, 3.0, 5.0, 9.0):
        torch.testing.assert_close(focus(x, p).norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(focus(x, 1.0), x)
    assert torch.autograd.gradcheck(lambda t: focus(t, 3.0), x[:4].clone().requires_grad_(True))
    # the direction moves towards the largest coordinate's axis as p grows
    dominant = torch.nn.functional.one_hot(x.argmax(dim=-1), 16).to(D64)
    cos = [torch.nn.functional.cosine_similarity(focus(x, p), dominant, dim=-1) for p in (1.0, 2.0, 3.0, 6.0)]
    for a, b in zip(cos, cos[1:]):
        assert (b > a).all()
    # Proposition 1: vectors sharing their dominant axis grow more similar, others less similar
    same_a = torch.tensor([0.9, 0.5, 0.4, 0.2], dtype=D64)
    same_b = torch.tensor([0.8, 0.1, 0.6, 0.5], dtype=D64)
    other = torch.tensor([0.3, 0.9, 0.2, 0.6], dtype=D64)

    def sim(a, b, p):
        return torch.nn.functional.cosine_similarity(focus(a, p), focus(b, p), dim=0).item()

    assert sim(same_a, same_b, 3.0) > sim(same_a, same_b, 1.0)
    assert sim(same_a, other, 3.0) < sim(same_a, other, 1.0)


def test_focusing_function_is_safe_at_zero_and_at_extremes():
    x = torch.zeros(3, 8, requires_grad=True)
    y = focus(x, 3.0)
    assert (y == 0).all()
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    big = torch.tensor([[1e30, 3e29, 0.0, 1e-30]], dtype=torch.float32)
    out = focus(big, 8.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.norm(), big.norm(), rtol=1e-5, atol=0)


def test_flatten_depthwise_convolution_restores_full_rank():
    n, e = 24, 4
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, n, e, generator=g, dtype=D64)
    k = torch.randn(1, 1, n, e, generator=g, dtype=D64)
    eye = torch.eye(n, dtype=D64)[None, None]  # V = I: the output is the token-mixing matrix itself
    plain = _mech("flatten", h=1, hkv=1, e=e, kernel_size=0).run(q, k, eye)
    with_dwc = _mech("flatten", h=1, hkv=1, e=e, kernel_size=5).run(q, k, eye)
    assert torch.linalg.matrix_rank(plain[0, 0]).item() <= e
    assert torch.linalg.matrix_rank(with_dwc[0, 0]).item() == n
    rows = plain[0, 0].sum(dim=-1)  # the focused linear part is still a row-stochastic average
    torch.testing.assert_close(rows, torch.ones_like(rows))


def test_flatten_rejects_cross_attention_with_its_convolution():
    q, k, v = qkv(lq=9, lk=61)
    with pytest.raises(ValueError, match="Lq == Lk"):
        _mech("flatten").run(q, k, v)
    assert _mech("flatten", kernel_size=0).run(q, k, v).shape == (2, 4, 9, 12)
    with pytest.raises(ValueError, match="kernel_size"):
        fastattn.MultiheadAttention(32, 4, "flatten", kernel_size=4)


# ---- doubly_normalized --------------------------------------------------------------------------
def _explaining_away_inputs():
    q, k, v = qkv(b=1, h=2, hkv=2)
    u = torch.nn.functional.normalize(torch.ones(q.shape[-1], dtype=D64), dim=0)
    q = q + 3.0 * u  # every query shares a direction ...
    k = k.clone()
    k[:, :, 7] = -20.0 * u  # ... that key 7 points away from: it scores far below the others for all queries
    return q, k, v


def test_doubly_normalized_no_key_is_explained_away_and_rows_sum_to_one():
    q, k, v = _explaining_away_inputs()
    mech = _mech("doubly_normalized", h=2, hkv=2)
    w = mech.attention_weights(q, k)
    n = k.shape[2]
    torch.testing.assert_close(w.sum(dim=-1), torch.ones(w.shape[:-1], dtype=D64))
    paid = w.sum(dim=-2)  # total attention each key receives
    assert (paid >= 1.0 / n - 1e-12).all()
    soft = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) / 4.0, dim=-1).sum(dim=-2)
    assert soft[:, :, 7].max() < 1e-3 and paid[:, :, 7].min() >= 1.0 / n  # softmax does explain it away


def test_doubly_normalized_equals_dense_formula():
    q, k, v = qkv(requires_grad=True)
    kpm = padding_mask()
    out = fastattn.attention(q, k, v, "doubly_normalized", key_padding_mask=kpm, query_chunk=7)
    ke, ve = _expand(q, k, v)
    e = torch.exp(torch.matmul(q, ke.transpose(-1, -2)) * q.shape[-1] ** -0.5)
    qkeep = (~kpm)[:, None, :, None].to(D64)  # self-attention: padded positions are not queries
    over_queries = e / (e * qkeep).sum(dim=-2, keepdim=True) * _keep(kpm)
    ref = torch.matmul(over_queries / over_queries.sum(dim=-1, keepdim=True), ve)
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads(out, (q, k, v)), grads(ref, (q, k, v))):
        torch.testing.assert_close(a, b)


def test_doubly_normalized_padded_queries_excluded_only_when_asked():
    q, k, v = qkv()
    kpm = padding_mask()
    q2 = q.clone()
    q2[1, :, 40:] = 50.0  # garbage queries at the padded positions of batch 1
    real = slice(0, 40)
    a = fastattn.attention(q, k, v, "doubly_normalized", key_padding_mask=kpm)
    b = fastattn.attention(q2, k, v, "doubly_normalized", key_padding_mask=kpm)
    torch.testing.assert_close(a[1, :, real], b[1, :, real])
    a = fastattn.attention(q, k, v, "doubly_normalized", key_padding_mask=kpm, exclude_padded_queries=False)
    b = fastattn.attention(q2, k, v, "doubly_normalized", key_padding_mask=kpm, exclude_padded_queries=False)
    assert not torch.allclose(a[1, :, real], b[1, :, real])


def test_doubly_normalized_layer_returns_its_weights():
    layer = fastattn.MultiheadAttention(32, 4, "doubly_normalized", batch_first=True)
    out, w = layer(torch.randn(2, 19, 32) * 30, need_weights=True)  # large scores: exp would overflow
    assert out.shape == (2, 19, 32) and w.shape == (2, 19, 19) and torch.isfinite(out).all()
    torch.testing.assert_close(w.sum(dim=-1), torch.ones(2, 19))
    q, k, _ = qkv()
    kpm = padding_mask()
    mech = _mech("doubly_normalized")
    ke = k.repeat_interleave(2, dim=1)
    torch.testing.assert_close(mech.attention_weights(q, k, key_padding_mask=kpm),
                               mech._literal_weights(q, ke, Mask(lq=61, lk=61, key_padding=kpm), 16 ** -0.5))


# ---- fourierformer ------------------------------------------------------------------------------
def _fourier_literal(q, k, v, radius, power):
    """Nadaraya-Watson with prod_d phi(sin(R x_d) / x_d), loops over dimensions, in float64."""
    ke, ve = _expand(q, k, v)
    w = torch.ones(q.shape[:3] + (ke.shape[2],), dtype=D64)
    for d in range(q.shape[-1]):
        x = q[..., d].unsqueeze(-1) - ke[..., d].unsqueeze(-2)
        w = w * (torch.sin(radius * x) / x) ** power
    return torch.matmul(w, ve) / w.sum(dim=-1, keepdim=True)


@pytest.mark.parametrize("radius,power", [(1.0, 4), (0.5, 2), (2.0, 1), (1.5, 3)])
def test_fourierformer_equals_literal_formula(radius, power):
    q, k, v = qkv(e=6)
    out = fastattn.attention(q, k, v, "fourierformer", radius=radius, power=power, query_chunk=8)
    torch.testing.assert_close(out, _fourier_literal(q, k, v, radius, power), rtol=1e-9, atol=1e-10)


def test_fourierformer_limit_at_equal_query_and_key():
    q, k, v = qkv(h=2, hkv=2, e=6)
    k = k.clone()
    k[:, :, :20] = q[:, :, :20]  # exact ties: q_i - k_i = 0 in every dimension
    q.requires_grad_(True)
    k.requires_grad_(True)
    mech = _mech("fourierformer", h=2, hkv=2, e=6)
    out = mech.run(q, k, v)
    ref = mech.run(q, k, v, reference=True)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads(out, (q, k)), grads(ref, (q, k))):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)
    # the tie weight is the limit R^(D*power): continuous with a near-tie
    near = k.detach().clone()
    near[:, :, :20] += 1e-7
    torch.testing.assert_close(mech.run(q.detach(), near, v), out.detach(), rtol=1e-5, atol=1e-6)


def test_fourierformer_layer_weights_match_the_literal_kernel():
    q, k, _ = qkv(h=2, hkv=2, e=6)
    kpm = padding_mask()
    mech = _mech("fourierformer", h=2, hkv=2, e=6)
    mask = Mask(lq=61, lk=61, key_padding=kpm)
    w = mech.attention_weights(q, k, key_padding_mask=kpm)
    torch.testing.assert_close(w, mech._literal_weights(q, k, mask))
    torch.testing.assert_close(w.sum(dim=-1), torch.ones(w.shape[:-1], dtype=D64))


def test_fourierformer_long_head_dim_does_not_underflow():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 128, 64, generator=g) * 1.5 for _ in range(3))
    x = q.unsqueeze(3) - k.unsqueeze(2)
    naive = (torch.sin(x) / x).pow(4).prod(dim=-1)  # the product of 64 factors below 1, in float32
    assert (naive.sum(dim=-1) == 0).any()  # ... underflows to an all-zero row for some queries
    out = fastattn.attention(q, k, v, "fourierformer")
    assert torch.isfinite(out).all() and (out.abs().sum(dim=-1) > 0).all()
    ref = fastattn.attention(q.double(), k.double(), v.double(), "fourierformer")
    torch.testing.assert_close(out.double(), ref, rtol=1e-3, atol=1e-3)


# ---- primal -------------------------------------------------------------------------------------
def _phi(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=D64)
    return x / x.norm(dim=-1, keepdim=True)


def test_primal_ksvd_objective_primal_equals_dual():
    n, d, s = 30, 8, 5
    phi_q, phi_k = _phi(n, d, 0), _phi(n, d, 1)
    g = torch.Generator().manual_seed(2)
    h_e, h_r = torch.randn(n, s, generator=g, dtype=D64), torch.randn(n, s, generator=g, dtype=D64)
    lam = torch.rand(1, s, generator=g, dtype=D64)
    w_e, w_r = phi_k.T @ h_r, phi_q.T @ h_e  # primal directions in their dual (representer) form
    e, r = phi_q @ w_e, phi_k @ w_r
    primal = ksvd_objective(e[None, None], r[None, None], w_e[None], w_r[None], lam)
    dual = ksvd_objective_dual(phi_q @ phi_k.T, h_e, h_r, lam[0])
    torch.testing.assert_close(primal[0, 0], dual, rtol=1e-12, atol=1e-12)


def test_primal_ksvd_objective_vanishes_at_the_kernel_svd():
    n, d, s = 30, 8, 4
    phi_q, phi_k = _phi(n, d, 3), _phi(n, d, 4)
    u, sig, vh = torch.linalg.svd(phi_q @ phi_k.T)
    u, sig, vt = u[:, :s], sig[:s], vh[:s].T
    lam = (n / sig)[None]  # stationary point of the mean-normalised objective: Lambda / n = Sigma^-1
    w_e, w_r = phi_k.T @ vt / sig, phi_q.T @ u / sig
    e, r = phi_q @ w_e, phi_k @ w_r
    torch.testing.assert_close(e, u)
    j = ksvd_objective(e[None, None], r[None, None], w_e[None], w_r[None], lam)
    assert abs(j.item()) < 1e-10
    j_off = ksvd_objective(e[None, None], r[None, None], w_e[None] * 1.1, w_r[None], lam)
    assert abs(j_off.item()) > 1e-3


def test_primal_aux_loss_is_a_trainable_scalar():
    layer = fastattn.MultiheadAttention(32, 4, "primal", batch_first=True, rank=6)
    x = torch.randn(2, 21, 32)
    out, _ = layer(x)
    loss = layer.aux_loss
    assert loss.dim() == 0 and loss.item() > 0
    gw = torch.autograd.grad(loss, [layer.attn.w_e, layer.attn.w_r, layer.attn.lam])
    assert all(g.abs().sum() > 0 for g in gw)
    with torch.no_grad():
        layer.attn.lam.mul_(2.0)
    layer(x)
    assert not torch.allclose(layer.aux_loss, loss)


def test_primal_values_output_is_the_rank_s_kernel_on_values():
    mech = _mech("primal", rank=6)
    q, k, v = qkv()
    kpm = padding_mask()
    out = mech.run(q, k, v, key_padding_mask=kpm)
    ke, ve = _expand(q, k, v)
    nq, nk = q / q.norm(dim=-1, keepdim=True), ke / ke.norm(dim=-1, keepdim=True)
    e = torch.einsum("bhnd,hds->bhns", nq, mech.w_e)
    r = torch.einsum("bhnd,hds->bhns", nk, mech.w_r)
    n = (~kpm).sum(dim=1).to(D64).view(-1, 1, 1, 1)
    torch.testing.assert_close(out, torch.matmul(e @ r.transpose(-1, -2) * _keep(kpm) / n, ve))


def test_primal_concat_output_is_primalformer():
    layer = fastattn.MultiheadAttention(32, 4, "primal", batch_first=True, rank=6, output="concat").double()
    x = torch.randn(2, 21, 32, dtype=D64)
    out, _ = layer(x)
    mech = layer.attn
    q = layer._heads(layer.q_proj(x), 4)
    k = layer._heads(layer.k_proj(x), 4)
    e = torch.einsum("bhnd,hds->bhns", q / q.norm(dim=-1, keepdim=True), mech.w_e)
    r = torch.einsum("bhnd,hds->bhns", k / k.norm(dim=-1, keepdim=True), mech.w_r)
    heads = mech.concat(torch.cat([e, r], dim=-1))
    ref = layer.out_proj(heads.transpose(1, 2).reshape(2, 21, 32))
    torch.testing.assert_close(out, ref)
    with pytest.raises(ValueError, match="concat"):
        layer(x[:, :5], x, x)
