"""synthesizer: the defining properties of the Synthesizer (Tay et al. 2020, arXiv 2005.00743).

The contract suite runs the dense variant; here every variant: the random synthesizer's weights do not
depend on the input (and R = 0 averages the visible values); the dense row of token i depends on x_i only
(and W2 = 0, b2 = 0 gives uniform weights); the factorised forms are tile/repeat and R1 R2^T; fast path ==
formula, no causal leak and step == causal forward for each; length-tied tables name max_length.
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    H,
    L,
    assert_fast_equals_reference,
    decode_in_chunks,
    make_mech,
    padding_mask,
    qkv,
)

import fastattn
from fastattn.core.masks import Mask

SPEC = fastattn.get_method("synthesizer")
VARIANTS = [
    {"variant": v, "factorized": f} for v in ("dense", "random") for f in (False, True)
] + [{"variant": "random", "trainable": False}]
ID = lambda o: "-".join(map(str, o.values()))


def _mean_of_visible(v, kpm=None, causal=False):
    keep = torch.ones(v.shape[0], 1, v.shape[2], 1, dtype=v.dtype) if kpm is None else (~kpm)[:, None, :, None].to(v.dtype)
    v = v.repeat_interleave(H // v.shape[1], 1)
    if causal:
        return (v * keep).cumsum(2) / keep.cumsum(2).clamp(min=1)
    return ((v * keep).sum(2, keepdim=True) / keep.sum(2, keepdim=True)).expand(-1, -1, v.shape[2], -1)


def test_random_weights_do_not_depend_on_the_input():
    mech = make_mech(SPEC, variant="random").double()
    q, k, v = qkv()
    q2, k2, _ = qkv(seed=7)
    for causal in (False, True):
        torch.testing.assert_close(mech.run(q, k, v, is_causal=causal), mech.run(q2, k2, v, is_causal=causal))
    with torch.no_grad():
        mech.r.zero_()
    kpm = padding_mask()
    for causal in (False, True):
        out = mech.run(q, k, v, key_padding_mask=kpm, is_causal=causal)
        torch.testing.assert_close(out, _mean_of_visible(v, kpm, causal), rtol=1e-12, atol=1e-12)


def test_dense_row_depends_only_on_its_own_token():
    mech = make_mech(SPEC, variant="dense").double()
    q, k, v = qkv()
    out = mech.run(q, k, v)
    q2 = q.clone()
    q2[:, :, 30] += 4.0
    out2 = mech.run(q2, torch.randn_like(k), v)  # keys never matter either
    changed = (out2 - out).abs().amax(dim=(0, 1, 3)) > 1e-12
    assert changed.nonzero().flatten().tolist() == [30]
    with torch.no_grad():
        mech.w2.zero_(), mech.b2.zero_()
    torch.testing.assert_close(mech.run(q, k, v, is_causal=True), _mean_of_visible(v, causal=True))


def test_factorized_forms():
    dense = make_mech(SPEC, variant="dense", factorized=True, max_length=50).double()
    a, b = dense.w2a.shape[-1], dense.w2b.shape[-1]
    assert a * b >= 50 and a == 8
    q, _, _ = qkv(lq=5, lk=50)
    logits = dense.logits(q, 0, 50, Mask(5, 50))
    hid = torch.relu(q @ dense.w1[None] + dense.b1[None, :, None])
    av = hid @ dense.w2a[None] + dense.b2a[None, :, None]
    bv = hid @ dense.w2b[None] + dense.b2b[None, :, None]
    for j in (0, 7, 8, 49):
        torch.testing.assert_close(logits[..., j], av[..., j % a] * bv[..., j // a])
    rnd = make_mech(SPEC, variant="random", factorized=True, rank=3).double()
    assert rnd.r1.shape == (H, 64, 3)
    torch.testing.assert_close(rnd.logits(q, 0, 20, Mask(5, 20))[0], (rnd.r1 @ rnd.r2.transpose(-1, -2))[:, 15:20, :20])


@pytest.mark.parametrize("options", VARIANTS, ids=ID)
def test_fast_path_equals_formula(options):
    mech = make_mech(SPEC, **options).double()
    assert_fast_equals_reference(mech, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("options", VARIANTS, ids=ID)
def test_causal_and_decoding(options):
    mech = make_mech(SPEC, **options).double()
    q, k, v = qkv()
    full = mech.run(q, k, v, is_causal=True)
    for t in (0, 20, L - 2):
        q2, v2 = q.clone(), v.clone()
        q2[:, :, t + 1:] += 3.0
        v2[:, :, t + 1:] += 3.0
        torch.testing.assert_close(mech.run(q2, k, v2, is_causal=True)[:, :, :t + 1], full[:, :, :t + 1])
    out, _ = decode_in_chunks(mech, q, k, v, (1, 4, 17, 39))
    torch.testing.assert_close(out, full, rtol=1e-10, atol=1e-12)


def test_tables_and_options():
    mech = make_mech(SPEC, variant="random", max_length=40)
    q, k, v = qkv(dtype=torch.float32)
    with pytest.raises(ValueError, match="max_length=40"):
        mech.run(q, k, v)
    with pytest.raises(ValueError, match="max_length=40"):  # the rows of R are absolute query positions
        mech.run(q[:, :, :3], k[:, :, :41], v[:, :, :41], is_causal=True)
    assert not list(make_mech(SPEC, variant="random", trainable=False).parameters())
    assert sorted(n for n, _ in make_mech(SPEC, variant="random", factorized=True).named_parameters()) == ["r1", "r2"]
    for bad in ({"variant": "mixture"}, {"rank": 0}, {"hidden": -1}):
        with pytest.raises(ValueError):
            make_mech(SPEC, **bad)
