"""scatterbrain: the defining properties of sparse + low-rank attention (Chen et al. 2021, arXiv 2110.15343).

A window covering every key is exact softmax; an empty window is Performer with the same features; the
implied matrix (exact on the window, phi . phi elsewhere) has rows summing to 1 while the sparse
correction alone has negative entries; the efficient path (window partial + low-rank partials over the
keys outside the window, merged by log-sum-exp) equals the paper's subtract-and-clamp formula; the
partials keep it finite in float32 where the features' exponents are large.
"""

from __future__ import annotations

import pytest
import torch
from helpers import L, assert_fast_equals_reference, grads, make_mech, padding_mask, qkv

import fastattn
from fastattn.core.checks import build_mask, repeat_kv

SPEC = fastattn.get_method("scatterbrain")


@pytest.mark.parametrize("window", [-1, 0, 7, 30])
def test_fast_path_equals_the_formula(window):
    assert_fast_equals_reference(make_mech(SPEC, window=window).double())


@pytest.mark.parametrize("window", [L - 1, 200])
def test_window_covering_every_key_is_softmax(window):
    mech = make_mech(SPEC, window=window).double()
    kpm = padding_mask()
    for causal in (False, True):
        for ref in (False, True):
            q, k, v = qkv(requires_grad=True)
            ours = mech.run(q, k, v, is_causal=causal, key_padding_mask=kpm, reference=ref)
            exact = fastattn.attention(q, k, v, "softmax", is_causal=causal, key_padding_mask=kpm)
            torch.testing.assert_close(ours, exact, rtol=1e-10, atol=1e-12)
            for a, b in zip(grads(ours, (q, k, v)), grads(exact, (q, k, v))):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_empty_window_is_performer_with_the_same_features():
    mech = make_mech(SPEC, window=-1).double()
    perf = make_mech(fastattn.get_method("performer"), num_features=16).double()
    with torch.no_grad():
        perf.projection.copy_(mech.projection)
    kpm = padding_mask()
    for causal in (False, True):
        q, k, v = qkv()
        torch.testing.assert_close(
            mech.run(q, k, v, is_causal=causal, key_padding_mask=kpm),
            perf.run(q, k, v, is_causal=causal, key_padding_mask=kpm), rtol=1e-10, atol=1e-12,
        )


@pytest.mark.parametrize("causal", [False, True])
def test_implied_matrix_rows_sum_to_one_and_correction_is_signed(causal):
    mech = make_mech(SPEC, window=5).double()
    q, k, v = qkv()
    kpm = padding_mask()
    w = mech.attention_weights(q, k, key_padding_mask=kpm, is_causal=causal)
    torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)), rtol=1e-12, atol=1e-12)
    assert (w >= 0).all()  # positive features: exact on the window, phi . phi elsewhere
    kx = repeat_kv(k, 2)
    mask = build_mask(q, kx, kpm, None, causal)
    corr = mech.sparse_correction(q, kx, mask, 16 ** -0.5)
    assert (corr < 0).any() and (corr > 0).any()  # the sparse part alone is not a probability
    exact = torch.softmax(16 ** -0.5 * q @ kx.transpose(-1, -2), -1)
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    on = ((i - j).abs() <= 5) & ((j <= i) if causal else True)
    # on the window the ratios between keys are the exact softmax ratios
    r = (w[0, 0, 30] / exact[0, 0, 30])[on[30]]
    torch.testing.assert_close(r, r[:1].expand_as(r), rtol=1e-10, atol=0)
    out = mech.run(q, k, v, key_padding_mask=kpm, is_causal=causal)
    torch.testing.assert_close(out, w @ repeat_kv(v, 2), rtol=1e-10, atol=1e-12)


def test_partials_keep_large_exponents_finite_in_float32():
    mech = make_mech(SPEC, window=5)
    q, k, v = qkv(dtype=torch.float64)
    q, k = q * 6, k * 6  # |k|^2 / 2 far beyond float32's exp range
    ref = mech.double().run(q, k, v, is_causal=True, reference=True)
    out = mech.float().run(q.float(), k.float(), v.float(), is_causal=True)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=1e-3, atol=1e-3)


def test_options_and_lengths_are_checked():
    with pytest.raises(ValueError):
        make_mech(SPEC, window=-2)
    q, k, v = qkv(lq=L, lk=20)
    with pytest.raises(ValueError, match="Lq <= Lk"):
        make_mech(SPEC).run(q, k, v)
    assert SPEC.functional and SPEC.randomized
