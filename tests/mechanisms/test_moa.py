"""moa: the defining properties of Mixture of Attention Heads (Zhang et al. 2022, arXiv 2210.05144).

The contract suite (tests/kinds/test_layer_contract.py) covers layouts, the literal reference, causal
leaks, padding and decoding; here: one expert is plain attention, every expert on with uniform gates is
multi-head attention, the gates are a softmax over the top-k logits (not top-k of a softmax), a token's
output depends only on its selected experts, keys and values are shared, the auxiliary loss is its
formula, the router trains towards balance, and the option checks.
"""

from __future__ import annotations

import pytest
import torch

import fastattn
from helpers import load_torch_mha, torch_mha, tokens

D, H = 24, 6


def _x(b=2, n=11, d=D, seed=1):
    return tokens(b, n, d, seed)


def _moa(h=H, seed=0, **options):
    torch.manual_seed(seed)
    return fastattn.MultiheadAttention(D, h, "moa", batch_first=True, dtype=torch.float64, **options).eval()


def _causal_mask(n):
    return torch.nn.Transformer.generate_square_subsequent_mask(n, dtype=torch.bool)


@pytest.mark.parametrize("causal", [False, True])
def test_one_expert_is_standard_attention(causal):
    """E = k = 1: the gate is exactly 1 and MoA is single-head attention (torch's, 1 head)."""
    mha = torch_mha(D, 1)
    layer = _moa(h=1, active_heads=1)
    load_torch_mha(layer.mechanism, mha)
    x = _x()
    _, r = layer.mechanism.routing(x)
    assert torch.equal(r.gates, torch.ones_like(r.gates))
    expect, _ = mha(x, x, x, attn_mask=_causal_mask(11) if causal else None, need_weights=False)
    torch.testing.assert_close(layer(x, is_causal=causal)[0], expect, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_every_expert_with_uniform_gates_is_multihead_attention(causal):
    """k = E, router zero: every gate is 1/E, so MoA is multi-head attention whose heads are the experts,
    out-projections summed, with W_o scaled by 1/E."""
    mha = torch_mha(D, H)
    layer = _moa(active_heads=H)
    m = layer.mechanism
    load_torch_mha(m, mha, out_scale=H)
    with torch.no_grad():
        m.w_gate.weight.zero_()
    x = _x()
    expect, _ = mha(x, x, x, attn_mask=_causal_mask(11) if causal else None, need_weights=False)
    torch.testing.assert_close(layer(x, is_causal=causal)[0], expect, rtol=1e-12, atol=1e-12)


def test_gates_are_a_softmax_over_the_top_k_logits():
    layer = _moa(active_heads=3)
    m = layer.mechanism
    x = _x()
    logits, r = m.routing(x)
    kth = logits.topk(3, -1).values[..., -1:]
    chosen = logits >= kth
    assert torch.equal(r.mask, chosen) and ((r.gates != 0) == chosen).all()
    expect = torch.softmax(logits.masked_fill(~chosen, float("-inf")), -1)
    torch.testing.assert_close(r.gates, expect, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(r.gates.sum(-1), torch.ones(2, 11, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    # not the top k of the softmax over all experts
    assert (r.gates - torch.softmax(logits, -1).masked_fill(~chosen, 0)).abs().max() > 1e-3


@pytest.mark.parametrize("causal", [False, True])
def test_a_token_depends_only_on_its_selected_experts(causal):
    """Changing expert e's own weights (its query and output projections) changes exactly the outputs of
    the tokens that selected e."""
    layer = _moa(active_heads=2)
    m = layer.mechanism
    x = _x()
    _, r = m.routing(x)
    out, _ = layer(x, is_causal=causal)
    d = m.head_dim
    for e in range(H):
        with torch.no_grad():
            saved = m.q_proj.weight.clone(), m.out_proj.weight.clone()
            m.q_proj.weight[e * d:(e + 1) * d] += 0.5
            m.out_proj.weight[:, e * d:(e + 1) * d] *= 3.0
            changed, _ = layer(x, is_causal=causal)
            m.q_proj.weight.copy_(saved[0])
            m.out_proj.weight.copy_(saved[1])
        picked = r.mask[..., e]
        assert picked.any() and (~picked).any()
        torch.testing.assert_close(changed[~picked], out[~picked], rtol=1e-12, atol=1e-12)
        assert ((changed - out).abs().amax(-1)[picked] > 1e-6).all()


def test_keys_and_values_are_shared_by_the_experts():
    """num_kv_heads=1 (the paper's MoA): one K and one V; every expert's output is attention of its own
    query over the same K, V."""
    torch.manual_seed(0)
    layer = fastattn.MultiheadAttention(D, H, "moa", num_kv_heads=1, active_heads=2, batch_first=True,
                                        dtype=torch.float64).eval()
    m = layer.mechanism
    assert m.k_proj.weight.shape == (D // H, D) and m.v_proj.weight.shape == (D // H, D)
    x = _x()
    q, k, v = m.project(x, None, None)
    assert q.shape[1] == H and k.shape[1] == 1 and v.shape[1] == 1
    heads = torch.stack([fastattn.attention(q[:, e:e + 1], k, v) for e in range(H)], 1)[:, :, 0]
    _, r = m.routing(x)
    expect = m.out_proj((heads * r.gates.transpose(1, 2).unsqueeze(-1)).transpose(1, 2).reshape(*x.shape))
    torch.testing.assert_close(layer(x)[0], expect, rtol=1e-12, atol=1e-12)


def test_aux_loss_is_weighted_balance_plus_z_loss_on_valid_tokens_in_training_only():
    layer = _moa(active_heads=2, balance_weight=0.3, z_weight=0.02)
    m = layer.mechanism
    x = _x()
    kpm = torch.zeros(2, 11, dtype=torch.bool)
    kpm[1, 7:] = True
    layer(x, key_padding_mask=kpm)
    assert layer.aux_loss.item() == 0.0  # eval mode
    layer.train()
    layer(x, key_padding_mask=kpm)
    logits = (x @ m.w_gate.weight.T)[~kpm]  # (tokens, E): real tokens only
    p = torch.softmax(logits, -1)
    chosen = (logits >= logits.topk(2, -1).values[:, -1:]).double()
    balance = H * sum(p[:, e].mean() * chosen[:, e].mean() for e in range(H))
    z = (torch.logsumexp(logits, -1) ** 2).mean()
    torch.testing.assert_close(layer.aux_loss, 0.3 * balance + 0.02 * z, rtol=1e-12, atol=1e-12)


def test_router_gets_gradients_and_aux_loss_moves_the_load_towards_balance():
    torch.manual_seed(0)
    layer = fastattn.MultiheadAttention(D, H, "moa", active_heads=2, batch_first=True, balance_weight=1.0,
                                        z_weight=0.0).train()
    m = layer.mechanism
    with torch.no_grad():  # a router that favours experts 0 and 1
        m.w_gate.weight.normal_(0, 0.1)
        m.w_gate.weight[:2] += 0.1
    x = torch.randn(4, 32, D, generator=torch.Generator().manual_seed(3)) + 0.3

    def load():
        _, r = m.routing(x)
        return r.mask.float().mean((0, 1))

    before = load()
    out, _ = layer(x, is_causal=True)
    (g,) = torch.autograd.grad(out.square().mean(), m.w_gate.weight)
    assert g.abs().max() > 0  # the task loss reaches the router through the gates
    opt = torch.optim.SGD(m.w_gate.parameters(), lr=0.1)
    for _ in range(30):
        opt.zero_grad()
        layer(x, is_causal=True)
        layer.aux_loss.backward()
        opt.step()
    after = load()
    uniform = torch.full_like(before, 2 / H)
    assert (before - uniform).abs().sum() > 0.5
    assert (after - uniform).abs().sum() < 0.25 * (before - uniform).abs().sum()


def test_default_and_bad_options():
    assert _moa().mechanism.active_heads == 4
    assert _moa(h=2).mechanism.active_heads == 2
    with pytest.raises(ValueError, match="active_heads must be in"):
        _moa(active_heads=0)
    with pytest.raises(ValueError, match="active_heads must be in"):
        _moa(active_heads=H + 1)
    with pytest.raises(ValueError, match="balance_weight must be"):
        _moa(balance_weight=-1.0)
    with pytest.raises(ValueError, match="unknown option"):
        _moa(experts=4)
    with pytest.raises(ValueError, match="layer-level"):
        _moa(core="moa")


def test_other_core_and_cross_attention():
    layer = _moa(active_heads=2, core="local", core_options={"window": 3, "block": 4})
    m = layer.mechanism
    x, ctx = _x(n=5), _x(n=9, seed=2)
    out, w = layer(x, ctx, ctx, need_weights=True)
    assert w is None
    q, k, v = m.project(x, ctx, ctx)
    _, r = m.routing(x)
    heads = m.core.run(q, k, v) * r.gates.transpose(1, 2).unsqueeze(-1)
    torch.testing.assert_close(out, m.out_proj(heads.transpose(1, 2).reshape(*x.shape)), rtol=1e-12, atol=1e-12)
