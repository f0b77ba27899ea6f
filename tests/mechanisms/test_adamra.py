"""adamra: the defining properties of adaptive multi-resolution attention (Zhang et al. 2021, arXiv 2108.04962).

One head at rate 1 with its router fixed is kernel attention (the ``linear`` mechanism); every head is
kernel attention over keys and values average-pooled at its rate, weighted by the router; soft router
weights sum to 1 and hard ones are one-hot; the fast path equals the formula at rates that do not divide
the length, with padding.
"""

from __future__ import annotations

import pytest
import torch
from helpers import L, assert_fast_equals_reference, grads, make_mech, padding_mask, qkv

import fastattn
from fastattn.ops.compress import block_compress

SPEC = fastattn.get_method("adamra")


def _mech(h=4, hkv=2, **options):
    mech = make_mech(SPEC, h=h, hkv=hkv, **options).double()
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for p in mech.router.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return mech


@pytest.mark.parametrize("routing", ["soft", "hard"])
def test_fast_path_equals_the_formula(routing):
    assert_fast_equals_reference(_mech(rates=(1, 3, 4, 7), routing=routing), causal=(False,), lqs=(L,))


def test_one_head_at_rate_one_is_linear_attention():
    mech = make_mech(SPEC, h=1, hkv=1, rates=(1,)).double()
    kpm = padding_mask()
    q, k, v = qkv(h=1, hkv=1, requires_grad=True)
    ours = mech.run(q, k, v, key_padding_mask=kpm)
    ref = fastattn.attention(q, k, v, "linear", key_padding_mask=kpm)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads(ours, (q, k, v)), grads(ref, (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_each_head_is_kernel_attention_over_pooled_keys_weighted_by_the_router():
    mech = _mech(rates=(8, 4, 2, 1))
    q, k, v = qkv()
    kpm = padding_mask()
    out = mech.run(q, k, v, key_padding_mask=kpm)
    g = mech.router_weights(q)
    kx, vx = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    for h, r in enumerate((8, 4, 2, 1)):
        kb, alive = block_compress(kx[:, h:h + 1], ~kpm, r, "mean")
        vb, _ = block_compress(vx[:, h:h + 1], ~kpm, r, "mean")
        head = fastattn.attention(q[:, h:h + 1], kb, vb, "linear", key_padding_mask=~alive)
        torch.testing.assert_close(out[:, h:h + 1], g[:, h:h + 1, :, None] * head, rtol=1e-10, atol=1e-12)


def test_router_weights_soft_sum_to_one_hard_are_one_hot():
    q = qkv()[0]
    soft = _mech(routing="soft").router_weights(q)
    torch.testing.assert_close(soft.sum(1), torch.ones_like(soft.sum(1)))
    assert (soft > 0).all()
    hard = _mech(routing="hard").router_weights(q)
    assert ((hard > 0).sum(1) == 1).all()
    torch.testing.assert_close(hard.amax(1), soft.amax(1))  # the top head keeps its probability
    assert soft.argmax(1).unique().numel() > 1  # queries do choose different resolutions


def test_options_are_checked_and_default_rates_are_coarse_to_fine():
    assert make_mech(SPEC, h=4, hkv=2, max_rate=64).rates == (8, 4, 2, 1)
    assert make_mech(SPEC, h=8, hkv=2, max_rate=16).rates == (16, 16, 16, 16, 8, 4, 2, 1)
    for bad in ({"rates": (1, 2)}, {"routing": "top2"}, {"max_rate": 0}, {"rates": (0, 1, 1, 1)}):
        with pytest.raises(ValueError):
            make_mech(SPEC, h=4, hkv=2, **bad)
    assert not SPEC.functional and not SPEC.causal
