"""memory_compressed: the defining properties of memory-compressed attention (Liu et al. 2018, arXiv
1801.10198), and of the block compression it is built on (fastattn/ops/compress.py).

The contract suite runs the test options (mode="both", c=3, local block 8); here every mode and
compression function: c = 1 with the identity convolution is softmax attention; no future token ever
reaches a past output (a node is visible only once its block has ended); the fast paths equal the literal
formula; step equals the causal forward; the first c - 1 queries of the compressed mode see nothing.
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
from fastattn.ops.compress import block_compress, node_ends

SPEC = fastattn.get_method("memory_compressed")
VARIANTS = [
    {"mode": m, "fn": f, "compression": c}
    for m in ("compressed", "both") for f in ("conv", "mean", "max") for c in (1, 3, 4)
]


def _mech(seed=0, **options):
    mech = make_mech(SPEC, **{"block": 8, **options}).double()
    if mech.k_taps is not None:  # random taps, so that the convolution is not a mean
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            mech.k_taps.copy_(torch.randn(mech.k_taps.shape, generator=g, dtype=torch.float64))
            mech.v_taps.copy_(torch.randn(mech.v_taps.shape, generator=g, dtype=torch.float64))
    return mech


def test_compression_one_with_identity_conv_is_softmax():
    mech = make_mech(SPEC, compression=1, mode="compressed").double()
    with torch.no_grad():
        mech.k_taps.fill_(1.0), mech.v_taps.fill_(1.0)
    kpm = padding_mask()
    for causal in (False, True):
        q, k, v = qkv(requires_grad=True)
        ours = mech.run(q, k, v, is_causal=causal, key_padding_mask=kpm)
        ref = fastattn.attention(q, k, v, "softmax", is_causal=causal, key_padding_mask=kpm)
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
        for a, b in zip(grads(ours, (q, k, v)), grads(ref, (q, k, v))):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("options", VARIANTS, ids=lambda o: "-".join(map(str, o.values())))
def test_fast_path_equals_the_formula(options):
    mech = _mech(**options)
    assert_fast_equals_reference(mech)


@pytest.mark.parametrize("options", VARIANTS, ids=lambda o: "-".join(map(str, o.values())))
def test_no_future_token_reaches_the_past(options):
    """Perturbing every token after t never changes outputs at or before t, for every t: catches a node
    whose block contains t + 1 being visible to t."""
    mech = _mech(**options)
    q, k, v = qkv()
    out = mech.run(q, k, v, is_causal=True)
    g = torch.Generator().manual_seed(3)
    for t in range(L - 1):
        k2, v2 = k.clone(), v.clone()
        k2[:, :, t + 1:] += 5 * torch.randn(k2[:, :, t + 1:].shape, generator=g, dtype=k.dtype)
        v2[:, :, t + 1:] += 5 * torch.randn(v2[:, :, t + 1:].shape, generator=g, dtype=v.dtype)
        for ref in (False, True):
            out2 = mech.run(q, k2, v2, is_causal=True, reference=ref)
            torch.testing.assert_close(out[:, :, : t + 1], out2[:, :, : t + 1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("options", VARIANTS, ids=lambda o: "-".join(map(str, o.values())))
def test_step_equals_causal_forward(options):
    mech = _mech(**options)
    q, k, v = qkv()
    full = mech.run(q, k, v, is_causal=True)
    out, state = decode_in_chunks(mech, q, k, v, (1, 2, 3, 8, 1, 19, 27))
    assert state.length == L
    torch.testing.assert_close(out, full, rtol=1e-9, atol=1e-11)
    # the buffer holds the tokens of the incomplete block; the completed nodes are the forward's
    c = options["compression"]
    assert (state.filled == L % c).all() and (state.nodes == L // c).all()


def test_node_becomes_visible_when_its_block_ends():
    c = 4
    mech = _mech(mode="compressed", fn="conv", compression=c)
    q, k, v = qkv()
    out = mech.run(q, k, v, is_causal=True)
    assert out[:, :, : c - 1].abs().max() == 0  # no block has ended yet: no key, zero rows
    # query c - 1 sees exactly node 0 (a single key: its value)
    node_v = (mech.v_taps[None, :, :, None] * v[:, :, :c]).sum(2).repeat_interleave(2, 1)
    torch.testing.assert_close(out[:, :, c - 1], node_v, rtol=1e-12, atol=1e-12)


def test_block_compress_padding_and_dead_nodes():
    x = torch.randn(2, 3, 10, 5, dtype=torch.float64)
    keep = torch.ones(2, 10, dtype=torch.bool)
    keep[1, :6] = False  # row 1: blocks of 3 -> [0..2] dead, [3..5] dead, [6..8] real, [9] real
    means, alive = block_compress(x, keep, 3, "mean")
    assert alive.tolist() == [[True] * 4, [False, False, True, True]]
    torch.testing.assert_close(means[1, :, 2], x[1, :, 6:9].mean(1))
    torch.testing.assert_close(means[1, :, 3], x[1, :, 9])  # partial block: mean of its real token
    assert means[1, :, :2].abs().max() == 0
    maxes, _ = block_compress(x, keep, 3, "max")
    torch.testing.assert_close(maxes[0, :, 1], x[0, :, 3:6].amax(1))
    assert maxes[1, :, :2].abs().max() == 0
    taps = torch.randn(3, 3, dtype=torch.float64)
    conv, _ = block_compress(x, keep, 3, "conv", taps)
    torch.testing.assert_close(conv[0, :, 3], taps[:, 0, None] * x[0, :, 9])  # zero-filled on the right
    assert node_ends(4, 3, torch.device("cpu")).tolist() == [2, 5, 8, 11]
    with pytest.raises(ValueError, match="taps"):
        block_compress(x, keep, 3, "conv")
    with pytest.raises(ValueError, match="compression"):
        block_compress(x, keep, 3, "median")


def test_options_are_checked():
    for bad in ({"mode": "local"}, {"fn": "median"}, {"compression": 0}):
        with pytest.raises(ValueError):
            make_mech(SPEC, **bad)
    assert not list(make_mech(SPEC, fn="mean").parameters())
    assert not SPEC.functional  # the default (conv) owns its taps


@pytest.mark.parametrize("options", VARIANTS[::2], ids=lambda o: "-".join(map(str, o.values())))
def test_prefill_then_token_by_token(options):
    """Without autograd and padding, a first chunk is prefilled by the parallel forward; the state it builds
    continues exactly like token-by-token decoding."""
    mech = _mech(**options)
    q, k, v = qkv()
    full = mech.run(q, k, v, is_causal=True)
    for first in (8, 9, 25):
        with torch.no_grad():
            out, _ = decode_in_chunks(mech, q, k, v, (first, 1, 2, 1, L - first - 4))
            _, pre = mech.step(q[:, :, :first], k[:, :, :first], v[:, :, :first], None, E ** -0.5)
            _, tok = decode_in_chunks(mech, q[:, :, :first], k[:, :, :first], v[:, :, :first], [1] * first)
        torch.testing.assert_close(out, full, rtol=1e-9, atol=1e-11)
        for count, stores in (("nodes", ("node_k", "node_v")), ("filled", ("buf_k", "buf_v")), ("local", ("loc_k", "loc_v"))):
            n = int(getattr(tok, count)[0])
            assert torch.equal(getattr(pre, count), getattr(tok, count)), count
            for name in stores:
                torch.testing.assert_close(getattr(pre, name)[:, :, :n], getattr(tok, name)[:, :, :n])
        assert pre.length == tok.length == first and torch.equal(pre.seen, tok.seen)
