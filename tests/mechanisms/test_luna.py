"""luna: the defining properties of Luna (Ma et al. 2021, arXiv 2106.01540).

The layer contract suite covers shapes, fast path == reference (the causal reference is the authors'
sequential loop), causal leaks, padding, decoding and left-padded decoding; here: the causal layer equals
an independent transcription of the authors' ``LunarCausalAttention`` (MIT, facebookresearch/mega,
``efficient_causal_attention_seq``); softplus with beta = ln 2 gives pack weights 1 at zero, and then the
causal output is the running mean of the values; the packed sequence has length l for every n; the
non-causal form leaks the future (so the causal one is a different formula, not a mask); refused inputs.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastattn

D, H, L = 24, 4, 11


def _layer(**options):
    torch.manual_seed(0)
    opts = {"pack_length": 5, **options}
    return fastattn.MultiheadAttention(D, H, "luna", batch_first=True, dtype=torch.float64, **opts).eval()


def _x(b=2, n=L, seed=1):
    return torch.randn(b, n, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _seq(x, y, z):
    """efficient_causal_attention_seq of the authors' code: out_i = x_i (sum_{j <= i} y_j^T z_j) / (i + 1)."""
    acc, rets = 0, []
    for i in range(x.shape[1]):
        acc = acc + y[:, i:i + 1].transpose(1, 2) @ z[:, i:i + 1]
        rets.append((x[:, i:i + 1] @ acc) / (i + 1.0))
    return torch.cat(rets, 1)


def _authors_causal(m, x):
    """LunarCausalAttention.forward (no incremental state), tensors as (B * H, n, d)."""
    b, n, _ = x.shape
    d = D // H
    s = d ** -0.5
    split = lambda t: t.view(b, -1, H, d).transpose(1, 2).reshape(b * H, -1, d)
    pq = split(m.pq_proj(m.p)[None].expand(b, -1, -1)) * s
    pattn = F.softplus(split(m.pc_proj(x)) @ pq.transpose(1, 2), beta=math.log(2.0))
    q = split(m.q_proj(x)) * s
    kv = split(m.c_proj(x))
    attn = torch.softmax(_seq(q, kv, pattn), dim=-1)
    out = _seq(attn, pattn, kv)
    return m.out_proj(out.view(b, H, n, d).transpose(1, 2).reshape(b, n, D))


def test_causal_layer_equals_the_authors_sequential_code():
    layer = _layer()
    x = _x()
    torch.testing.assert_close(layer(x, is_causal=True)[0], _authors_causal(layer.mechanism, x), rtol=1e-10, atol=1e-12)


def test_zero_pack_scores_give_unit_weights_and_running_means():
    layer = _layer()
    m = layer.mechanism
    with torch.no_grad():
        m.pc_proj.weight.zero_(), m.pc_proj.bias.zero_()  # pi = softplus_{ln 2}(0) = 1 everywhere
    x = _x()
    out, _ = layer(x, is_causal=True)
    v = m.c_proj(x)
    mean = v.cumsum(1) / torch.arange(1, L + 1, dtype=x.dtype)[None, :, None]
    torch.testing.assert_close(out, m.out_proj(mean), rtol=1e-10, atol=1e-12)


def test_packed_sequence_has_length_l_for_every_n():
    for pack_heads in (0, 2):
        m = _layer(pack_heads=pack_heads).mechanism
        for n in (1, 7, 40):
            assert m.pack(_x(n=n)).shape == (2, 5, D)
        kpm = torch.zeros(2, 7, dtype=torch.bool)
        kpm[1, 3:] = True
        y = _x(n=7)
        z = y.clone()
        z[1, 3:] = 99.0
        torch.testing.assert_close(m.pack(y, key_padding_mask=kpm), m.pack(z, key_padding_mask=kpm))


def test_non_causal_form_leaks_the_future_the_causal_one_does_not():
    layer = _layer()
    x = _x()
    y = x.clone()
    y[:, 5:] += 3.0
    assert not torch.allclose(layer(x)[0][:, :5], layer(y)[0][:, :5])
    torch.testing.assert_close(layer(x, is_causal=True)[0][:, :5], layer(y, is_causal=True)[0][:, :5])


def test_decoding_carries_running_sums():
    layer = _layer()
    x = _x()
    full, _ = layer(x, is_causal=True)
    a, state = layer.step(x[:, :4])
    assert state.key_sum.shape == (2, H, D // H, 5) and state.value_sum.shape == (2, H, 5, D // H)
    assert state.count.tolist() == [4, 4] and state.length == 4
    b, state = layer.step(x[:, 4:], state)
    torch.testing.assert_close(torch.cat([a, b], 1), full, rtol=1e-10, atol=1e-12)


def test_refused_inputs():
    layer = _layer()
    x = _x()
    with pytest.raises(ValueError, match="self-attention only"):
        layer(x, _x(seed=2), is_causal=True)
    with pytest.raises(ValueError, match="attn_mask"):
        layer(x, attn_mask=torch.zeros(L, L, dtype=torch.bool))
    with pytest.raises(ValueError, match="pack_heads"):
        _layer(pack_heads=2)(x, is_causal=True)
    with pytest.raises(ValueError, match="dropout"):
        fastattn.MultiheadAttention(D, H, "luna", dropout=0.1)
    with pytest.raises(ValueError, match="pack_heads"):
        _layer(pack_heads=5)


def test_causal_chunks_do_not_change_values_or_gradients():
    x = _x().requires_grad_(True)
    w = _x(seed=4)
    results = []
    for chunk in (1, 3, 256):
        layer = _layer(chunk=chunk).train()
        out, _ = layer(x, is_causal=True)
        params = list(layer.parameters())
        results.append((out, torch.autograd.grad((out * w).sum(), [x, *params])))
    for out, gs in results[1:]:
        torch.testing.assert_close(out, results[0][0], rtol=1e-10, atol=1e-12)
        for a, b in zip(gs, results[0][1]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_causal_kernel_path_equals_reference_at_awkward_size():
    """n = 61, one head and GQA, padding, several kernel chunks: the linear-kernel causal form equals the
    authors' token loop on values and gradients, and decoding in uneven pieces equals the forward."""
    n = 61
    for heads, kv_heads in ((1, 1), (4, 2)):
        torch.manual_seed(0)
        layer = fastattn.MultiheadAttention(D, heads, "luna", num_kv_heads=kv_heads, batch_first=True,
                                            dtype=torch.float64, pack_length=3, chunk=8)
        m = layer.mechanism
        x = _x(n=n).requires_grad_(True)
        kpm = torch.zeros(2, n, dtype=torch.bool)
        kpm[1, :5] = True  # left padding
        kpm[1, 50:] = True
        fast, _ = layer(x, key_padding_mask=kpm, is_causal=True)
        ref = m.reference(x, key_padding_mask=kpm, is_causal=True)
        torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)
        w = _x(n=n, seed=7)
        params = [x, *layer.parameters()]
        for a, b in zip(torch.autograd.grad((fast * w).sum(), params), torch.autograd.grad((ref * w).sum(), params)):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
        with torch.no_grad():
            state, pieces = None, []
            for i, j in ((0, 1), (1, 18), (18, 19), (19, n)):
                y, state = layer.step(x[:, i:j], state, key_padding_mask=kpm[:, i:j])
                pieces.append(y)
            torch.testing.assert_close(torch.cat(pieces, 1), fast, rtol=1e-10, atol=1e-12)
            assert state.count.tolist() == [n, 45] and state.length == n
