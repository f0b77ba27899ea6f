"""Sort / unsort per (batch, head) (``fastattn.ops.permute``): exact round trips, stable ties, the
original positions carried (so causality and padding can be decided after sorting), gradients."""

from __future__ import annotations

import pytest
import torch

from fastattn.core.masks import Mask
from fastattn.ops.permute import sort_by
from fastattn.ops.softmax.dense import dense_attention
from helpers import grads, padding_mask, qkv

B, H, L = 2, 3, 29


def _buckets(seed=0, n=4):
    return torch.randint(0, n, (B, H, L), generator=torch.Generator().manual_seed(seed))


def test_sort_orders_by_key_and_unsort_is_its_exact_inverse():
    key = torch.randn(B, H, L, generator=torch.Generator().manual_seed(1))
    x = torch.randn(B, H, L, 5, 2)
    perm = sort_by(key)
    s = perm.sort(key)
    assert (s[..., 1:] >= s[..., :-1]).all()
    assert torch.equal(perm.unsort(perm.sort(x)), x)
    assert torch.equal(perm.sort(perm.unsort(x)), x)
    assert torch.equal(perm.sort(x)[1, 2, 7], x[1, 2, perm.order[1, 2, 7]])
    assert torch.equal(perm.order.gather(-1, perm.inverse), torch.arange(L).expand(B, H, L))


def test_ties_keep_their_original_order():
    key = _buckets(n=3)
    perm = sort_by(key)
    k, o = perm.sort(key), perm.order
    same = k[..., 1:] == k[..., :-1]
    assert same.any() and (o[..., 1:][same] > o[..., :-1][same]).all()
    expected = torch.tensor([i for c in range(3) for i in range(L) if key[0, 0, i] == c])
    assert torch.equal(o[0, 0], expected)


def test_positions_are_carried():
    key = _buckets()
    x = torch.randn(B, H, L, 4)
    perm = sort_by(key)
    assert torch.equal(perm.positions, perm.order)
    b, h = 1, 2
    assert torch.equal(perm.sort(x)[b, h], x[b, h, perm.positions[b, h]])
    shifted = sort_by(key, positions=100 + torch.arange(L))  # absolute positions of a later chunk
    assert torch.equal(shifted.positions, 100 + perm.order)
    rows = torch.randint(0, 1000, (B, 1, L), generator=torch.Generator().manual_seed(2))  # per-row positions
    assert torch.equal(sort_by(key, positions=rows).positions, rows.expand(B, H, L).gather(-1, perm.order))


def test_gradient_flows_through_sort_and_unsort():
    key = _buckets()
    x = torch.randn(B, H, L, 6, dtype=torch.float64, requires_grad=True)
    shared = torch.randn(B, 1, L, 6, dtype=torch.float64, requires_grad=True)  # broadcast over heads
    perm = sort_by(key)
    w = torch.randn(B, H, L, 6, dtype=torch.float64)
    (gx,) = torch.autograd.grad((perm.sort(x) * w).sum(), x)
    assert torch.equal(gx, perm.unsort(w))
    (gx,) = torch.autograd.grad((perm.unsort(x) * w).sum(), x)
    assert torch.equal(gx, perm.sort(w))
    (gs,) = torch.autograd.grad((perm.sort(shared) * w).sum(), shared)
    torch.testing.assert_close(gs, perm.unsort(w).sum(1, keepdim=True))


@pytest.mark.parametrize("causal", [False, True])
def test_chunked_attention_in_sorted_order_uses_the_original_positions(causal):
    """Reformer-style attention: sort by bucket, attend within chunks of 8 sorted slots and the chunk
    before, causality from the carried positions and padding sorted along, unsort. Equals dense
    attention in the original order under the literal mask (values and gradients); causality on the
    sorted slots instead would be another mask."""
    q, k, v = qkv(b=B, h=H, hkv=H, lq=L, requires_grad=True)
    kpm = padding_mask(b=B, lk=L, valid=(L, 20))
    perm = sort_by(_buckets(seed=3))

    def allowed(chunk, pos, pad):
        d = chunk[..., :, None] - chunk[..., None, :]
        a = ((d == 0) | (d == 1)) & ~pad[..., None, :]
        return a & (pos[..., None, :] <= pos[..., :, None]) if causal else a

    def attend(q, k, v, a):
        return dense_attention(q, k, v, Mask(L, L), 1.0, extra_bias=torch.zeros(a.shape).masked_fill(~a, float("-inf")))

    slots = torch.arange(L).expand(B, H, L)
    a_sorted = allowed(slots // 8, perm.positions, perm.sort(kpm[:, None]))
    out = perm.unsort(attend(perm.sort(q), perm.sort(k), perm.sort(v), a_sorted))
    a_orig = allowed(perm.inverse // 8, slots, kpm[:, None].expand(B, H, L))  # chunk of each original token
    ref = attend(q, k, v, a_orig)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for x, y in zip(grads(out, (q, k, v)), grads(ref, (q, k, v))):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    if causal:
        assert not torch.equal(a_sorted, allowed(slots // 8, slots, perm.sort(kpm[:, None])))


def test_bad_input_is_a_value_error():
    key = _buckets()
    with pytest.raises(ValueError, match="key must be"):
        sort_by(key[0])
    with pytest.raises(ValueError, match="integer"):
        sort_by(key, positions=torch.zeros(L))
    with pytest.raises(ValueError, match="broadcast"):
        sort_by(key, positions=torch.arange(L + 1))
    perm = sort_by(key)
    with pytest.raises(ValueError, match="length"):
        perm.sort(torch.zeros(B, H, L + 1))
    with pytest.raises(ValueError, match="broadcast"):
        perm.sort(torch.zeros(B, 2, L))
