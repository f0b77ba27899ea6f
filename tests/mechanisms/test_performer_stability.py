"""Performer with keys of large norm (issue 17, defect 2): the positive features ``exp(w . k - |k|^2/2)``
underflow in float32 / half once ``|k|^2 / 2`` passes ~90, and 0 / 0 rows came out as zeros. The keys'
log-scales now ride with the op's running maximum: float32 and half agree with float64, no future key
changes a past output, decoding equals the forward, and values and gradients equal the dense reference
and a log-space literal evaluation of the estimator."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import fastattn
from fastattn.core.masks import Mask

from helpers import grads, make_mech


def _issue_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 257, 128, generator=g) for _ in range(3))
    return (q * 5).to(dtype), (k * 5).to(dtype), v.to(dtype)


@pytest.mark.parametrize("causal", [False, True])
def test_issue_reproduction_float32_matches_float64(causal):
    """``q, k ~ 5 randn`` at head dim 128 (key norms ~57): 84% all-zero rows in float32 before."""
    out = {}
    for dt in (torch.float32, torch.float64):
        q, k, v = _issue_inputs(dt)
        out[dt] = fastattn.attention(q, k, v, "performer", is_causal=causal,
                                     generator=torch.Generator().manual_seed(1)).double()
    o32, o64 = out[torch.float32], out[torch.float64]
    assert not (o32.abs().sum(-1) == 0).any()
    assert not (o64.abs().sum(-1) == 0).any()
    assert (o32 - o64).norm() / o64.norm() < 1e-4
    assert ((o32 - o64).norm(dim=-1) / o64.norm(dim=-1)).max() < 1e-3


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 0.05), (torch.float16, 0.01)])
def test_half_precision_layer_is_finite_and_close(dtype, tol):
    """A performer layer in half precision on inputs whose keys have norms ~50 gives the float64 result
    of the same (rounded) weights and inputs, up to the rounding of the half projections."""
    base = fastattn.MultiheadAttention(256, 2, "performer", batch_first=True,
                                       generator=torch.Generator().manual_seed(1)).double()
    x = torch.randn(2, 200, 256, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 5
    layer = copy.deepcopy(base).to(dtype)
    xh = x.to(dtype)
    with torch.no_grad():
        out = layer(xh, xh, xh, need_weights=False)[0].double()
        want = copy.deepcopy(layer).double()(xh.double(), xh.double(), xh.double(), need_weights=False)[0]
    assert torch.isfinite(out).all() and not (out.abs().sum(-1) == 0).any()
    assert (out - want).norm() / want.norm() < tol


def test_fused_and_unfused_half_inputs_agree():
    """Half inputs through ``fastattn.attention`` equal the float64 run on the same rounded inputs."""
    for dt in (torch.bfloat16, torch.float16):
        q, k, v = _issue_inputs(dt)
        got = fastattn.attention(q, k, v, "performer", is_causal=True, generator=torch.Generator().manual_seed(1))
        want = fastattn.attention(q.double(), k.double(), v.double(), "performer", is_causal=True,
                                  generator=torch.Generator().manual_seed(1))
        assert got.dtype == dt and torch.isfinite(got).all()
        assert (got.double() - want).norm() / want.norm() < 1e-2


@pytest.mark.parametrize("chunk", [16, 128])
def test_huge_future_key_changes_no_past_output(chunk):
    """A global maximum over keys would let a later key rescale earlier outputs (and underflow them):
    with a running maximum the outputs before it are bit-identical with and without it. The keys of
    largest log-scale are those at ``k = w_j / sqrt(scale)`` (``c = |w_j|^2 / 2``), ~150 above the
    log-scales of the issue's keys of norm ~57 -- ``exp(-150)`` underflows in float32."""
    spec = fastattn.get_method("performer")
    mech = make_mech(spec, h=1, hkv=1, e=128, num_features=256, chunk=chunk)
    q, k, v = _issue_inputs()
    scale = 128 ** -0.5
    w = mech.projection[mech.projection.norm(dim=-1).argmax()]
    out = mech.run(q, k, v, is_causal=True)
    for pos in (256, 200, 130):
        k2 = k.clone()
        k2[:, :, pos] = w / math.sqrt(scale)
        c = mech.key_log_scale(k2, scale=scale, mask=Mask(257, 257))
        others = torch.cat([c[..., :pos], c[..., pos + 1:]], dim=-1).amax(-1)
        assert (c[..., pos] - others > 100).all()  # it dominates every other key
        out2 = mech.run(q, k2, v, is_causal=True)
        assert torch.equal(out[:, :, :pos], out2[:, :, :pos]), pos
        assert torch.isfinite(out2).all() and not (out2.abs().sum(-1) == 0).any()


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_decoding_token_by_token_equals_causal_forward(dtype, tol):
    """Steps carry the running maximum in the state (``LinearState.log_scale``); keys grow over time so
    it is rescaled often; a prompt of 7 tokens, then one token at a time."""
    layer = fastattn.MultiheadAttention(64, 2, "performer", batch_first=True,
                                        generator=torch.Generator().manual_seed(2)).to(dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 40, 64, generator=g, dtype=dtype) * torch.linspace(1, 12, 40, dtype=dtype)[:, None]
    with torch.no_grad():
        want = layer(x, x, x, is_causal=True, attn_mask=None, need_weights=False)[0]
        outs, state = [], None
        for a, b in [(0, 7)] + [(t, t + 1) for t in range(7, 40)]:
            o, state = layer.step(x[:, a:b], state)
            outs.append(o)
    got = torch.cat(outs, 1)
    assert state.log_scale is not None and state.log_scale.shape == (2, 2)
    assert not (got.abs().sum(-1) == 0).any()
    assert (got - want).norm() / want.norm() < tol
    ref = fastattn.MultiheadAttention(64, 2, "performer", batch_first=True,
                                      generator=torch.Generator().manual_seed(2)).double()
    ref.load_state_dict({n: t.double() for n, t in layer.state_dict().items()})
    with torch.no_grad():
        exact = ref(x.double(), x.double(), x.double(), is_causal=True, need_weights=False)[0]
    assert (got.double() - exact).norm() / exact.norm() < tol


def _log_space_literal(mech, q, k, v, scale, causal):
    """The estimator ``sum_s (sum_j exp(a_tj + b_sj)) v_s / sum_s sum_j exp(a_tj + b_sj)`` with
    ``a, b = w . x - |x|^2 / 2`` evaluated by logsumexp over (key, feature) in float64: no feature is
    ever formed, so nothing underflows."""
    w = mech.projection.double()
    qs, ks = q * math.sqrt(scale), k * math.sqrt(scale)
    a = qs @ w.T - 0.5 * (qs * qs).sum(-1, keepdim=True)
    b = ks @ w.T - 0.5 * (ks * ks).sum(-1, keepdim=True)
    logw = torch.logsumexp(a[..., :, None, :] + b[..., None, :, :], dim=-1)  # (B, H, Lq, Lk)
    if causal:
        n = q.shape[2]
        logw = logw.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(logw, dim=-1) @ v


@pytest.mark.parametrize("causal", [True, False])
def test_values_and_gradients_equal_reference_and_literal_float64(causal):
    """Keys so large (``|k|^2 / 2`` ~ 1200 after scaling) that even float64 features underflow: the
    efficient forward and the dense reference agree on values and gradients, and both equal the
    log-space literal estimator (the gradient of ``-|k|^2 / 2`` in the key's log-scale included)."""
    spec = fastattn.get_method("performer")
    mech = make_mech(spec, h=2, hkv=2, e=16, num_features=24, chunk=8).double()
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 37, 16, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, 37, 16, generator=g, dtype=torch.float64) * 25
    v = torch.randn(2, 2, 37, 5, generator=g, dtype=torch.float64)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = mech.run(q, k, v, is_causal=causal)
    ref = mech.run(q, k, v, is_causal=causal, reference=True)
    lit = _log_space_literal(mech, q, k, v, 16 ** -0.5, causal)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(out, lit, rtol=1e-9, atol=1e-10)
    for a, b, c in zip(grads(out, (q, k, v)), grads(ref, (q, k, v)), grads(lit, (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)
        # gradients of q, k are ~1e-8 here (one key dominates), cancellations of O(1) terms
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-12)


def test_padding_with_large_keys_equals_truncation():
    """A padded key of enormous norm (it would set a global maximum) is ignored: padded = truncated."""
    spec = fastattn.get_method("performer")
    mech = make_mech(spec, h=2, hkv=2, e=32, num_features=32, chunk=8)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 30, 32, generator=g) * 4 for _ in range(3))
    k[1, :, 20:] *= 100
    pad = torch.zeros(2, 30, dtype=torch.bool)
    pad[1, 20:] = True
    for causal in (True, False):
        out = mech.run(q, k, v, key_padding_mask=pad, is_causal=causal)
        alone = mech.run(q[1:, :, :20], k[1:, :, :20], v[1:, :, :20], is_causal=causal)
        torch.testing.assert_close(out[1:, :, :20], alone, rtol=1e-5, atol=1e-6)
        assert not (out[:, :, :20].abs().sum(-1) == 0).any()


def test_relu_kernel_has_no_log_scale():
    spec = fastattn.get_method("performer")
    mech = make_mech(spec, kernel="relu")
    assert mech.key_log_scale(torch.randn(1, 2, 3, 16), scale=0.25, mask=Mask(3, 3)) is None
