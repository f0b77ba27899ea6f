"""Hedgehog with a softmax window (LoLCATs): window softmax + linear attention under one normaliser."""

from __future__ import annotations

import pytest
import torch

import fastattn
from fastattn.core.masks import Mask
from fastattn.ops.linear.window import dense_window_linear_attention, window_linear_attention
from fastattn.registry import get_method
from tests.helpers import grads, make_mech, padding_mask, qkv, rel_err

W = 16  # window; the sequence (61) is no multiple of it


def _mech(window: int = W, chunk: int = 8, seed: int = 1):
    mech = make_mech(get_method("hedgehog"), window=window, chunk=chunk).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # away from the identity init, and a different g per head
        for p in mech.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return mech


@pytest.mark.parametrize("causal", [True, False])
def test_efficient_equals_the_formula_values_and_grads(causal: bool) -> None:
    mech = _mech()
    q, k, v = qkv(requires_grad=True)
    pad = padding_mask()
    out = mech.run(q, k, v, is_causal=causal, key_padding_mask=pad)
    ref = mech.run(q, k, v, is_causal=causal, key_padding_mask=pad, reference=True)
    keep = ~pad[:, None, :, None]  # padded queries' outputs are unspecified
    torch.testing.assert_close(out * keep, ref * keep, rtol=1e-9, atol=1e-11)
    params = list(mech.parameters())
    got = grads(out * keep, (q, k, v, *params))
    want = grads(ref * keep, (q, k, v, *params))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    assert mech.window_factor.grad is None and want[-1].abs().sum() > 0  # g is learned


def test_the_formula_literally() -> None:
    """The reference against the formula written out per query (causal)."""
    mech = _mech(window=5)
    q, k, v = qkv(b=1, lq=13)
    fq = mech.features(q, is_query=True, scale=0.25, mask=None)
    from fastattn.core.checks import repeat_kv
    k, v = repeat_kv(k, 2), repeat_kv(v, 2)
    fk = mech.features(k, is_query=False, scale=0.25, mask=None)
    g = torch.sigmoid(mech.window_factor)
    want = torch.zeros(1, 4, 13, v.shape[-1], dtype=q.dtype)
    for h in range(4):
        for i in range(13):
            win = range(max(0, i - 4), i + 1)
            s = torch.stack([q[0, h, i] @ k[0, h, j] * 0.25 for j in win])
            wts = [g[h] * torch.exp(x - s.max()) for x in s] + [fq[0, h, i] @ fk[0, h, j] for j in range(i - 4)]
            keys = list(win) + list(range(i - 4))
            want[0, h, i] = sum(wt * v[0, h, j] for wt, j in zip(wts, keys)) / sum(wts)
    got = mech.run(q, k[:, ::2], v[:, ::2], is_causal=True, scale=0.25)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("causal", [True, False])
def test_a_window_covering_the_sequence_is_softmax(causal: bool) -> None:
    mech = _mech(window=61)
    q, k, v = qkv()
    pad = padding_mask()
    want = fastattn.attention(q, k, v, "softmax", is_causal=causal, key_padding_mask=pad)
    keep = ~pad[:, None, :, None]
    for reference in (False, True):
        got = mech.run(q, k, v, is_causal=causal, key_padding_mask=pad, reference=reference)
        torch.testing.assert_close(got * keep, want * keep, rtol=1e-10, atol=1e-12)
    kl = mech.mimicry_loss(q, k.repeat_interleave(2, 1), Mask(61, 61, causal=causal), 16 ** -0.5)
    assert kl.abs() < 1e-10  # the hybrid's weights are softmax's
    mse = mech.output_mimicry_loss(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                   Mask(61, 61, causal=causal), 16 ** -0.5)
    assert mse.abs() < 1e-20
    assert rel_err(_mech(window=W).run(q, k, v, is_causal=causal), want) > 1e-2  # a short window is not


def test_window_zero_is_plain_hedgehog() -> None:
    spec = get_method("hedgehog")
    plain, zero = make_mech(spec), make_mech(spec, window=0)
    assert set(zero.state_dict()) == set(plain.state_dict()) == {"q_weight", "q_bias", "k_weight", "k_bias"}
    assert "window_factor" in make_mech(spec, window=4).state_dict()
    q, k, v = qkv()
    torch.testing.assert_close(zero.run(q, k, v, is_causal=True), plain.run(q, k, v, is_causal=True))
    with pytest.raises(ValueError, match="window must be >= 0"):
        make_mech(spec, window=-1)


def test_causal_no_leak() -> None:
    mech = _mech()
    q, k, v = qkv()
    t = 37
    k2, v2 = k.clone(), v.clone()
    k2[:, :, t + 1:] += 3.0
    v2[:, :, t + 1:] -= 2.0
    a = mech.run(q, k, v, is_causal=True)
    b = mech.run(q, k2, v2, is_causal=True)
    torch.testing.assert_close(a[:, :, :t + 1], b[:, :, :t + 1], rtol=0, atol=1e-13)
    assert (a[:, :, t + 1:] - b[:, :, t + 1:]).abs().max() > 1e-3


@pytest.mark.parametrize("causal", [True, False])
def test_padded_row_equals_the_row_alone(causal: bool) -> None:
    mech = _mech()
    q, k, v = qkv()
    pad = padding_mask()  # row 1: 40 real tokens
    out = mech.run(q, k, v, is_causal=causal, key_padding_mask=pad)
    alone = mech.run(q[1:, :, :40], k[1:, :, :40], v[1:, :, :40], is_causal=causal)
    torch.testing.assert_close(out[1:, :, :40], alone, rtol=1e-10, atol=1e-12)


def test_step_equals_the_causal_forward() -> None:
    mech = _mech()
    q, k, v = qkv()
    pad = torch.zeros(2, 61, dtype=torch.bool)
    pad[1, :3] = True  # left padding in row 1
    pad[0, 30] = True  # and a padded token mid-sequence in row 0
    want = mech.run(q, k, v, is_causal=True, key_padding_mask=pad)
    scale = 16 ** -0.5
    outs, state = [], None
    for a, b in ((0, 23), (23, 24), (24, 29), *((i, i + 1) for i in range(29, 61))):  # prefill, 1, 5, 1, ...
        o, state = mech.step(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], state, scale, key_padding_mask=pad[:, a:b])
        outs.append(o)
    got = torch.cat(outs, dim=2)
    keep = ~pad[:, None, :, None]
    torch.testing.assert_close(got * keep, want * keep, rtol=1e-9, atol=1e-11)
    assert state.length == 61 and state.k.shape[2] == W  # the ring keeps the window only
    sel = state.select([1])
    assert sel.kv.shape[0] == 1 and sel.k.shape[0] == 1


def test_op_grouped_query_heads_native() -> None:
    q, k, v = qkv(hkv=2)
    g = torch.Generator().manual_seed(3)
    fq = torch.rand(2, 4, 61, 6, generator=g, dtype=torch.float64)
    fk = torch.rand(2, 2, 61, 6, generator=g, dtype=torch.float64)
    weight = torch.rand(4, generator=g, dtype=torch.float64)
    mask = Mask(61, 61, causal=True, key_padding=padding_mask())
    kw = dict(window=W, scale=0.3, weight=weight, chunk=8)
    got = window_linear_attention(q, k, fq, fk, v, mask, **kw)
    r = lambda x: x.repeat_interleave(2, 1)  # noqa: E731
    torch.testing.assert_close(got, window_linear_attention(q, r(k), fq, r(fk), r(v), mask, **kw))
    torch.testing.assert_close(got, dense_window_linear_attention(q, k, fq, fk, v, mask, window=W, scale=0.3,
                                                                  weight=weight))


def test_attention_transfer_loss_follows_each_paper() -> None:
    spec = get_method("hedgehog")
    assert make_mech(spec).mimics_weights and not make_mech(spec, window=4).mimics_weights  # auto
    assert make_mech(spec, window=4, mimicry="kl").mimics_weights
    assert not make_mech(spec, mimicry="mse").mimics_weights
    with pytest.raises(ValueError, match="mimicry must be"):
        make_mech(spec, mimicry="l2")
    q, k, v = qkv(hkv=4)
    mask = Mask(61, 61, causal=True)
    for mimicry in ("kl", "mse"):
        mech = make_mech(spec, hkv=4, window=W, distill=True, mimicry=mimicry).double()
        mech.load_state_dict(_mech(window=W).state_dict())
        mech.run(q, k, v, is_causal=True)
        want = (mech.mimicry_loss(q, k, mask, 16 ** -0.5) if mimicry == "kl"
                else mech.output_mimicry_loss(q, k, v, mask, 16 ** -0.5))
        assert mech.aux_loss > 1e-4 and torch.equal(mech.aux_loss, want)
        assert torch.autograd.grad(mech.aux_loss, mech.window_factor)[0].abs().sum() > 0
