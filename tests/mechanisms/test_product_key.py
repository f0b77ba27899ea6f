"""Product-key memory's defining property: the product top-k (per-half top-k, then top-k of the k^2
sums) equals the brute-force top-k over all |C|^2 Cartesian keys [C1_a; C2_b]; the output is the
softmax-weighted sum of those value rows; token-wise, so a token's output ignores the other tokens;
self-attention only."""

from __future__ import annotations

import pytest
import torch

import fastattn


def _layer(num_keys=16, topk=5, key_dim=12, **kw):
    torch.manual_seed(0)
    return fastattn.MultiheadAttention(24, 3, "product_key", batch_first=True, dtype=torch.float64,
                                       num_keys=num_keys, topk=topk, key_dim=key_dim, **kw).eval()


def _x(n=19, seed=1):
    return torch.randn(2, n, 24, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("num_keys,topk", [(16, 5), (9, 9), (30, 1)])
def test_product_topk_equals_brute_force_over_cartesian_keys(num_keys, topk):
    mem = _layer(num_keys, topk).mechanism
    x = _x()
    idx, scores = mem.lookup(x)
    # brute force from the concatenated keys themselves, not from the half scores
    q = mem.norm(mem.q_proj(x).view(2, 19, 3, 12))
    c1, c2 = mem.subkeys[:, 0], mem.subkeys[:, 1]
    cart = torch.cat([c1[:, :, None].expand(-1, -1, num_keys, -1), c2[:, None].expand(-1, num_keys, -1, -1)], -1)
    full = torch.einsum("blhd,hsd->blhs", q, cart.flatten(1, 2))  # slot a * |C| + b
    top, ref = full.topk(topk, dim=-1)
    assert torch.equal(idx.sort(-1).values, ref.sort(-1).values)
    torch.testing.assert_close(scores.sort(-1).values, top.sort(-1).values)


def test_output_is_the_weighted_sum_of_the_selected_values():
    layer = _layer()
    x = _x()
    idx, scores = layer.mechanism.lookup(x)
    w = torch.softmax(scores, -1)
    ref = torch.einsum("blhk,blhkd->bld", w, layer.mechanism.values.weight[idx])
    torch.testing.assert_close(layer(x)[0], ref)


def test_token_wise():
    layer = _layer()
    x = _x()
    y = x.clone()
    y[:, ::2] = _x(seed=3)[:, ::2]
    torch.testing.assert_close(layer(x)[0][:, 1::2], layer(y)[0][:, 1::2])


def test_self_attention_only_and_bad_options():
    layer = _layer()
    x = _x()
    with pytest.raises(ValueError, match="self-attention"):
        layer(x, _x(seed=4), _x(seed=4))
    with pytest.raises(ValueError, match="attn_mask"):
        layer(x, attn_mask=torch.zeros(19, 19, dtype=torch.bool))
    with pytest.raises(ValueError, match="topk"):
        _layer(num_keys=4, topk=5)


def test_sparse_value_gradients():
    layer = _layer(sparse=True).train()
    layer(_x())[0].sum().backward()
    g = layer.mechanism.values.weight.grad
    assert g.is_sparse and g.coalesce().indices().shape[1] <= 2 * 19 * 3 * 5
