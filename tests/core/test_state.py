"""The default decoding state (``KVCache``): growth in place, branching, autograd."""

from __future__ import annotations

import torch

import fastattn
from fastattn.core.base import KVCache


def _mech():
    return fastattn.get_method("softmax").cls(head_dim=8, num_heads=4, num_kv_heads=2).double()


def _tokens(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, h, n, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2))


def test_decoding_grows_in_place_with_few_reallocations():
    mech = _mech()
    q, k, v = _tokens(100)
    state, buffers, outs = None, set(), []
    with torch.no_grad():
        for t in range(100):
            out, state = mech.step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state, 8 ** -0.5)
            outs.append(out)
            if state._buffer is not None:
                buffers.add(id(state._buffer))
    assert len(buffers) <= 5  # capacity doubles: 16, 32, 64, 128
    torch.testing.assert_close(torch.cat(outs, dim=2), mech.run(q, k, v, is_causal=True))


def test_branches_from_one_state_do_not_interfere():
    mech = _mech()
    q, k, v = _tokens(12)
    qa, ka, va = _tokens(3, seed=1)
    qb, kb, vb = _tokens(3, seed=2)
    with torch.no_grad():
        _, prefix = mech.step(q, k, v, None, 8 ** -0.5)
        _, prefix = mech.step(q[:, :, :1], k[:, :, :1], v[:, :, :1], prefix, 8 ** -0.5)  # now buffered
        out_a, state_a = mech.step(qa, ka, va, prefix, 8 ** -0.5)
        k_a = state_a.k.clone()
        out_b, state_b = mech.step(qb, kb, vb, prefix, 8 ** -0.5)  # same prefix, other continuation
        torch.testing.assert_close(state_a.k, k_a)  # branch a's cache untouched by branch b
        assert prefix.length == 13
        for (qq, kk, vv), out in (((qa, ka, va), out_a), ((qb, kb, vb), out_b)):
            full = [torch.cat([x, x[:, :, :1], y], dim=2) for x, y in ((q, qq), (k, kk), (v, vv))]
            torch.testing.assert_close(out, mech.run(*full, is_causal=True)[:, :, -3:])
        _, state_a2 = mech.step(qa[:, :, :1], ka[:, :, :1], va[:, :, :1], state_a, 8 ** -0.5)
        torch.testing.assert_close(state_a2.k[:, :, :16], k_a)


def test_appending_under_autograd_keeps_gradients():
    k0 = torch.randn(1, 2, 5, 8, requires_grad=True)
    v0 = torch.randn(1, 2, 5, 8, requires_grad=True)
    cache = KVCache(k0, v0).append(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8))
    cache.k.sum().backward()
    assert k0.grad is not None and (k0.grad == 1).all()


def test_padding_is_carried_by_both_append_paths():
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 2, 6, 8, generator=g), torch.randn(2, 2, 6, 8, generator=g)
    pad = torch.tensor([[True, True, False], [False, False, False]])
    expected = torch.cat([pad, torch.tensor([[False], [True]]), torch.zeros(2, 2, dtype=torch.bool)], 1)
    assert KVCache(k[:, :, :3], v[:, :, :3]).append(k[:, :, 3:4], v[:, :, 3:4]).key_padding is None
    buffered = KVCache(k[:, :, :3], v[:, :, :3], pad)
    kg = k.clone().requires_grad_(True)
    graph = KVCache(kg[:, :, :3], v[:, :, :3], pad)
    for cache in (buffered, graph):
        kk = kg if cache is graph else k
        cache = cache.append(kk[:, :, 3:4], v[:, :, 3:4], torch.tensor([[False], [True]]))
        cache = cache.append(kk[:, :, 4:6], v[:, :, 4:6])  # no padding among these
        torch.testing.assert_close(cache.key_padding, expected)
        torch.testing.assert_close(cache.k, kk)
        assert cache.length == 6
    assert graph.append(kg[:, :, 3:4], v[:, :, 3:4]).k.requires_grad


def test_select_and_to_leave_the_original_and_its_buffer_alone():
    mech = _mech()
    q, k, v = _tokens(6)
    q, k, v = (x.expand(3, -1, -1, -1).clone() for x in (q, k, v))
    with torch.no_grad():
        _, state = mech.step(q[:, :, :4], k[:, :, :4], v[:, :, :4], None, 8 ** -0.5)
        _, state = mech.step(q[:, :, 4:5], k[:, :, 4:5], v[:, :, 4:5], state, 8 ** -0.5)  # buffered now
        before = state.k.clone()
        picked = state.select([2, 0])
        assert picked.k.shape[0] == 2 and picked._buffer is None and picked.length == 5
        picked.append(k[:2, :, 5:6] + 1, v[:2, :, 5:6])
        torch.testing.assert_close(state.k, before)
        moved = state.to("cpu")
        assert moved._buffer is None and moved.k.data_ptr() == state.k.data_ptr()
