"""switchhead: the defining properties of SwitchHead (Csordás et al. 2023, arXiv 2312.07987).

The contract suite (tests/kinds/test_layer_contract.py) covers layouts, the literal reference, causal
leaks, padding and decoding; here: the value experts are selected by the key token and the output
experts by the query token, the gates are sigmoids of the top-k logits (not renormalised), one expert is
plain attention with those projections, the regulariser is the selection entropy, the routers train
towards balance, and the option checks.
"""

from __future__ import annotations

import pytest
import torch

import fastattn
from helpers import tokens

D, H, N = 24, 4, 11


def _x(b=2, n=N, d=D, seed=1):
    return tokens(b, n, d, seed)


def _sh(h=H, seed=0, **options):
    torch.manual_seed(seed)
    return fastattn.MultiheadAttention(D, h, "switchhead", batch_first=True, dtype=torch.float64, **options).eval()


def _mha_load(m, mha, v_scale, o_scale):
    """torch's MHA weights into a one-expert SwitchHead: W_V = v_scale * mha's, W_O = o_scale * mha's."""
    d = m.head_dim
    w_in, b_in = mha.in_proj_weight, mha.in_proj_bias
    with torch.no_grad():
        for i, lin in enumerate((m.q_proj, m.k_proj)):
            lin.weight.copy_(w_in[i * D:(i + 1) * D])
            lin.bias.copy_(b_in[i * D:(i + 1) * D])
        b_in[2 * D:].zero_()  # the value experts have no bias
        for h in range(m.num_heads):
            m.w_v[h, 0].copy_(w_in[2 * D + h * d:2 * D + (h + 1) * d].T / v_scale)
            m.w_o[h, 0].copy_(mha.out_proj.weight[:, h * d:(h + 1) * d].T / o_scale)
        m.out_bias.copy_(mha.out_proj.bias)


@pytest.mark.parametrize("causal", [False, True])
def test_one_expert_is_plain_attention_with_those_projections(causal):
    """E = k = 1 with zero routers: both gates are sigmoid(0) = 1/2, so SwitchHead is multi-head attention
    with W_V / 2 and W_O / 2 (the output bias unscaled)."""
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(D, H, batch_first=True, dtype=torch.float64).eval()
    with torch.no_grad():
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    layer = _sh(experts=1, active_experts=1)
    m = layer.mechanism
    _mha_load(m, mha, v_scale=0.5, o_scale=0.5)
    with torch.no_grad():
        m.w_source.weight.zero_()
        m.w_dest.weight.zero_()
    x = _x()
    mask = torch.nn.Transformer.generate_square_subsequent_mask(N, dtype=torch.bool) if causal else None
    expect, _ = mha(x, x, x, attn_mask=mask, need_weights=False)
    torch.testing.assert_close(layer(x, is_causal=causal)[0], expect, rtol=1e-12, atol=1e-12)


def test_gates_are_sigmoids_of_the_top_k_logits_not_renormalised():
    layer = _sh(experts=4, active_experts=2)
    m = layer.mechanism
    x = _x()
    for logits, r, w, heads in ((*m.source_routing(x), m.w_source, H), (*m.dest_routing(x), m.w_dest, H)):
        assert torch.equal(logits, (x @ w.weight.T).view(2, N, heads, 4))
        chosen = logits >= logits.topk(2, -1).values[..., -1:]
        assert torch.equal(r.mask, chosen)
        torch.testing.assert_close(r.gates, torch.sigmoid(logits) * chosen, rtol=0, atol=0)
        assert (r.gates.sum(-1) - 1).abs().max() > 1e-2  # not renormalised


def test_values_are_the_key_tokens_own_expert_mixture():
    """Cross-attention: the values depend on the context tokens' source routing only, never the query."""
    layer = _sh(experts=4, active_experts=2, num_kv_heads=2)
    m = layer.mechanism
    x, ctx = _x(n=5), _x(n=9, seed=2)
    _, _, v = m.project(x, ctx, ctx)
    _, _, v_other_query = m.project(_x(n=5, seed=7), ctx, ctx)
    assert torch.equal(v, v_other_query)
    logits = (ctx @ m.w_source.weight.T).view(2, 9, 2, 4)
    chosen = logits >= logits.topk(2, -1).values[..., -1:]
    g = torch.sigmoid(logits) * chosen
    expect = torch.einsum("bjd,hedf,bjhe->bhjf", ctx, m.w_v, g)
    torch.testing.assert_close(v, expect, rtol=1e-12, atol=1e-12)


def test_value_experts_are_selected_by_the_key_token():
    """Causal: changing value expert (g, e) changes query i's output iff some key j <= i chose e as its
    value expert (the key's selection, not query i's)."""
    layer = _sh(h=2, experts=4, active_experts=1)
    m = layer.mechanism
    x = _x()
    out, _ = layer(x, is_causal=True)
    _, src = m.source_routing(x)
    _, dst = m.dest_routing(x)
    checked = 0
    for g in range(2):
        for e in range(4):
            with torch.no_grad():
                m.w_v[g, e] += 0.3
                changed, _ = layer(x, is_causal=True)
                m.w_v[g, e] -= 0.3
            seen = src.mask[:, :, g, e].cummax(dim=1).values  # (B, L): some key j <= i chose e
            torch.testing.assert_close(changed[~seen], out[~seen], rtol=1e-12, atol=1e-12)
            assert ((changed - out).abs().amax(-1)[seen] > 1e-9).all()
            # the query-side selection would give a different pattern: the test can tell them apart
            checked += int(not torch.equal(seen, dst.mask[:, :, g, e]))
    assert checked > 0


def test_output_experts_are_selected_by_the_query_token():
    """Changing output expert (h, e) changes exactly the outputs of the query tokens that chose e for
    head h; changing a key token's destination router input changes nothing about other tokens' values."""
    layer = _sh(experts=3, active_experts=1)
    m = layer.mechanism
    x = _x()
    out, _ = layer(x)
    _, dst = m.dest_routing(x)
    for h in range(H):
        for e in range(3):
            with torch.no_grad():
                m.w_o[h, e] *= 2.0
                changed, _ = layer(x)
                m.w_o[h, e] /= 2.0
            picked = dst.mask[:, :, h, e]
            torch.testing.assert_close(changed[~picked], out[~picked], rtol=1e-12, atol=1e-12)
            assert ((changed - out).abs().amax(-1)[picked] > 1e-9).all()


def test_changing_a_tokens_router_input_changes_only_its_own_selection():
    """Token j's source routing changes only token j's value row; its destination routing only its own
    output experts (checked through the routers: a perturbed row of x moves only its own logits)."""
    layer = _sh(experts=4, active_experts=2)
    m = layer.mechanism
    x = _x()
    y = x.clone()
    y[:, 5] += 3.0
    _, _, v1 = m.project(x, None, None)
    _, _, v2 = m.project(y, None, None)
    diff = (v1 - v2).abs().amax(dim=(1, 3))  # (B, L)
    assert (diff[:, 5] > 0).all() and (diff[:, torch.arange(N) != 5] == 0).all()


def test_aux_loss_is_the_selection_entropy_of_both_routers_on_valid_tokens():
    layer = _sh(experts=4, active_experts=2, entropy_weight=1.0)
    m = layer.mechanism
    x = _x()
    kpm = torch.zeros(2, N, dtype=torch.bool)
    kpm[1, 7:] = True
    layer(x, key_padding_mask=kpm)
    assert layer.aux_loss.item() == 0.0  # eval mode
    layer.train()
    layer(x, key_padding_mask=kpm)

    def neg_entropy(w):
        p = torch.softmax((x @ w.T).view(2, N, H, 4)[~kpm], -1).mean(0)  # (H, E) over real tokens
        return (p * p.log()).sum(-1).mean()

    expect = neg_entropy(m.w_source.weight) + neg_entropy(m.w_dest.weight)
    torch.testing.assert_close(layer.aux_loss, expect, rtol=1e-12, atol=1e-12)
    assert layer.aux_loss >= -2 * torch.log(torch.tensor(4.0, dtype=torch.float64)) - 1e-12


def test_routers_get_gradients_and_aux_loss_moves_the_load_towards_balance():
    torch.manual_seed(0)
    layer = fastattn.MultiheadAttention(D, H, "switchhead", experts=4, active_experts=1, batch_first=True,
                                        entropy_weight=1.0).train()
    m = layer.mechanism
    with torch.no_grad():
        for w in (m.w_source.weight, m.w_dest.weight):
            w.normal_(0, 0.1)
            w.view(H, 4, D)[:, 0] += 0.1  # expert 0 favoured in every head
    x = torch.randn(4, 32, D, generator=torch.Generator().manual_seed(3)) + 0.3
    out, _ = layer(x, is_causal=True)
    gs = torch.autograd.grad(out.square().mean(), [m.w_source.weight, m.w_dest.weight])
    assert all(g.abs().max() > 0 for g in gs)  # the task loss reaches both routers through the gates

    def imbalance():
        return sum((r.mask.float().mean((0, 1)) - 0.25).abs().sum() for _, r in (m.source_routing(x), m.dest_routing(x)))

    before = imbalance()
    opt = torch.optim.SGD([m.w_source.weight, m.w_dest.weight], lr=1.0)
    for _ in range(30):
        opt.zero_grad()
        layer(x, is_causal=True)
        layer.aux_loss.backward()
        opt.step()
    assert before > 2.0 and imbalance() < 0.5 * before


def test_decoding_caches_the_mixed_values():
    layer = _sh(experts=3, active_experts=2)
    m = layer.mechanism
    x = _x()
    _, state = layer.step(x, None)
    _, _, v = m.project(x, None, None)
    torch.testing.assert_close(state.v, v, rtol=0, atol=0)


def test_options_and_parameters():
    m = _sh().mechanism
    assert (m.experts, m.active_experts) == (4, 2)
    assert m.v_proj is None and m.out_proj is None
    assert m.w_v.shape == (H, 4, D, D // H) and m.w_o.shape == (H, 4, D // H, D)
    with pytest.raises(ValueError, match="experts must be >= 1"):
        _sh(experts=0)
    with pytest.raises(ValueError, match="active_experts must be in"):
        _sh(experts=3, active_experts=4)
    with pytest.raises(ValueError, match="unknown option"):
        _sh(moe_k=2)
    with pytest.raises(ValueError, match="layer-level"):
        _sh(core="switchhead")
    layer = _sh(bias=False)
    assert layer.mechanism.out_bias is None and layer(_x())[0].shape == (2, N, D)


@pytest.mark.parametrize("causal", [False, True])
def test_head_dim_option_decouples_the_heads_from_the_width(causal):
    """The paper's few heads of their own width: q/k, the core and the experts at ``head_dim``; the fast
    path equals the reference, and decoding equals the causal forward."""
    layer = _sh(h=2, head_dim=5, experts=3, active_experts=2)
    m = layer.mechanism
    assert m.head_dim == 5 and m.q_proj.weight.shape == (10, D) and m.k_proj.weight.shape == (10, D)
    assert m.w_v.shape == (2, 3, D, 5) and m.w_o.shape == (2, 3, 5, D)
    x = _x()
    out = layer(x, is_causal=causal)[0]
    assert out.shape == (2, N, D)
    torch.testing.assert_close(out, m.reference(x, is_causal=causal))
    if causal:
        torch.testing.assert_close(layer.step(x, None)[0], out)
    with pytest.raises(ValueError, match="head_dim must be >= 1"):
        _sh(head_dim=0)
