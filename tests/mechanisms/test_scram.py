"""SCRAM's defining properties: PatchMatch finds the exact best key given enough rounds (and its best
score never falls from one round to the next); a window covering the sequence is softmax attention;
outputs depend only on the keys in each query's window; the search is a reproducible function of the
seed buffer."""

from __future__ import annotations

import pytest
import torch

import fastattn
from fastattn.core.masks import Mask
from fastattn.ops.gather import index_mask
from fastattn.registry import get_method


def _mech(seed=0, **options):
    spec = get_method("scram")
    return spec.cls(spec.make_options(**{"window": 6, "iterations": 3, "samples": 2, **options}), head_dim=16,
                    num_heads=2, generator=torch.Generator().manual_seed(seed)).double().eval()


def _qkv(n=45, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 2, n, d, generator=g, dtype=torch.float64) for d in (16, 16, 8))


def _kpm(n=45):
    kpm = torch.zeros(2, n, dtype=torch.bool)
    kpm[1, 30:] = True
    return kpm


def _exact_best(q, k, kpm, causal):
    s = (q @ k.transpose(-1, -2)).masked_fill(kpm[:, None, None, :], float("-inf"))
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2], s.shape[-1], dtype=torch.bool).triu(1), float("-inf"))
    return s.argmax(-1), s.amax(-1)


@pytest.mark.parametrize("causal", [False, True])
def test_enough_rounds_find_the_exact_best_key(causal):
    q, k, _ = _qkv()
    kpm = _kpm()
    mask = Mask(45, 45, key_padding=kpm, causal=causal)
    exact, _ = _exact_best(q, k, kpm, causal)
    found = _mech(iterations=40, samples=6).best_keys(q, k, mask)
    assert torch.equal(found, exact)


def test_best_score_never_falls_and_coherent_matches_propagate():
    """Spatially coherent data (query i matches key i + 7 on a smooth curve): propagation spreads a found
    match along the sequence, so a few rounds find nearly every best key."""
    n = 200
    t = torch.arange(n, dtype=torch.float64)[:, None] * torch.tensor([0.011, 0.023, 0.037, 0.051])
    curve = torch.cat([t.cos(), t.sin()], -1) / 2  # unit vectors, 8-d
    k = curve.expand(2, 2, n, 8)
    q = 10 * torch.roll(curve, -7, dims=0).expand(2, 2, n, 8)
    spec = get_method("scram")
    mask = Mask(n, n)
    best = []
    for r in (0, 1, 2, 4, 6):
        mech = spec.cls(spec.make_options(iterations=r, samples=1), head_dim=8, num_heads=2,
                        generator=torch.Generator().manual_seed(0)).double()
        best.append(mech.best_keys(q, k, mask))
    score = [(q * k.gather(2, b[..., None].expand(-1, -1, -1, 8))).sum(-1) for b in best]
    for a, b in zip(score, score[1:]):
        assert (b >= a - 1e-12).all()
    target = (torch.arange(n) + 7) % n
    hit = [(b == target).double().mean().item() for b in best]
    assert hit[0] < 0.1 and hit[-1] > 0.9, hit


@pytest.mark.parametrize("causal", [False, True])
def test_window_covering_the_sequence_is_softmax(causal):
    q, k, v = _qkv(seed=2)
    kpm = _kpm()
    out = _mech(window=90).run(q, k, v, is_causal=causal, key_padding_mask=kpm)
    ref = fastattn.attention(q, k, v, "softmax", is_causal=causal, key_padding_mask=kpm)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


def test_outputs_depend_only_on_the_window():
    q, k, v = _qkv(seed=3)
    mech = _mech()
    idx, valid = mech.window(q, k, Mask(45, 45, causal=True))
    seen, _ = index_mask(idx, valid, 45)
    out = mech.run(q, k, v, is_causal=True)
    i = 30
    for b in range(2):
        for h in range(2):
            v2 = v.clone()
            v2[b, h, ~seen[b, h, i]] += 10.0
            torch.testing.assert_close(mech.run(q, k, v2, is_causal=True)[b, h, i], out[b, h, i])
            v3 = v.clone()
            v3[b, h, seen[b, h, i]] += 10.0
            assert not torch.allclose(mech.run(q, k, v3, is_causal=True)[b, h, i], out[b, h, i])


def test_search_is_a_reproducible_function_of_the_seed_buffer():
    q, k, _ = _qkv(n=300, seed=4)
    mask = Mask(300, 300)
    a, b, c = _mech(seed=1, iterations=1), _mech(seed=1, iterations=1), _mech(seed=2, iterations=1)
    assert torch.equal(a.best_keys(q, k, mask), b.best_keys(q, k, mask))
    assert not torch.equal(a.best_keys(q, k, mask), c.best_keys(q, k, mask))
    c.load_state_dict(a.state_dict())
    assert torch.equal(a.best_keys(q, k, mask), c.best_keys(q, k, mask))
