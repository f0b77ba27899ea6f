"""ops/routing: top-k gates and the router's auxiliary losses, against their formulas."""

from __future__ import annotations

import pytest
import torch

from fastattn.ops.routing import load_balance_loss, route, z_loss


def _logits(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_softmax_renormalised_gates_are_a_softmax_over_the_selected_logits(k):
    logits = _logits(2, 11, 7, seed=k)
    r = route(logits, k)
    assert (r.mask.sum(-1) == k).all()
    assert r.index.shape == (2, 11, k) and r.mask.gather(-1, r.index).all()
    kth = logits.topk(k, dim=-1).values[..., -1:]
    assert torch.equal(r.mask, logits >= kth)  # the k largest logits, per token
    expect = torch.softmax(logits.masked_fill(~r.mask, float("-inf")), dim=-1)
    torch.testing.assert_close(r.gates, expect, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(r.probs, torch.softmax(logits, -1))


def test_gates_without_renormalisation_and_sigmoid_gates():
    logits = _logits(5, 6)
    r = route(logits, 2, renormalize=False)
    torch.testing.assert_close(r.gates, torch.softmax(logits, -1) * r.mask)
    s = route(logits, 2, gate="sigmoid", renormalize=False)
    torch.testing.assert_close(s.gates, torch.sigmoid(logits) * s.mask)
    torch.testing.assert_close(s.probs, torch.sigmoid(logits))
    sn = route(logits, 2, gate="sigmoid")
    torch.testing.assert_close(sn.gates.sum(-1), torch.ones(5, dtype=torch.float64))


def test_gates_are_differentiable_in_the_selected_logits():
    logits = _logits(4, 5).requires_grad_(True)
    r = route(logits, 2, renormalize=False)
    (g,) = torch.autograd.grad((r.gates * _logits(4, 5, seed=3)).sum(), logits)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_load_balance_loss_formula_and_bounds():
    logits = _logits(3, 9, 4)
    r = route(logits, 2)
    tokens_p, tokens_m = r.probs.reshape(-1, 4), r.mask.reshape(-1, 4).double()
    expect = 4 * sum(tokens_m[:, e].mean() * tokens_p[:, e].mean() for e in range(4))
    torch.testing.assert_close(load_balance_loss(r.probs, r.mask), expect)
    # uniform routing gives k; one expert taking every token with all the probability gives E * 1 * 1
    uniform = torch.full((8, 4), 0.25, dtype=torch.float64)
    half = torch.zeros(8, 4, dtype=torch.bool)
    half[:4, :2], half[4:, 2:] = True, True
    assert load_balance_loss(uniform, half).item() == pytest.approx(2.0)
    peaked = torch.zeros(8, 4, dtype=torch.float64)
    peaked[:, 0] = 1.0
    assert load_balance_loss(peaked, peaked > 0).item() == pytest.approx(4.0)


def test_invalid_tokens_do_not_count():
    logits = _logits(2, 7, 5)
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, 4:] = False
    r = route(logits, 2)
    garbage = logits.clone()
    garbage[~valid] = 50.0 * _logits(int((~valid).sum()), 5, seed=9)
    g = route(garbage, 2)
    torch.testing.assert_close(load_balance_loss(r.probs, r.mask, valid), load_balance_loss(g.probs, g.mask, valid))
    torch.testing.assert_close(z_loss(logits, valid), z_loss(garbage, valid))
    assert load_balance_loss(r.probs, r.mask) != load_balance_loss(g.probs, g.mask)
    with pytest.raises(ValueError, match="one entry per token"):
        load_balance_loss(r.probs, r.mask, valid[:, :3])


def test_z_loss_formula():
    logits = _logits(3, 4, 6)
    torch.testing.assert_close(z_loss(logits), torch.logsumexp(logits, -1).pow(2).mean())


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="k must be in"):
        route(_logits(3, 4), 5)
    with pytest.raises(ValueError, match="k must be in"):
        route(_logits(3, 4), 0)
    with pytest.raises(ValueError, match="gate must be one of"):
        route(_logits(3, 4), 1, gate="relu")


def test_router_loss_is_the_weighted_sum_of_the_terms_it_is_given():
    from fastattn.ops.routing import entropy_loss, router_loss

    logits = _logits(2, 5, 3, 4)
    r = route(logits, 2)
    parts = {"balance": load_balance_loss(r.probs, r.mask), "z": z_loss(logits), "entropy": entropy_loss(logits)}
    total = router_loss(r, {"balance": 0.5, "z": 0.25, "entropy": 2.0})
    torch.testing.assert_close(total, 0.5 * parts["balance"] + 0.25 * parts["z"] + 2.0 * parts["entropy"])
    assert router_loss(r, {"balance": 0.0, "z": 0.0}) is None


@pytest.mark.parametrize("method,terms", [("moh", ("balance", "z")), ("moa", ("balance", "z")), ("switchhead", ("entropy",))])
def test_every_routed_layer_reports_its_losses_weighted_by_its_options(method, terms):
    """The convention of ops/routing: aux_loss is already weighted by the layer's <term>_weight options
    (linear in them; all zero: no loss), so a training loop adds it as it is."""
    import fastattn

    def aux(**weights):
        torch.manual_seed(0)
        layer = fastattn.MultiheadAttention(24, 4, method, batch_first=True, dtype=torch.float64, **weights).train()
        layer(_logits(2, 7, 24, seed=3))
        return layer.aux_loss

    ones = aux(**{f"{t}_weight": 1.0 for t in terms})
    assert ones.abs() > 0
    torch.testing.assert_close(aux(**{f"{t}_weight": 3.0 for t in terms}), 3.0 * ones)
    assert aux(**{f"{t}_weight": 0.0 for t in terms}).item() == 0.0
    with pytest.raises(ValueError, match=f"{terms[0]}_weight must be"):
        aux(**{f"{terms[0]}_weight": -1.0})


def test_tokens_grouped_by_expert_round_trip():
    from fastattn.ops.routing import gather_tokens, group_by_expert, scatter_tokens

    sel = torch.rand(2, 9, 4, generator=torch.Generator().manual_seed(1)) < 0.4
    sel[0, :, 3] = False  # an expert nobody chose
    index, valid = group_by_expert(sel)
    assert index.shape[-1] == int(sel.sum(1).max()) and torch.equal(valid.sum(-1), sel.sum(1))
    for b in range(2):
        for g in range(4):
            assert index[b, g][valid[b, g]].tolist() == sel[b, :, g].nonzero().flatten().tolist()  # in order
    x = _logits(2, 4, 9, 3)
    back = scatter_tokens(gather_tokens(x, index), index, valid, 9)
    torch.testing.assert_close(back, x * sel.transpose(1, 2)[..., None])
