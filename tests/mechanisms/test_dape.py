"""dape: the defining properties of DAPE V2 (Zheng et al. 2024, arXiv 2410.04798).

The sequence contract suite covers reference == fast path (values, gradients, padding, causal), causal
leaks and decoding == causal forward. Here: zero networks give softmax with the plain bias (ALiBi,
Kerple); the authors' V2 forward (``Alibi_DAPEV2`` in chuanyang-Zheng/DAPE, ``DAPE.py``; the repository,
a GPT-NeoX fork, states no licence of its own, so it is re-expressed here from its equations, not
copied) agrees on every causal row but the last (module docstring: the halo of the hidden map), and
kernel 1 is the V1 MLP (``AliBi_DAPE``); masked scores reach the network as zeros; the tril is offset
for fewer queries than keys; the network mixes heads.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn.ops.positions import alibi_slopes

B, H, L, E = 2, 4, 11, 8


def _qkv(lq=L, lk=L, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, lq, E, generator=g, dtype=torch.float64)
    k = torch.randn(B, H, lk, E, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, lk, E, generator=g, dtype=torch.float64)
    return q, k, v


def _dape(seed=0, **options):
    torch.manual_seed(seed)
    spec = fastattn.get_method("dape")
    opts = {"mlp_width": 6, "query_chunk": 4, **options}
    return spec.cls(spec.make_options(**opts), head_dim=E, num_heads=H).double().eval()


def _alibi_causal(n):
    """The authors' ALiBi matrix: -tril(i - j) * slope_h (zero above the diagonal)."""
    i = torch.arange(n)
    return -torch.tril(i[:, None] - i[None, :]).double() * alibi_slopes(H)[:, None, None]


def _authors_v2(m, q, k, v):
    """``Alibi_DAPEV2.forward`` re-expressed: x + a + mlp2(tril(cat(x, a))), mlp2 = two Conv2d with
    zero padding (0, kappa // 2), then the causal softmax."""
    x = (q @ k.transpose(-1, -2)) * E ** -0.5
    a = _alibi_causal(q.shape[2])
    feats = torch.tril(torch.cat([x, a.expand(q.shape[0], -1, -1, -1)], dim=1))
    f = m.conv2(F.leaky_relu(m.conv1(feats)))
    y = x + a + f
    causal = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).tril()
    return torch.softmax(y.masked_fill(~causal, float("-inf")), -1) @ v


def _authors_v1(m, q, k, v):
    """``AliBi_DAPE.forward`` (V1): x + a + MLP(cat(x, a)) per entry, MLP = Linear(2H, W), LeakyReLU,
    Linear(W, H); the kernel-1 convolutions' weights are the linear maps."""
    x = (q @ k.transpose(-1, -2)) * E ** -0.5
    a = _alibi_causal(q.shape[2])
    feats = torch.cat([x, a.expand(q.shape[0], -1, -1, -1)], dim=1).permute(0, 2, 3, 1)
    hidden = F.leaky_relu(feats @ m.conv1.weight[:, :, 0, 0].T + m.conv1.bias)
    f = (hidden @ m.conv2.weight[:, :, 0, 0].T + m.conv2.bias).permute(0, 3, 1, 2)
    causal = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).tril()
    return torch.softmax((x + a + f).masked_fill(~causal, float("-inf")), -1) @ v


def test_agrees_with_the_authors_v2_on_every_causal_row_but_the_last():
    m = _dape()
    q, k, v = _qkv()
    ours = m.run(q, k, v, is_causal=True)
    theirs = _authors_v2(m, q, k, v)
    torch.testing.assert_close(ours[:, :, :-1], theirs[:, :, :-1], rtol=1e-10, atol=1e-12)
    # the last row: the authors zero-pad the hidden map beyond the last key, we continue it by the
    # network of zero features (what every other row sees); so our row L-1 equals row L-1 of a longer input
    q2, k2, v2 = (torch.cat([t, t[:, :, :3]], 2) for t in (q, k, v))
    torch.testing.assert_close(ours[:, :, -1], m.run(q2, k2, v2, is_causal=True)[:, :, L - 1], rtol=1e-10, atol=1e-12)


def test_kernel_one_is_dape_v1():
    m = _dape(kernel=1)
    q, k, v = _qkv()
    torch.testing.assert_close(m.run(q, k, v, is_causal=True), _authors_v1(m, q, k, v), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bias", ["alibi", "kerple", "none"])
def test_a_zero_network_is_softmax_with_the_bias(bias):
    m = _dape(bias=bias)
    with torch.no_grad():
        for p in (m.conv1.weight, m.conv1.bias, m.conv2.weight, m.conv2.bias):
            p.zero_()
    q, k, v = _qkv()
    i = torch.arange(L)
    dist = (i[:, None] - i[None, :]).abs().double()
    if bias == "alibi":
        a = -alibi_slopes(H)[:, None, None] * dist
    elif bias == "kerple":
        a = -m.kerple_p.detach()[:, None, None] * torch.log1p(m.kerple_a.detach()[:, None, None] * dist)
    else:
        a = torch.zeros(H, L, L, dtype=torch.float64)
    for causal in (False, True):
        expect = F.scaled_dot_product_attention(q, k, v, attn_mask=a.masked_fill(i[None, :] > i[:, None], float("-inf"))
                                                if causal else a)
        torch.testing.assert_close(m.run(q, k, v, is_causal=causal), expect, rtol=1e-10, atol=1e-12)


def test_masked_scores_reach_the_network_as_zeros():
    """Huge scores at padded keys (and in the future) change nothing, and a padded batch row equals the
    same row truncated (padding columns are the zero continuation of the row)."""
    m = _dape()
    q, k, v = _qkv()
    kpm = torch.zeros(B, L, dtype=torch.bool)
    kpm[1, 7:] = True
    k2 = k.clone()
    k2[1, :, 7:] = 1e6
    for causal in (False, True):
        a = m.run(q, k, v, key_padding_mask=kpm, is_causal=causal)
        b = m.run(q, k2, v, key_padding_mask=kpm, is_causal=causal)
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        if not causal:
            short = m.run(q[1:, :, :7], k[1:, :, :7], v[1:, :, :7])
            torch.testing.assert_close(a[1:, :, :7], short, rtol=1e-10, atol=1e-12)


def test_the_tril_is_offset_for_fewer_queries_than_keys():
    m = _dape()
    q, k, v = _qkv()
    full = m.run(q, k, v, is_causal=True)
    for lq in (1, 4):
        part = m.run(q[:, :, -lq:], k, v, is_causal=True)
        torch.testing.assert_close(part, full[:, :, -lq:], rtol=1e-10, atol=1e-12)
        ref = m.run(q[:, :, -lq:], k, v, is_causal=True, reference=True)
        torch.testing.assert_close(part, ref, rtol=1e-10, atol=1e-12)


def test_the_network_mixes_heads():
    m = _dape()
    q, k, v = _qkv()
    q2 = q.clone()
    q2[:, 0] = torch.randn_like(q2[:, 0])
    a, b = m.run(q, k, v), m.run(q2, k, v)
    assert not torch.allclose(a[:, 1:], b[:, 1:])  # other heads see head 0's scores through f


def test_invalid_options():
    with pytest.raises(ValueError, match="kernel must be"):
        _dape(kernel=2)
    with pytest.raises(ValueError, match="bias must be"):
        _dape(bias="rope")
