"""papa: the defining properties of PAPA (Hassid et al. 2022, arXiv 2211.03495).

The contract suite (tests/kinds/test_layer_contract.py) covers layouts, causal leaks, padding and
decoding with the initial (uniform) tables; here, with random position-dependent tables: static heads do
not depend on queries or keys, every row sums to 1 after masking (the authors' mask-then-L1-normalise,
transcribed), an empty row gives zeros, fast path equals the literal reference, decoding (also
left-padded) equals the forward, lengths beyond the table raise, and calibrate() is the mean of the
dynamic maps (a PAPA layer calibrated on one example reproduces the dynamic layer on it).
"""

from __future__ import annotations

import pytest
import torch

import fastattn
from helpers import tokens
from fastattn.mechanisms.gated.papa import calibrate
from fastattn.ops.constant import table_attention

D, H, N, NMAX = 24, 4, 11, 16


def _x(b=2, n=N, d=D, seed=1):
    return tokens(b, n, d, seed)


def _papa(h=H, seed=0, random_table=True, **options):
    torch.manual_seed(seed)
    options.setdefault("max_length", NMAX)
    layer = fastattn.MultiheadAttention(D, h, "papa", batch_first=True, dtype=torch.float64, **options).eval()
    m = layer.mechanism
    if random_table:
        with torch.no_grad():
            m.table.copy_(torch.rand(m.table.shape, generator=torch.Generator().manual_seed(seed + 7), dtype=torch.float64))
    return layer


def _padding():
    kpm = torch.zeros(2, N, dtype=torch.bool)
    kpm[1, 7:] = True
    return kpm


def _mask_and_normalize(probs, real):
    """Transcription (test reference) of the authors' ``mask_and_normalize`` (schwartz-lab-NLP/papa,
    ``papa_modules.py``): multiply by the outer product of the padding masks, L1-normalise each row."""
    pattern = (real[:, :, None] & real[:, None, :]).to(probs.dtype)[:, None]
    return torch.nn.functional.normalize(probs * pattern, p=1.0, dim=-1)


def test_rows_are_the_table_masked_then_renormalised():
    layer = _papa()
    m = layer.mechanism
    kpm = _padding()
    v = torch.randn(2, H, N, 6, dtype=torch.float64)
    pos = torch.arange(N)[None]
    allowed = (~kpm)[:, None, None, :]
    out, w = table_attention(m.table, v, pos, pos, allowed=allowed)
    expect = _mask_and_normalize(m.table[None, :, :N, :N].expand(2, -1, -1, -1), ~kpm)
    real = ~kpm
    torch.testing.assert_close(w[real[:, None, :, None].expand_as(w)], expect[real[:, None, :, None].expand_as(w)])
    torch.testing.assert_close(w.sum(-1), torch.ones(2, H, N, dtype=torch.float64))
    assert (w[1, :, :, 7:] == 0).all()
    torch.testing.assert_close(out, w @ v)
    # causal: bottom-right lower triangle, rows renormalised over j <= i
    _, wc = table_attention(m.table, v, pos[:, -5:], pos, allowed=(pos[:, None, :] <= pos[:, -5:, None])[:, None])
    tri = torch.tril(m.table[:, 6:N, :N], diagonal=6)
    torch.testing.assert_close(wc[0], tri / tri.sum(-1, keepdim=True))


def test_a_row_without_weight_gives_zeros_and_lengths_beyond_the_table_raise():
    table = torch.ones(1, 4, 4, dtype=torch.float64)
    table[0, 2, :2] = 0.0
    v = torch.randn(1, 1, 4, 3, dtype=torch.float64)
    pos = torch.arange(4)[None]
    out, w = table_attention(table, v, pos, pos, allowed=(pos[:, None, :] <= pos[:, :, None])[:, None])
    assert torch.isfinite(out).all()
    torch.testing.assert_close(w[0, 0, 2], torch.tensor([0, 0, 1.0, 0], dtype=torch.float64))
    table[0, 1, :2] = 0.0
    out, w = table_attention(table, v, pos, pos, allowed=(pos[:, None, :] <= pos[:, :, None])[:, None])
    assert (out[0, 0, 1] == 0).all() and (w[0, 0, 1] == 0).all()
    with pytest.raises(ValueError, match="beyond the constant attention table"):
        table_attention(table, torch.randn(1, 1, 5, 3), torch.arange(5)[None], torch.arange(5)[None])
    layer = _papa()
    with pytest.raises(ValueError, match="beyond the constant attention table"):
        layer(_x(n=NMAX + 1))
    with pytest.raises(ValueError, match="beyond the constant attention table"):
        layer.mechanism.reference(_x(n=NMAX + 1))
    _, state = layer.step(_x(n=NMAX), None)
    with pytest.raises(ValueError, match="beyond the constant attention table"):
        layer.step(_x(n=1), state)


def test_static_heads_do_not_depend_on_queries_or_keys():
    layer = _papa()  # every head static
    m = layer.mechanism
    x = _x()
    out, _ = layer(x, is_causal=True)
    with torch.no_grad():
        m.q_proj.weight.normal_()
        m.k_proj.weight.normal_()
        m.k_proj.bias.normal_()
    torch.testing.assert_close(layer(x, is_causal=True)[0], out, rtol=0, atol=0)
    # and is the table's average of the values
    _, _, v = m.project(x, None, None)
    tri = torch.tril(m.table[:, :N, :N])
    heads = (tri / tri.sum(-1, keepdim=True)) @ v
    torch.testing.assert_close(out, m.out_proj(heads.transpose(1, 2).reshape(2, N, D)), rtol=1e-12, atol=1e-12)


def test_mixed_static_and_dynamic_heads():
    layer = _papa(static_heads=(0, 3))
    m = layer.mechanism
    x = _x()
    q, k, v = m.project(x, None, None)
    heads = fastattn.attention(q, k, v, is_causal=True)
    tri = torch.tril(m.table[:, :N, :N])
    heads[:, [0, 3]] = (tri / tri.sum(-1, keepdim=True)) @ v[:, [0, 3]]
    expect = m.out_proj(heads.transpose(1, 2).reshape(2, N, D))
    torch.testing.assert_close(layer(x, is_causal=True)[0], expect, rtol=1e-12, atol=1e-12)
    assert m.core.num_heads == 2


@pytest.mark.parametrize("static", [None, (1, 2)])
def test_fast_path_equals_reference_with_a_position_dependent_table(static):
    layer = _papa(static_heads=static, num_kv_heads=2)
    x = _x().requires_grad_(True)
    ctx = _x(n=14, seed=3)
    for kwargs in ({}, {"is_causal": True}, {"key_padding_mask": _padding()},
                   {"is_causal": True, "key_padding_mask": _padding()}):
        fast, _ = layer(x, **kwargs)
        ref = layer.mechanism.reference(x, **kwargs)
        torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)
        gf = torch.autograd.grad(fast.sum(), x)
        gr = torch.autograd.grad(ref.sum(), x)
        torch.testing.assert_close(gf, gr, rtol=1e-9, atol=1e-11)
    fast, _ = layer(x[:, :5], ctx, ctx, is_causal=True)  # fewer queries than keys: rows at Lk - Lq + i
    torch.testing.assert_close(fast, layer.mechanism.reference(x[:, :5], ctx, ctx, is_causal=True), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("static", [None, (0, 2)])
def test_decoding_with_a_position_dependent_table(static):
    layer = _papa(static_heads=static)
    x = _x()
    full, _ = layer(x, is_causal=True)
    state, outs = None, []
    for chunk in x.split([1, 4, 6], dim=1):
        o, state = layer.step(chunk, state)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-12)
    # left padding: positions count from each row's first real token
    kpm = torch.zeros(2, 6, dtype=torch.bool)
    kpm[1, :3] = True
    prompt = x[:, :6].clone()
    prompt[1, :3] = 99.0
    out, state = layer.step(prompt, None, key_padding_mask=kpm)
    more, state = layer.step(x[:, 6:9], state)
    alone, st1 = layer.step(x[1:2, 3:6], None)
    alone_more, _ = layer.step(x[1:2, 6:9], st1)
    torch.testing.assert_close(out[1:2, 3:], alone, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(more[1:2], alone_more, rtol=1e-10, atol=1e-12)
    beam = state.select([1, 1, 0])
    assert beam.v.shape[0] == 3 and beam.length == 9 and beam.key_padding.shape == (3, 9)


def test_calibrate_is_the_mean_of_the_dynamic_maps():
    torch.manual_seed(0)
    mha = fastattn.MultiheadAttention(D, H, batch_first=True, dtype=torch.float64).eval()
    a, b = _x(n=N), _x(n=7, seed=2)
    kpm = _padding()
    table = calibrate(mha, [(a, kpm), b], max_length=NMAX)
    m = mha.mechanism
    wa = m.core.attention_weights(*m.project(a, None, None)[:2], key_padding_mask=kpm)
    wb = m.core.attention_weights(*m.project(b, None, None)[:2])
    sums = torch.zeros(H, NMAX, NMAX, dtype=torch.float64)
    counts = torch.zeros(NMAX, NMAX, dtype=torch.float64)
    for w, real in ((wa[0], torch.ones(N, dtype=torch.bool)), (wa[1], ~kpm[1]), (wb[0], torch.ones(7, dtype=torch.bool)),
                    (wb[1], torch.ones(7, dtype=torch.bool))):
        n = real.shape[0]
        pair = (real[:, None] & real[None, :]).double()
        sums[:, :n, :n] += w * pair
        counts[:n, :n] += pair
    torch.testing.assert_close(table, sums / counts.clamp_min(1), rtol=1e-12, atol=1e-14)
    assert (table[:, N:, :] == 0).all()


@pytest.mark.parametrize("causal", [False, True])
def test_papa_calibrated_on_one_example_reproduces_the_dynamic_layer(causal):
    torch.manual_seed(0)
    mha = fastattn.MultiheadAttention(D, H, batch_first=True, dtype=torch.float64).eval()
    x = _x(b=1)
    papa = _papa(random_table=False)
    papa.load_state_dict({**mha.state_dict(), "mechanism.table": papa.mechanism.table}, strict=True)
    papa.mechanism.load_table(calibrate(mha, [x], max_length=NMAX, is_causal=causal))
    torch.testing.assert_close(papa(x, is_causal=causal)[0], mha(x, is_causal=causal)[0], rtol=1e-12, atol=1e-12)


def test_bad_options():
    with pytest.raises(ValueError, match="static_heads must be"):
        _papa(static_heads=(H,))
    with pytest.raises(ValueError, match="static_heads must be"):
        _papa(static_heads=())
    with pytest.raises(ValueError, match="static_heads must be"):
        _papa(static_heads=(1, 1))
    with pytest.raises(ValueError, match="max_length must be"):
        _papa(max_length=0)
    with pytest.raises(ValueError, match="table must be"):
        _papa().mechanism.load_table(torch.zeros(H, 3, 3))
    with pytest.raises(ValueError, match="attention weights"):
        calibrate(fastattn.MultiheadAttention(D, H, "linear"), [_x()], max_length=NMAX)


def test_per_head_attn_mask_reaches_the_right_heads():
    layer = _papa(static_heads=(0, 3))
    m = layer.mechanism
    x = _x()
    g = torch.Generator().manual_seed(4)
    masked = (torch.rand(2, H, N, N, generator=g) < 0.4) & ~torch.eye(N, dtype=torch.bool)  # True = may not attend
    out, _ = layer(x, attn_mask=masked.reshape(2 * H, N, N))
    q, k, v = m.project(x, None, None)
    heads = fastattn.attention(q, k, v, attn_mask=masked)
    a = m.table[:, :N, :N] * ~masked[:, [0, 3]]
    heads[:, [0, 3]] = (a / a.sum(-1, keepdim=True)) @ v[:, [0, 3]]
    torch.testing.assert_close(out, m.out_proj(heads.transpose(1, 2).reshape(2, N, D)), rtol=1e-12, atol=1e-12)
