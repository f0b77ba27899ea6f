"""LSTMN intra-attention (``MultiheadAttention(method="intra")``): its defining properties. The layer
contract (tests/kinds/test_layer_contract.py) checks forward == reference, step == forward, padding,
causality and gradients."""

from __future__ import annotations

import pytest
import torch

import fastattn
from fastattn.mechanisms.classic import intra as intra_module

D, L = 8, 9


def layer(h=1, hkv=None, seed=0, **options):
    torch.manual_seed(seed)
    return fastattn.MultiheadAttention(
        D, h, "intra", num_kv_heads=hkv, batch_first=True, dtype=torch.float64, **options
    ).eval()


def x_(b=2, n=L, seed=1):
    return torch.randn(b, n, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_weights_cover_only_the_earlier_real_tokens_and_sum_to_one():
    m = layer(h=2)
    kpm = torch.zeros(2, L, dtype=torch.bool)
    kpm[1, 6:] = True
    kpm[1, 2] = True  # a padding token in the middle too
    _, w = m(x_(), key_padding_mask=kpm, is_causal=True, need_weights=True, average_attn_weights=False)
    assert w.shape == (2, 2, L, L)
    assert (w.triu() == 0).all()  # only i < t
    assert (w[1, :, :, 2] == 0).all() and (w[1, :, :, 6:] == 0).all()
    sums = w.sum(-1)
    torch.testing.assert_close(sums[0, :, 1:], torch.ones_like(sums[0, :, 1:]))
    assert (sums[:, :, 0] == 0).all()  # the first token has an empty tape
    real_rows = list(range(1, L))  # every later token of row 1 has a real token before it
    torch.testing.assert_close(sums[1, :, real_rows], torch.ones_like(sums[1, :, real_rows]))


def test_one_hot_weights_on_the_previous_token_reduce_it_to_an_lstm(monkeypatch):
    """With every weight on ``i = t - 1``, ``h~_t = h_{t-1}`` and ``c~_t = c_{t-1}``: an LSTM whose
    input and recurrent weights are the two halves of the gate matrix."""

    def last_one_hot(energy, bias=None, dim=-1):
        out = torch.zeros_like(energy)
        out[..., -1] = 1.0
        return out

    monkeypatch.setattr(intra_module, "masked_softmax", last_one_hot)
    m = layer(h=2, hkv=1)
    x = x_()
    out, _ = m(x, is_causal=True)
    gates = m.mechanism.gates
    cell = torch.nn.LSTMCell(D, D, dtype=torch.float64)
    with torch.no_grad():
        cell.weight_ih.copy_(gates.weight[:, D:])
        cell.weight_hh.copy_(gates.weight[:, :D])
        cell.bias_ih.copy_(gates.bias)
        cell.bias_hh.zero_()
    h = c = torch.zeros(2, D, dtype=torch.float64)
    for t in range(L):
        h, c = cell(x[:, t], (h, c))
        torch.testing.assert_close(out[:, t], h, rtol=1e-12, atol=1e-12)


def test_the_attention_reads_the_previous_summary():
    """``W_h~ h~_{t-1}`` enters the scores (what makes it LSTMN and not additive causal self-attention):
    zeroing it changes the outputs from the third token on, not before."""
    m = layer()
    x = x_()
    a, _ = m(x, is_causal=True)
    with torch.no_grad():
        m.mechanism.w_h_tilde.weight.zero_()
    b, _ = m(x, is_causal=True)
    torch.testing.assert_close(a[:, :2], b[:, :2], rtol=0, atol=0)
    assert not torch.allclose(a[:, 2:], b[:, 2:])


def test_decoding_state_selects_batch_rows():
    m = layer(h=2)
    x = x_(b=3)
    _, state = m.step(x[:, :5])
    out, _ = m.step(x[[2, 0], 5:], state.select([2, 0]))
    full, _ = m(x, is_causal=True)
    torch.testing.assert_close(out, full[[2, 0], 5:], rtol=1e-12, atol=1e-12)
    assert state.length == 5


def test_errors():
    m = layer()
    x = x_()
    with pytest.raises(ValueError, match="is_causal=True"):
        m(x)
    with pytest.raises(ValueError, match="attn_mask"):
        m(x, attn_mask=torch.ones(L, L, dtype=torch.bool).triu(1), is_causal=True)
    with pytest.raises(ValueError, match="attention_dim"):
        layer(h=2, attention_dim=7)
    with pytest.raises(ValueError, match="dropout"):
        fastattn.MultiheadAttention(D, 1, "intra", dropout=0.1)
