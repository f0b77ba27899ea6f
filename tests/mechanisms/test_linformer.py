"""linformer: the defining properties of Linformer (Wang et al. 2020, arXiv 2006.04768).

The contract suite covers shapes, reference vs fast path (GQA, padding, Lq != Lk), padded keys and the
refused causal call; here: with k = n and identity projections it is softmax attention; right padding is
the unpadded sequence with the first n_valid columns of E and F; the length-tied table refuses longer
inputs by naming max_length; the sharing modes own the parameters they say.
"""

from __future__ import annotations

import pytest
import torch
from helpers import HKV, H, L, grads, make_mech, padding_mask, qkv

import fastattn

SPEC = fastattn.get_method("linformer")


def _identity(mech, n):
    with torch.no_grad():
        eye = torch.eye(n, mech.options.max_length, dtype=mech.e.dtype)
        mech.e.copy_(eye.expand_as(mech.e))
        if mech.f is not None:
            mech.f.copy_(eye.expand_as(mech.f))


@pytest.mark.parametrize("share", ["headwise", "key_value", "none"])
def test_identity_projections_with_k_equal_n_are_softmax(share):
    mech = make_mech(SPEC, k=L, max_length=L + 3, share=share).double()
    _identity(mech, L)
    q, k, v = qkv(requires_grad=True)
    ours = mech.run(q, k, v)
    ref = fastattn.attention(q, k, v, "softmax")
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads(ours, (q, k, v)), grads(ref, (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_right_padding_equals_the_unpadded_sequence():
    mech = make_mech(SPEC, share="none").double()
    q, k, v = qkv(b=2)
    kpm = padding_mask(valid=(L, 40))
    padded = mech.run(q, k, v, key_padding_mask=kpm)
    alone = mech.run(q[1:], k[1:, :, :40], v[1:, :, :40])  # E[:, :40] is what the short sequence uses
    torch.testing.assert_close(padded[1:], alone, rtol=1e-10, atol=1e-12)
    # left padding is not a shorter sequence: the real tokens meet other columns of E
    left = torch.flip(kpm, dims=[1])[1:]  # 21 padding slots, then the 40 real tokens
    kl, vl = torch.roll(k[1:], 21, 2), torch.roll(v[1:], 21, 2)  # real tokens k[:40] at slots 21..60
    lefted = mech.run(q[1:], kl, vl, key_padding_mask=left)
    assert (lefted - alone).abs().max() > 1e-3


def test_length_beyond_the_table_names_max_length():
    mech = make_mech(SPEC, max_length=32)
    q, k, v = qkv(dtype=torch.float32)
    with pytest.raises(ValueError, match="max_length=32"):
        mech.run(q, k, v)
    out = mech.run(q[:, :, :5], k[:, :, :32], v[:, :, :32])  # cross-attention: E acts on the key length
    assert out.shape == (2, H, 5, v.shape[-1])


def test_causal_is_refused():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="no causal form"):
        make_mech(SPEC).double().run(q, k, v, is_causal=True)
    assert not SPEC.decoding and not SPEC.functional


def test_sharing_modes_and_grouped_heads():
    assert make_mech(SPEC, share="headwise").e.shape == (8, 64)
    kv = make_mech(SPEC, share="key_value")
    assert kv.f is None and [n for n, _ in kv.named_parameters()] == ["e"]
    per_head = make_mech(SPEC, share="none").double()
    assert per_head.e.shape == (HKV, 8, 64)
    # grouped-query: the same as the key/value heads repeated, with each table repeated alongside
    q, k, v = qkv()
    full = make_mech(SPEC, hkv=H, share="none").double()
    with torch.no_grad():
        full.e.copy_(per_head.e.repeat_interleave(H // HKV, 0))
        full.f.copy_(per_head.f.repeat_interleave(H // HKV, 0))
    rep = lambda x: x.repeat_interleave(H // HKV, 1)
    torch.testing.assert_close(per_head.run(q, k, v), full.run(q, rep(k), rep(v)), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="share"):
        make_mech(SPEC, share="layer")
