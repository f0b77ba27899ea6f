"""``fastattn.distributed.LocalAttention``: the ``local_attention`` callable DeepSpeed-Ulysses'
``DistributedAttention`` runs on each rank's heads. Without DeepSpeed, its contract is checked directly:
the head groups every rank would receive, each run by its own module and put back together, equal the
attention over all heads; the layouts; the refusals."""

import pytest
import torch

import fastattn
from fastattn.distributed import LocalAttention


def _qkv(s=23, b=2, h=4, hkv=2, e=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, s, e, generator=g, dtype=torch.float64)
    k, v = (torch.randn(b, hkv, s, e, generator=g, dtype=torch.float64) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("layout", ["sbhd", "bshd"])
@pytest.mark.parametrize("method,options", [("softmax", {}), ("local", {"window": 5}), ("linear", {})])
def test_rank_head_groups_equal_attention_over_all_heads(layout, method, options):
    q, k, v = _qkv()
    pad = torch.zeros(2, 23, dtype=torch.bool)
    pad[1, 17:] = True
    want = fastattn.attention(q, k, v, method=method, is_causal=True, key_padding_mask=pad, **options)
    to = (lambda x: x.permute(2, 0, 1, 3)) if layout == "sbhd" else (lambda x: x.transpose(1, 2))
    outs = []
    for r in range(2):  # two ranks: query heads 2r, 2r+1 share key/value head r (GQA kept whole per rank)
        rank = LocalAttention(method, layout=layout, is_causal=True, **options)
        sl, kv = slice(2 * r, 2 * r + 2), slice(r, r + 1)
        outs.append(rank(to(q[:, sl]), to(k[:, kv]), to(v[:, kv]), key_padding_mask=pad))
    got = torch.cat(outs, dim=2)  # heads are dim 2 in both layouts
    torch.testing.assert_close(got, to(want), rtol=1e-12, atol=1e-12)


def test_same_seed_same_random_parts_on_every_rank_and_across_calls():
    q, k, v = _qkv(h=2, hkv=2)
    a, b = LocalAttention("performer", num_features=16), LocalAttention("performer", num_features=16)
    x = [t.permute(2, 0, 1, 3) for t in (q, k, v)]
    first = a(*x)
    torch.testing.assert_close(first, b(*x), rtol=0, atol=0)
    torch.testing.assert_close(a(*x), first, rtol=0, atol=0)  # kept across calls, not redrawn
    other = LocalAttention("performer", num_features=16, seed=1)(*x)
    assert not torch.allclose(other, first)


def test_refusals_name_the_problem():
    q, k, v = (t.permute(2, 0, 1, 3) for t in _qkv())
    with pytest.raises(ValueError, match="dropout_p"):
        LocalAttention()(q, k, v, dropout_p=0.1)
    with pytest.raises(ValueError, match="positional #4"):
        LocalAttention()(q, k, v, None)
    with pytest.raises(ValueError, match="layout"):
        LocalAttention(layout="bhsd")
    with pytest.raises(ValueError, match="layer-level"):
        LocalAttention("moh")
    with pytest.raises(ValueError, match="heads_independent"):
        LocalAttention("hedgehog")(q, k, v)
    with pytest.raises(ValueError, match="4-D"):
        LocalAttention()(q[0], k, v)
