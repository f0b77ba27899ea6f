"""moh: the defining properties of Mixture-of-Head attention (Jin et al. 2024, arXiv 2410.11842).

The contract suite (tests/kinds/test_layer_contract.py) covers layouts, the literal reference, causal
leaks, padding and decoding; here: MoH with every head on is multi-head attention with each head's output
scaled by its gate (and exactly torch's MultiheadAttention when the routers are uniform), top-k selects k
routed heads per token and an unselected head does not reach the token, the load-balance loss is its
formula, the defaults and the option checks.
"""

from __future__ import annotations

import pytest
import torch

import fastattn
from helpers import load_torch_mha, torch_mha, tokens

D, H = 24, 6


def _x(b=2, n=11, d=D, seed=1):
    return tokens(b, n, d, seed)


def _moh(h=H, seed=0, **options):
    torch.manual_seed(seed)
    return fastattn.MultiheadAttention(D, h, "moh", batch_first=True, dtype=torch.float64, **options).eval()


def _expected_gates(m, x):
    """The paper's gates written independently of the implementation, for ``k`` = every routed head
    (no selection): routed ``k * softmax(x W_r)``, shared ``h_s * softmax(x W_s)`` (1 when h_s = 1), both
    scaled by ``2 * softmax(x W_h)``."""
    hs, hr = m.shared_heads, m.routed_heads
    parts = []
    if hs:
        parts.append(hs * torch.softmax(x @ m.w_shared.weight.T, -1) if hs > 1 else torch.ones_like(x[..., :1]))
    if hr:
        parts.append(hr * torch.softmax(x @ m.w_route.weight.T, -1))
    if hs and hr:
        a = 2 * torch.softmax(x @ m.w_mix.weight.T, -1)
        parts = [parts[0] * a[..., :1], parts[1] * a[..., 1:]]
    return torch.cat(parts, -1)


def _heads(m, x, causal=False):
    """Every head's output ``(B, H, L, E)`` by plain softmax attention on the layer's projections."""
    q, k, v = m.project(x, None, None)
    return fastattn.attention(q, k, v, "softmax", is_causal=causal)


@pytest.mark.parametrize("shared", [0, 1, 2, H])
@pytest.mark.parametrize("causal", [False, True])
def test_uniform_routers_with_every_head_on_is_torch_multihead_attention(shared, causal):
    mha = torch_mha(D, H)
    layer = _moh(shared_heads=shared, active_heads=H - shared)
    m = layer.mechanism
    load_torch_mha(m, mha)
    with torch.no_grad():
        for router in (m.w_route, m.w_shared, m.w_mix):
            if router is not None:
                router.weight.zero_()
    x = _x()
    g, _ = m.gates(x)
    assert torch.equal(g, torch.ones_like(g))  # every gate exactly 1: the rescalings are all there
    mask = torch.nn.Transformer.generate_square_subsequent_mask(11, dtype=torch.bool) if causal else None
    expect, _ = mha(x, x, x, attn_mask=mask, need_weights=False)
    torch.testing.assert_close(layer(x, is_causal=causal)[0], expect, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shared", [0, 1, 3])
def test_every_head_on_is_multihead_attention_with_gated_heads(shared):
    """With k = every routed head nothing is dropped: MoH is MHA whose head outputs are scaled by the
    gates before the output projection (O = sum_i g_i H^i W_O^i)."""
    layer = _moh(shared_heads=shared, active_heads=H - shared)
    m = layer.mechanism
    x = _x()
    g = _expected_gates(m, x)
    assert (g - 1).abs().max() > 0.05  # the gates do rescale
    for causal in (False, True):
        heads = _heads(m, x, causal) * g.transpose(1, 2).unsqueeze(-1)
        expect = m.out_proj(heads.transpose(1, 2).reshape(*x.shape))
        torch.testing.assert_close(layer(x, is_causal=causal)[0], expect, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shared,active", [(0, 2), (2, 1), (2, 3), (1, 4)])
def test_top_k_selects_k_routed_heads_per_token(shared, active):
    layer = _moh(shared_heads=shared, active_heads=active)
    m = layer.mechanism
    x = _x()
    g, routing = m.gates(x)
    assert (g[..., :shared] > 0).all()  # shared heads are always on
    routed = g[..., shared:]
    assert ((routed != 0).sum(-1) == active).all()
    p = torch.softmax(x @ m.w_route.weight.T, -1)
    kth = p.topk(active, -1).values[..., -1:]
    assert torch.equal(routed != 0, p >= kth)  # the k most probable routed heads
    assert torch.equal(routing.mask, p >= kth)
    # the selected heads' p, renormalised over the top k, times k (times alpha_2 with shared heads)
    kept = torch.where(p >= kth, p, 0)
    expect = active * kept / kept.sum(-1, keepdim=True)
    if shared:
        expect = expect * 2 * torch.softmax(x @ m.w_mix.weight.T, -1)[..., 1:]
    torch.testing.assert_close(routed, expect, rtol=1e-12, atol=1e-14)


def test_an_unselected_head_does_not_reach_the_token():
    """Perturbing the value projection of routed head i changes exactly the outputs of the tokens that
    selected i."""
    layer = _moh(shared_heads=1, active_heads=2)
    m = layer.mechanism
    x = _x()
    g, _ = m.gates(x)
    out, _ = layer(x)
    e = m.head_dim
    for i in range(1, H):
        with torch.no_grad():
            m.v_proj.weight[i * e:(i + 1) * e] += 0.5
            changed, _ = layer(x)
            m.v_proj.weight[i * e:(i + 1) * e] -= 0.5
        picked = g[..., i] != 0
        assert picked.any() and (~picked).any()
        torch.testing.assert_close(changed[~picked], out[~picked], rtol=1e-12, atol=1e-12)
        assert ((changed - out).abs().amax(-1)[picked] > 1e-6).all()


def test_load_balance_loss_is_its_formula_on_valid_tokens_in_training_only():
    assert fastattn.get_method("moh").options["balance_weight"] == 0.01  # the paper's beta
    layer = _moh(shared_heads=2, active_heads=2, balance_weight=1.0)
    m = layer.mechanism
    x = _x()
    kpm = torch.zeros(2, 11, dtype=torch.bool)
    kpm[1, 7:] = True
    layer(x, key_padding_mask=kpm)
    assert layer.aux_loss.item() == 0.0  # eval mode
    layer.train()
    layer(x, key_padding_mask=kpm)
    p = torch.softmax(x @ m.w_route.weight.T, -1)[~kpm]  # (tokens, E): real tokens only
    chosen = (p >= p.topk(2, -1).values[:, -1:]).double()
    n_experts = H - 2
    expect = n_experts * sum(p[:, j].mean() * chosen[:, j].mean() for j in range(n_experts))
    torch.testing.assert_close(layer.aux_loss, expect, rtol=1e-12, atol=1e-12)
    (gw,) = torch.autograd.grad(layer.aux_loss, m.w_route.weight)
    assert gw.abs().max() > 0
    layer(x)  # no padding: every token counts
    p = torch.softmax(x @ m.w_route.weight.T, -1).reshape(-1, n_experts)
    chosen = (p >= p.topk(2, -1).values[:, -1:]).double()
    torch.testing.assert_close(layer.aux_loss, n_experts * (p.mean(0) * chosen.mean(0)).sum(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("h,shared,active,routed", [(12, 3, 6, 9), (8, 2, 4, 6), (4, 1, 2, 3), (2, 0, 2, 2), (1, 0, 1, 1)])
def test_default_head_counts(h, shared, active, routed):
    m = _moh(h=h).mechanism
    assert (m.shared_heads, m.active_heads, m.routed_heads) == (shared, active, routed)


def test_one_head_is_plain_attention():
    layer = _moh(h=1)
    x = _x()
    m = layer.mechanism
    expect = m.out_proj(_heads(m, x).transpose(1, 2).reshape(*x.shape))
    torch.testing.assert_close(layer(x)[0], expect, rtol=1e-12, atol=1e-12)


def test_bad_options_are_value_errors():
    with pytest.raises(ValueError, match="shared_heads must be in"):
        _moh(shared_heads=H + 1)
    with pytest.raises(ValueError, match="active_heads must be in"):
        _moh(shared_heads=2, active_heads=5)
    with pytest.raises(ValueError, match="active_heads must be in"):
        _moh(shared_heads=2, active_heads=0)
    with pytest.raises(ValueError, match="no routed heads"):
        _moh(shared_heads=H, active_heads=2)
    with pytest.raises(ValueError, match="layer-level"):
        _moh(core="moh")
    with pytest.raises(ValueError, match="unknown attention method"):
        _moh(core="no_such_core")
    with pytest.raises(ValueError, match="unknown option"):
        _moh(core="local", core_options={"windoww": 3})
    with pytest.raises(ValueError, match="unknown option"):
        _moh(num_shared_heads=2)
    with pytest.raises(TypeError, match="core_options must be a dict"):
        _moh(core_options=[("window", 3)])
    with pytest.raises(ValueError, match="draws no random numbers"):
        fastattn.MultiheadAttention(D, H, "moh", generator=torch.Generator())
    with pytest.raises(ValueError, match="no attention weights to drop out"):
        fastattn.MultiheadAttention(D, H, "moh", core="linear", dropout=0.1)
    with pytest.raises(ValueError, match="no causal form"):
        _moh(core="efficient")(_x(), is_causal=True)
    with pytest.raises(ValueError, match="incremental decoding"):
        _moh(core="efficient").step(_x(), None)


def test_core_options_reach_the_core_and_a_generator_reaches_a_random_core():
    layer = _moh(core="local", core_options={"window": 3, "block": 4})
    assert layer.attn.options.window == 3
    a = fastattn.MultiheadAttention(D, H, "moh", core="performer", generator=torch.Generator().manual_seed(3))
    b = fastattn.MultiheadAttention(D, H, "moh", core="performer", generator=torch.Generator().manual_seed(3))
    c = fastattn.MultiheadAttention(D, H, "moh", core="performer", generator=torch.Generator().manual_seed(4))
    buffers = lambda m: torch.cat([t.flatten() for t in m.attn.buffers()])
    assert torch.equal(buffers(a), buffers(b)) and not torch.equal(buffers(a), buffers(c))


def test_cross_attention_routes_on_the_query_and_gives_no_weights():
    layer = _moh(shared_heads=1, active_heads=3)
    m = layer.mechanism
    x, ctx = _x(n=5), _x(n=9, seed=2)
    out, w = layer(x, ctx, ctx, need_weights=True)
    assert w is None  # gated heads: no single attention matrix to report
    q, k, v = m.project(x, ctx, ctx)
    g, _ = m.gates(x)
    heads = fastattn.attention(q, k, v) * g.transpose(1, 2).unsqueeze(-1)
    torch.testing.assert_close(out, m.out_proj(heads.transpose(1, 2).reshape(*x.shape)), rtol=1e-12, atol=1e-12)
