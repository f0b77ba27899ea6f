"""The bucketed engine against its dense formula (values and gradients, every mode, padding, several
rounds, Lq != Lk, explicit positions), its causal contract with arbitrary labels, and its memory bound."""

from __future__ import annotations

import pytest
import torch

from fastattn.core.masks import Mask
from fastattn.ops.bucketed import bucketed_attention, bucketed_reference, selection_mask
from helpers import LargestTensor, grads


def _inputs(lq, lk, seed=0, n_labels=3, rounds=2, b=2, h=2):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, h, lk, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, h, lk, 5, generator=g, dtype=torch.float64, requires_grad=True)
    hq = torch.randint(0, n_labels, (rounds, b, h, lq), generator=g)
    hk = torch.randint(0, n_labels, (rounds, b, h, lk), generator=g)
    return q, k, v, hq, hk


MODES = [dict(causal=False, same_label=False), dict(causal=False, same_label=True), dict(causal=True, same_label=False)]


def _tiles_equal_lists_and_formula(q, k, v, hq, hk, mask, kw):
    """The dense-tile path equals the per-query lists and the formula, on values and gradients."""
    fast = bucketed_attention(q, k, v, hq, hk, 3, mask, 0.3, **kw)
    lists = bucketed_attention(q, k, v, hq, hk, 3, mask, 0.3, blocked=False, **kw)
    allowed = selection_mask(hq, hk, 3, mask, chunk=kw["chunk"], window=kw["window"], same_label=kw["same_label"])
    ref = bucketed_reference(q, k, v, allowed, mask, 0.3, self_penalty=kw["self_penalty"])
    gf = grads(fast, (q, k, v))
    for other in (lists, ref):
        torch.testing.assert_close(fast, other, rtol=1e-9, atol=1e-11)
        for a, b in zip(grads(other, (q, k, v)), gf):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("mode", MODES, ids=["chunks", "label-window", "causal"])
@pytest.mark.parametrize("lq,lk", [(37, 37), (1, 37), (12, 37)])
@pytest.mark.parametrize("padded", [False, True])
def test_engine_equals_dense_formula(mode, lq, lk, padded):
    q, k, v, hq, hk = _inputs(lq, lk)
    kpm = None
    if padded:
        kpm = torch.zeros(2, lk, dtype=torch.bool)
        kpm[1, lk - 9:] = True
    mask = Mask(lq, lk, key_padding=kpm, causal=mode["causal"])
    kw = dict(chunk=5, window=7, self_penalty=-5e4)
    fast = bucketed_attention(q, k, v, hq, hk, 3, mask, 0.3, same_label=mode["same_label"], **kw)
    allowed = selection_mask(hq, hk, 3, mask, chunk=5, window=7, same_label=mode["same_label"])
    ref = bucketed_reference(q, k, v, allowed, mask, 0.3, self_penalty=-5e4)
    torch.testing.assert_close(fast, ref, rtol=1e-9, atol=1e-11)
    for a, b in zip(grads(fast, (q, k, v)), grads(ref, (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_explicit_positions_decide_causality():
    """Keys given in a shuffled slot order with their positions: the same result as in order."""
    q, k, v, hq, hk = _inputs(30, 30, seed=1)
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(2))
    base = bucketed_attention(q, k, v, hq, hk, 3, Mask(30, 30, causal=True), 0.3, chunk=4)
    shuffled = bucketed_attention(
        q, k[:, :, perm], v[:, :, perm], hq, hk[..., perm], 3,
        Mask(30, 30, causal=True, k_positions=perm.view(1, 1, 30)), 0.3, chunk=4)
    torch.testing.assert_close(shuffled, base)


def test_causal_no_leak_with_content_labels():
    q, k, v, hq, hk = _inputs(50, 50, seed=3, n_labels=4)
    mask = Mask(50, 50, causal=True)
    out = bucketed_attention(q, k, v, hq, hk, 4, mask, 0.3, chunk=3)
    for t in (0, 20, 41):
        q2, k2, v2, hq2, hk2 = (x.detach().clone() for x in (q, k, v, hq, hk))
        q2[..., t + 1:, :] += 3 * torch.randn_like(q2[..., t + 1:, :])
        k2[..., t + 1:, :] += 3
        hq2[..., t + 1:] = (hq2[..., t + 1:] + 1) % 4  # the future moves to other buckets
        hk2[..., t + 1:] = 0
        out2 = bucketed_attention(q2, k2, v2, hq2, hk2, 4, mask, 0.3, chunk=3)
        torch.testing.assert_close(out2[..., : t + 1, :], out[..., : t + 1, :])


def test_memory_is_bounded_by_query_groups():
    """No (B, H, n, K, E) gather: the largest tensor of forward and backward stays far below it."""
    n, e, chunk = 2048, 64, 64
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, n, e, generator=g, requires_grad=True) for _ in range(3))
    hq = torch.randint(0, 16, (2, 1, 2, n), generator=g)
    mask = Mask(n, n)
    with LargestTensor() as fwd:
        out = bucketed_attention(q, k, v, hq, hq, 16, mask, 0.125, chunk=chunk)
    with LargestTensor() as bwd:
        out.sum().backward()
    gathered = 1 * 2 * n * 2 * chunk * e * 4  # bytes of every query's keys at once
    assert max(fwd.bytes, bwd.bytes) < gathered / 8


@pytest.mark.parametrize("mode", MODES, ids=["chunks", "label-window", "causal"])
@pytest.mark.parametrize("n,chunk,window", [(37, 5, 7), (40, 8, 16), (23, 64, 128)])
def test_blocked_path_for_a_shared_order_equals_dense_formula(mode, n, chunk, window):
    """Equal query and key labels in self-attention: the dense-tile path, against the formula and the
    per-query-list path, values and gradients, several rounds with duplicates."""
    from fastattn.ops import bucketed

    q, k, v, hq, _ = _inputs(n, n, seed=7, n_labels=3, rounds=3)
    mask = Mask(n, n, causal=mode["causal"])
    kw = dict(chunk=chunk, window=window, self_penalty=-5e4, same_label=mode["same_label"])
    rd = bucketed._Round(hq[0], hq[0], *bucketed._positions(mask, 2, 2, q.device), 3, mode["causal"], chunk,
                         window, mode["same_label"])
    assert rd.shared
    _tiles_equal_lists_and_formula(q, k, v, hq, hq, mask, kw)


@pytest.mark.parametrize("mode", MODES, ids=["chunks", "label-window", "causal"])
@pytest.mark.parametrize("lq,lk,chunk,window", [(37, 37, 5, 7), (12, 41, 4, 16), (70, 70, 3, 9)])
def test_blocked_path_with_separate_orders_equals_lists(mode, lq, lk, chunk, window):
    """Queries and keys with their own labels (and lengths): the dense-tile path equals the per-query
    lists and the formula, values and gradients, with padding, several rounds."""
    q, k, v, hq, hk = _inputs(lq, lk, seed=8, n_labels=3, rounds=3)
    kpm = torch.zeros(2, lk, dtype=torch.bool)
    kpm[1, lk - 6:] = True
    mask = Mask(lq, lk, key_padding=kpm, causal=mode["causal"])
    kw = dict(chunk=chunk, window=window, self_penalty=-5e4, same_label=mode["same_label"])
    _tiles_equal_lists_and_formula(q, k, v, hq, hk, mask, kw)


def test_skewed_labels_fall_back_to_lists():
    """Every key in one label, every query in another except one: a tile's key run would span the whole
    sequence, so the round takes the per-query lists (no (n x n) tile), same result."""
    from fastattn.ops import bucketed

    n = 300
    q, k, v, _, _ = _inputs(n, n, seed=9, rounds=1)
    hk = torch.zeros(1, 2, 2, n, dtype=torch.long)
    hq = torch.ones(1, 2, 2, n, dtype=torch.long)
    hq[..., ::7] = 0
    mask = Mask(n, n, causal=True)
    rd = bucketed._Round(hq[0], hk[0], *bucketed._positions(mask, 2, 2, q.device), 2, True, 1, 8, False)
    assert bucketed._blocked_round(q, k, v, rd, [rd], *bucketed._positions(mask, 2, 2, q.device), 0.3, 64,
                                   True, False, None, max_width=4 * 8 + 64) is None
    fast = bucketed_attention(q, k, v, hq, hk, 2, mask, 0.3, chunk=1, window=8)
    allowed = selection_mask(hq, hk, 2, mask, chunk=1, window=8)
    torch.testing.assert_close(fast, bucketed_reference(q, k, v, allowed, mask, 0.3), rtol=1e-9, atol=1e-11)
