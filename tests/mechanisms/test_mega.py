"""mega: the defining properties of Mega (Ma et al. 2022, arXiv 2209.10655).

The contract suite (tests/kinds/test_layer_contract.py) covers layouts, fast path == reference (the EMA
by its recurrence, the chunks as a mask), causal leaks, padding and decoding at the default softmax
attention with chunk 5. Here: chunks interact only through the EMA; u = 0 gives out = x; the decoding
cache holds the current chunk only (reset at chunk boundaries); the element-wise attentions and the
bidirectional EMA against the reference; the length-tied table and the single head are validated.
The EMA operator itself is tested against its recurrence in tests/ops/test_ema.py.
"""

from __future__ import annotations

import pytest
import torch

import fastattn

D, N, C = 12, 13, 5
OPTS = {"zdim": 8, "hdim": 10, "ndim": 3, "chunk": C}


def _x(b=2, n=N, seed=1):
    return torch.randn(b, n, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _mega(seed=0, **options):
    torch.manual_seed(seed)
    return fastattn.MultiheadAttention(
        D, 1, "mega", batch_first=True, dtype=torch.float64, **{**OPTS, **options}
    ).eval()


@pytest.mark.parametrize("causal", [False, True])
def test_chunks_interact_only_through_the_ema(causal):
    layer = _mega()
    x = _x()
    y = x.clone()
    y[:, :C] = _x(seed=3)[:, :C]  # change the first chunk only
    a, _ = layer(x, is_causal=causal)
    b, _ = layer(y, is_causal=causal)
    assert not torch.allclose(a[:, C:], b[:, C:])  # the EMA carries the first chunk forward
    with torch.no_grad():
        layer.mechanism.gamma.zero_()  # no EMA: each chunk on its own
    a, _ = layer(x, is_causal=causal)
    b, _ = layer(y, is_causal=causal)
    torch.testing.assert_close(a[:, C:], b[:, C:], rtol=0, atol=0)
    assert not torch.allclose(a[:, :C], b[:, :C])


def test_update_gate_zero_gives_the_input():
    layer = _mega()
    with torch.no_grad():
        layer.mechanism.mx_proj.bias[:D] = -1e4  # u = sigmoid(-1e4) = 0
    x = _x()
    torch.testing.assert_close(layer(x)[0], x, rtol=0, atol=0)


def test_decoding_cache_holds_the_current_chunk_only():
    layer = _mega()
    x = _x(n=17)
    full, _ = layer(x, is_causal=True)
    state, outs = None, []
    for t in range(x.shape[1]):
        out, state = layer.step(x[:, t:t + 1], state)
        outs.append(out)
        assert state.k.shape[1] == (t + 1) % C and state.length == t + 1  # reset at chunk boundaries
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("attention", ["laplace", "relu2"])
def test_element_attention_equals_the_reference(attention):
    layer = _mega(attention=attention)
    kpm = torch.zeros(2, N, dtype=torch.bool)
    kpm[1, 9:] = True
    for causal in (False, True):
        x = _x().requires_grad_(True)
        fast, _ = layer(x, key_padding_mask=kpm, is_causal=causal)
        ref = layer.mechanism.reference(x, key_padding_mask=kpm, is_causal=causal)
        torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)
        g1, = torch.autograd.grad(fast[~kpm].sum(), x)
        g2, = torch.autograd.grad(ref[~kpm].sum(), x)
        torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-11)
    state, outs = None, []
    for chunk in _x().split([4, 9], dim=1):
        out, state = layer.step(chunk, state)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 1), layer(_x(), is_causal=True)[0], rtol=1e-10, atol=1e-12)


def test_element_attention_divides_by_the_number_of_visible_keys():
    """relu2 with zero queries/keys: every visible key weighs relu(bias)^2, not renormalised."""
    layer = _mega(attention="relu2", chunk=-1, max_length=N)
    m = layer.mechanism
    q = torch.zeros(1, 1, 4, 8, dtype=torch.float64)
    v = torch.randn(1, 1, 4, 10, dtype=torch.float64)
    allowed = torch.ones(4, 4, dtype=torch.bool).tril()
    bias = torch.full((4, 4), 0.5, dtype=torch.float64)
    out = m._attend(q, q, v, allowed, bias, reference=True)
    torch.testing.assert_close(out[0, 0], (0.25 * allowed.double()) @ v[0, 0])


def test_bidirectional_ema_reads_the_future_and_equals_the_reference():
    layer = _mega(bidirectional=True, chunk=-1, max_length=N)
    x = _x()
    kpm = torch.zeros(2, N, dtype=torch.bool)
    kpm[1, 8:] = True
    torch.testing.assert_close(layer(x, key_padding_mask=kpm)[0], layer.mechanism.reference(x, key_padding_mask=kpm),
                               rtol=1e-10, atol=1e-12)
    y = x.clone()
    y[:, -1] = _x(seed=8)[:, -1]
    m = layer.mechanism
    ema = lambda t: m._ema(m.norm(t), None, None)[0]
    assert not torch.allclose(ema(x)[:, 0], ema(y)[:, 0])  # the first token's EMA sees the last token
    with pytest.raises(ValueError, match="no causal form"):
        layer(x, is_causal=True)
    with pytest.raises(ValueError, match="cannot decode"):
        layer.step(x, None)


def test_left_padding_is_zeroed_before_the_ema():
    layer = _mega()
    x = _x()
    kpm = torch.zeros(2, N, dtype=torch.bool)
    kpm[1, :4] = True
    y = x.clone()
    y[kpm] = 100.0
    for causal in (False, True):
        a, _ = layer(x, key_padding_mask=kpm, is_causal=causal)
        b, _ = layer(y, key_padding_mask=kpm, is_causal=causal)
        torch.testing.assert_close(a[~kpm], b[~kpm], rtol=1e-10, atol=1e-12)


def test_the_relative_position_table_is_tied_to_the_length():
    layer = _mega(chunk=-1, max_length=8)
    assert layer.mechanism.rel_pos.shape == (15,)
    layer(_x(n=8))
    with pytest.raises(ValueError, match="max_length=8"):
        layer(_x(n=9))
    _, state = layer.step(_x(n=8), None)
    with pytest.raises(ValueError, match="max_length=8"):
        layer.step(_x(n=1), state)
    assert _mega().mechanism.rel_pos.shape == (2 * C - 1,)  # chunked: the table spans one chunk


def test_invalid_settings_are_errors():
    with pytest.raises(ValueError, match="exactly 1 head"):
        fastattn.MultiheadAttention(D, 2, "mega", **OPTS)
    with pytest.raises(ValueError, match="attention must be"):
        _mega(attention="sigmoid")
    with pytest.raises(ValueError, match="chunk must be"):
        _mega(chunk=0)
    with pytest.raises(ValueError, match="attn_mask"):
        _mega()(_x(), attn_mask=torch.ones(N, N, dtype=torch.bool).triu(1))
