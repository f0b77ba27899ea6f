"""Routing attention's defining properties: one cluster (and a window over everything) is softmax; a
query's output depends on its own cluster's keys only; the centroids are reproducible buffers that move
(and stay unit) only in training, never in decoding; the commitment loss is the aux_loss."""

from __future__ import annotations

import pytest
import torch

import fastattn
from fastattn.registry import get_method


def _mech(seed=0, h=2, e=16, **options):
    spec = get_method("routing")
    return spec.cls(spec.make_options(**options), head_dim=e, num_heads=h,
                    generator=torch.Generator().manual_seed(seed)).double().eval()


def _qkv(n=41, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 2, n, d, generator=g, dtype=torch.float64) for d in (16, 16, 8))


@pytest.mark.parametrize("causal", [False, True])
def test_one_cluster_is_softmax(causal):
    q, k, v = _qkv()
    kpm = torch.zeros(2, 41, dtype=torch.bool)
    kpm[1, 30:] = True
    out = _mech(clusters=1, window=100).run(q, k, v, is_causal=causal, key_padding_mask=kpm)
    ref = fastattn.attention(q, k, v, "softmax", is_causal=causal, key_padding_mask=kpm)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_queries_see_their_own_cluster_only(causal):
    q, k, v = _qkv(seed=1)
    mech = _mech(clusters=4, window=100)
    hq, hk = mech.assign(q), mech.assign(k)
    out = mech.run(q, k, v, is_causal=causal)
    i = 35
    for b in range(2):
        for h in range(2):
            other = hk[b, h] != hq[b, h, i]
            assert other.any() and (~other).any()
            v2 = v.clone()
            v2[b, h, other] += 10.0
            o2 = mech.run(q, k, v2, is_causal=causal)
            torch.testing.assert_close(o2[b, h, i], out[b, h, i])
            same = (~other).nonzero().flatten()
            same = same[same <= i] if causal else same
            if len(same):
                v3 = v.clone()
                v3[b, h, same] += 10.0
                assert not torch.allclose(mech.run(q, k, v3, is_causal=causal)[b, h, i], out[b, h, i])


def test_window_bounds_the_keys_of_a_cluster():
    q, k, v = _qkv(n=60, seed=2)
    mech = _mech(clusters=1, window=8)  # causal: the last 8 keys
    out = mech.run(q, k, v, is_causal=True)
    band = torch.ones(60, 60, dtype=torch.bool).tril() & ~torch.ones(60, 60, dtype=torch.bool).tril(-8)
    ref = fastattn.attention(q, k, v, "softmax", attn_mask=~band)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


def test_centroids_move_only_in_training_and_stay_unit():
    q, k, v = _qkv(seed=3)
    mech = _mech(clusters=4, decay=0.5)
    before = mech.centroids.clone()
    mech.run(q, k, v)  # eval
    torch.testing.assert_close(mech.centroids, before)
    assert mech.aux_loss.item() == 0.0
    mech.train()
    with torch.no_grad():
        mech.run(q, k, v)
    torch.testing.assert_close(mech.centroids, before)
    qg = q.clone().requires_grad_(True)
    mech.run(qg, k, v)
    assert not torch.allclose(mech.centroids, before)
    torch.testing.assert_close(mech.centroids.norm(dim=-1), torch.ones(2, 4, dtype=mech.centroids.dtype))
    assert mech.aux_loss.item() > 0
    (g,) = torch.autograd.grad(mech.aux_loss, qg)
    assert g.abs().sum() > 0
    after = mech.centroids.clone()
    mech.step(q[:, :, :5], k[:, :, :5], v[:, :, :5], None, 0.25)  # decoding never moves them
    torch.testing.assert_close(mech.centroids, after)


def test_centroids_are_reproducible_and_saved():
    a, b, c = _mech(seed=3), _mech(seed=3), _mech(seed=4)
    torch.testing.assert_close(a.centroids, b.centroids)
    assert not torch.equal(a.centroids, c.centroids)
    c.load_state_dict(a.state_dict())
    q, k, v = _qkv(seed=5)
    torch.testing.assert_close(a.run(q, k, v), c.run(q, k, v))


def test_bad_options():
    with pytest.raises(ValueError, match="decay"):
        _mech(decay=1.0)
