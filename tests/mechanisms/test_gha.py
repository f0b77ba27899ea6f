"""gha: the defining properties of Grouped Head Attention (Ni et al., ACL 2023, arXiv 2305.14380).

The contract suite (tests/kinds/test_layer_contract.py) covers layouts, causal leaks, padding and
decoding; here: before pruning GHA is multi-head attention, the group-constraint loss is Eq. 4(B) (zero
homogenisation when heads within a group are identical; with singleton groups every head is a pillar),
k-means groups are deterministic, Voting-to-Stay keeps the head closest to its group's unit, pruning
leaves exactly the kept heads and equals multi-head attention restricted to them, the loss trains the
heads towards their groups, and the option checks.
"""

from __future__ import annotations

import pytest
import torch

import fastattn
from helpers import load_torch_mha, torch_mha, tokens
from fastattn.ops.cluster import kmeans

D, H, N = 24, 6, 11


def _x(b=2, n=N, d=D, seed=1):
    return tokens(b, n, d, seed)


def _gha(h=H, seed=0, **options):
    torch.manual_seed(seed)
    return fastattn.MultiheadAttention(D, h, "gha", batch_first=True, dtype=torch.float64, **options).eval()


def _cos_dist(a, b):
    return 1 - (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def _pair_heads(m, noise=0.0):
    """Make heads (0, 1), (2, 3), (4, 5) identical pairs (plus ``noise`` on the second of each pair)."""
    d = m.head_dim
    with torch.no_grad():
        for lin in (m.q_proj, m.k_proj, m.v_proj):
            for i in (0, 2, 4):
                lin.weight[(i + 1) * d:(i + 2) * d] = lin.weight[i * d:(i + 1) * d]
                lin.bias[(i + 1) * d:(i + 2) * d] = lin.bias[i * d:(i + 1) * d]
                if noise and lin is m.v_proj:
                    lin.weight[(i + 1) * d:(i + 2) * d] += noise * torch.randn(d, D, dtype=torch.float64)


@pytest.mark.parametrize("groups", [1, 2, H])
@pytest.mark.parametrize("causal", [False, True])
def test_before_pruning_it_is_multihead_attention(groups, causal):
    mha = torch_mha(D, H)
    layer = _gha(groups=groups)
    load_torch_mha(layer.mechanism, mha)
    x = _x()
    mask = torch.nn.Transformer.generate_square_subsequent_mask(N, dtype=torch.bool) if causal else None
    expect, _ = mha(x, x, x, attn_mask=mask, need_weights=False)
    layer.train()  # the group constraint changes the loss, never the output
    torch.testing.assert_close(layer(x, is_causal=causal)[0], expect, rtol=1e-12, atol=1e-12)


def test_kmeans_is_deterministic_and_finds_obvious_groups():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=g, dtype=torch.float64) * 10
    order = torch.tensor([2, 0, 1, 0, 2, 1, 1])
    points = centres[order] + 0.01 * torch.randn(7, 8, generator=g, dtype=torch.float64)
    a = kmeans(points, 3)
    assert torch.equal(a, kmeans(points, 3))
    for i in range(7):
        for j in range(7):
            assert bool(a[i] == a[j]) == bool(order[i] == order[j])
    with pytest.raises(ValueError, match="k must be in"):
        kmeans(points, 8)


@pytest.mark.parametrize("feature", ["output", "value"])
def test_identical_heads_within_groups_leave_only_the_diversification_term(feature):
    layer = _gha(groups=3, feature=feature, alpha=0.7, beta=0.3).train()
    m = layer.mechanism
    _pair_heads(m)
    x = _x()
    layer(x)
    if feature == "output":
        q, k, v = m.project(x, None, None)
        maps = fastattn.attention(q, k, v).transpose(0, 1).reshape(H, -1)
    else:
        maps = m.heads(m.v_proj(x), H).transpose(0, 1).reshape(H, -1)
    units = maps[[0, 2, 4]]
    expect = -0.3 * torch.stack([_cos_dist(units[a], units[b]) for a, b in ((0, 1), (0, 2), (1, 2))]).mean()
    torch.testing.assert_close(layer.aux_loss, expect, rtol=1e-10, atol=1e-12)
    votes, groups = m.vote(x)
    assert groups[0] == groups[1] and groups[2] == groups[3] and groups[4] == groups[5]
    assert len(set(groups.tolist())) == 3


def test_group_loss_is_eq_4b_on_the_modules_groups():
    layer = _gha(groups=2, alpha=0.7, beta=0.3).train()
    m = layer.mechanism
    x = _x()
    kpm = torch.zeros(2, N, dtype=torch.bool)
    kpm[1, 8:] = True
    layer(x, key_padding_mask=kpm)
    q, k, v = m.project(x, None, None)
    heads = fastattn.attention(q, k, v, key_padding_mask=kpm) * (~kpm)[:, None, :, None]
    maps = heads.transpose(0, 1).reshape(H, -1)
    groups = kmeans(maps, 2)
    assert len(set(groups.tolist())) == 2
    units = torch.stack([maps[groups == j].mean(0) for j in range(2)])
    homogenise = torch.stack([_cos_dist(maps[i], units[groups[i]]) for i in range(H)]).mean()
    expect = 0.7 * homogenise - 0.3 * _cos_dist(units[0], units[1])
    torch.testing.assert_close(layer.aux_loss, expect, rtol=1e-10, atol=1e-12)
    layer.eval()
    layer(x)
    assert layer.aux_loss.item() == 0.0


def test_singleton_groups_every_head_is_a_pillar():
    layer = _gha(groups=H).train()
    m = layer.mechanism
    x = _x()
    layer(x)
    q, k, v = m.project(x, None, None)
    maps = fastattn.attention(q, k, v).transpose(0, 1).reshape(H, -1)
    pairs = torch.triu_indices(H, H, 1)
    expect = -_cos_dist(maps[pairs[0]], maps[pairs[1]]).mean()  # homogenisation 0: each head is its unit
    torch.testing.assert_close(layer.aux_loss, expect, rtol=1e-10, atol=1e-12)
    layer.eval()
    votes, groups = m.vote(x)
    assert torch.equal(votes, torch.ones(H, dtype=torch.long)) and len(set(groups.tolist())) == H
    out = layer(x)[0]
    m.prune(m.pillars(votes, groups))
    torch.testing.assert_close(layer(x)[0], out, rtol=1e-12, atol=1e-12)


def test_voting_keeps_the_head_closest_to_its_group_unit():
    torch.manual_seed(5)
    layer = _gha(groups=3)
    m = layer.mechanism
    _pair_heads(m, noise=0.05)
    d = m.head_dim
    with torch.no_grad():  # in pair (2, 3) the first head is the noisy one
        m.v_proj.weight[2 * d:3 * d] += 0.1 * torch.randn(d, D, dtype=torch.float64)
    x = _x()
    votes, groups = m.vote(x)
    q, k, v = m.project(x, None, None)
    maps = fastattn.attention(q, k, v).transpose(0, 1).reshape(H, -1)
    for i in (0, 2, 4):
        assert groups[i] == groups[i + 1] and votes[i] + votes[i + 1] == 1
        unit = maps[[i, i + 1]].mean(0)
        closer = i if _cos_dist(maps[i], unit) < _cos_dist(maps[i + 1], unit) else i + 1
        assert votes[closer] == 1
    assert votes[3] == 1  # the clean head of the perturbed pair
    total = votes + m.vote(_x(seed=2))[0] + m.vote(_x(seed=3))[0]
    kept = m.pillars(total, groups)
    assert len(kept) == 3 and all(total[i] == total[[i - i % 2, i - i % 2 + 1]].max() for i in kept)
    assert m.pillars(torch.tensor([1, 1, 0, 2, 0, 0]), groups) == [0, 3, 4]  # ties: the lower index


@pytest.mark.parametrize("causal", [False, True])
def test_pruning_keeps_exactly_the_chosen_heads(causal):
    layer = _gha(groups=3)
    m = layer.mechanism
    x = _x()
    d = m.head_dim
    keep = [1, 2, 5]
    q, k, v = m.project(x, None, None)
    heads = fastattn.attention(q, k, v, is_causal=causal)
    expect = sum(heads[:, i] @ m.out_proj.weight[:, i * d:(i + 1) * d].T for i in keep) + m.out_proj.bias
    m.prune(keep)
    assert m.num_heads == 3 and m.q_proj.weight.shape == (3 * d, D) and m.out_proj.weight.shape == (D, 3 * d)
    assert m.core.num_heads == 3
    assert layer.num_heads == layer.num_kv_heads == 3 and "num_heads=3" in repr(layer)  # the façade follows
    torch.testing.assert_close(layer(x, is_causal=causal)[0], expect, rtol=1e-12, atol=1e-12)
    # decoding over the kept heads
    state, outs = None, []
    for chunk in x.split([4, 7], dim=1):
        o, state = layer.step(chunk, state)
        outs.append(o)
    if causal:
        torch.testing.assert_close(torch.cat(outs, 1), expect, rtol=1e-10, atol=1e-12)
    assert state.k.shape[1] == 3
    # a pruned layer's state dict has the pruned shapes
    other = _gha(groups=3, seed=1)
    with pytest.raises(RuntimeError):
        other.load_state_dict(layer.state_dict())
    other.mechanism.prune(keep)
    other.load_state_dict(layer.state_dict())


def test_group_loss_pulls_heads_to_their_groups():
    torch.manual_seed(0)
    layer = fastattn.MultiheadAttention(D, H, "gha", groups=2, beta=0.0, batch_first=True).train()
    m = layer.mechanism
    x = torch.randn(2, 16, D, generator=torch.Generator().manual_seed(3))
    layer(x)
    first = layer.aux_loss.item()
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    for _ in range(30):
        opt.zero_grad()
        layer(x)
        layer.aux_loss.backward()
        opt.step()
    layer(x)
    assert layer.aux_loss.item() < 0.5 * first


def test_bad_options_and_pruning_errors():
    with pytest.raises(ValueError, match="groups must be in"):
        _gha(groups=0)
    with pytest.raises(ValueError, match="groups must be in"):
        _gha(groups=H + 1)
    with pytest.raises(ValueError, match="feature must be one of"):
        _gha(feature="attention")
    with pytest.raises(ValueError, match="alpha and beta"):
        _gha(alpha=-1.0)
    with pytest.raises(ValueError, match="keep must list"):
        _gha().mechanism.prune([H])
    with pytest.raises(ValueError, match="num_kv_heads == num_heads"):
        fastattn.MultiheadAttention(D, H, "gha", num_kv_heads=3).mechanism.prune([0])
    with pytest.raises(ValueError, match="stateless cores"):
        fastattn.MultiheadAttention(D, H, "gha", core="performer").mechanism.prune([0])
