"""combiner: the defining properties of Combiner's factorisation (Ren et al. 2021, arXiv 2107.05768).

The contract suite runs the test options (summary="keys", b = 8, which allow Lq != Lk); here the paper's
query summaries: every key is reached by exactly one route and the implied p(j | i) sums to 1; a trivial
partition (one segment, or one key per segment) is softmax -- a key reached twice (the own segment also
through its abstraction) would break the second; fast path == the formula; step == causal forward.
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    E,
    L,
    assert_fast_equals_reference,
    decode_in_chunks,
    grads,
    make_mech,
    padding_mask,
    qkv,
)

import fastattn

SPEC = fastattn.get_method("combiner")
VARIANTS = [
    {"summary": "queries", "pool": "max", "map": "identity"},
    {"summary": "queries", "pool": "mean", "map": "relu"},
    {"summary": "keys", "pool": "sum", "map": "identity"},
]


def _ids(o):
    return "-".join(map(str, o.values()))


@pytest.mark.parametrize("options", VARIANTS, ids=_ids)
def test_fast_path_equals_the_formula(options):
    mech = make_mech(SPEC, block=8, **options).double()
    assert_fast_equals_reference(mech, lqs=(L,) if options["summary"] == "queries" else (1, L))


@pytest.mark.parametrize("causal", [False, True])
def test_every_key_covered_once_and_rows_sum_to_one(causal):
    mech = make_mech(SPEC, block=8, summary="queries").double()
    q, k, v = qkv()
    kpm = padding_mask()
    w = mech.attention_weights(q, k, key_padding_mask=kpm, is_causal=causal)
    torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)), rtol=1e-12, atol=1e-12)
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    visible = (~kpm)[:, None, None, :] & ((j <= i) if causal else torch.ones(L, L, dtype=torch.bool))
    assert (w[visible.expand_as(w)] > 0).all()  # every visible key has a route
    assert (w[~visible.expand_as(w)] == 0).all()  # padding and the future have none
    # through its segment r != own, key j gets p(r | i) q(j | r): within a segment the ratios between keys
    # are the same for every query reaching it that way (one route, not a mixture)
    seg, own = j // 8, i // 8
    other = (seg != own) & (seg < own if causal else True)
    for r in range(L // 8):
        cols = slice(8 * r, 8 * r + 8)
        rows = other[:, 8 * r]
        if rows.any():
            block = w[0, 0, rows, cols]
            ratio = block / block.sum(-1, keepdim=True)
            torch.testing.assert_close(ratio, ratio[:1].expand_as(ratio), rtol=1e-10, atol=1e-12)
    out = mech.run(q, k, v, key_padding_mask=kpm, is_causal=causal)
    torch.testing.assert_close(out, w @ v.repeat_interleave(2, 1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("block", [1, L, 100])
@pytest.mark.parametrize("pool", ["max", "mean", "sum"])
def test_trivial_partition_is_softmax(block, pool):
    """One segment (b >= n): everything direct. One key per segment (b = 1): every other key through an
    abstraction that is the key itself. Both are exactly softmax; counting the own segment twice is not."""
    mech = make_mech(SPEC, block=block, pool=pool, summary="queries").double()
    kpm = padding_mask()
    for causal in (False, True):
        q, k, v = qkv(requires_grad=True)
        ours = mech.run(q, k, v, is_causal=causal, key_padding_mask=kpm)
        ref = fastattn.attention(q, k, v, "softmax", is_causal=causal, key_padding_mask=kpm)
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
        for a, b in zip(grads(ours, (q, k, v)), grads(ref, (q, k, v))):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_nontrivial_partition_is_not_softmax():
    mech = make_mech(SPEC, block=8).double()
    q, k, v = qkv()
    assert not torch.allclose(mech.run(q, k, v), fastattn.attention(q, k, v, "softmax"), atol=1e-3)


@pytest.mark.parametrize("options", VARIANTS, ids=_ids)
def test_step_equals_causal_forward(options):
    mech = make_mech(SPEC, block=8, **options).double()
    q, k, v = qkv()
    full = mech.run(q, k, v, is_causal=True)
    out, state = decode_in_chunks(mech, q, k, v, (1, 2, 5, 8, 1, 19, 25))
    torch.testing.assert_close(out, full, rtol=1e-9, atol=1e-11)
    assert (state.nodes == L // 8).all() and state.length == L


def test_left_padded_rows_decode_as_if_alone():
    mech = make_mech(SPEC, block=8, summary="queries").double()
    q, k, v = qkv(b=2)
    kpm = torch.zeros(2, L, dtype=torch.bool)
    kpm[1, :5] = True  # row 1: 5 padding tokens first
    out, _ = mech.step(q, k, v, None, E ** -0.5, key_padding_mask=kpm)
    alone = mech.run(q[1:, :, 5:], k[1:, :, 5:], v[1:, :, 5:], is_causal=True)
    torch.testing.assert_close(out[1:, :, 5:], alone, rtol=1e-9, atol=1e-11)


def test_query_summaries_need_self_attention_and_options_are_checked():
    mech = make_mech(SPEC, summary="queries")
    q, k, v = qkv(lq=5, lk=L)
    with pytest.raises(ValueError, match="Lq == Lk"):
        mech.run(q, k, v)
    for bad in ({"block": 0}, {"pool": "median"}, {"map": "gelu"}, {"summary": "values"}):
        with pytest.raises(ValueError):
            make_mech(SPEC, **bad)
    assert SPEC.functional and SPEC.weights
