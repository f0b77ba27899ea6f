"""The block-sparse engine (``fastattn.ops.sparse``): values and gradients against the dense reference
at awkward sizes with every kind of key source, query groups, memory, partial results ``(out, lse)``
and the plan cache."""

from __future__ import annotations

import pytest
import torch

import fastattn
from fastattn.core.masks import Mask
from fastattn.ops.sparse import engine, plan
from fastattn.ops.sparse.engine import block_sparse_attention
from fastattn.ops.sparse.nodes import Nodes
from fastattn.ops.sparse.patterns import (
    DilatedWindow, Pattern, PrevBlock, RandomBlocks, RingWindow, SameBlock, Strided, Window,
)
from fastattn.ops.sparse.plan import PLANS, cached_plan
from fastattn.ops.sparse.reference import pattern_allowed, pattern_reference
from helpers import EV, B, E, L, LargestTensor, grads, padding_mask, qkv


def test_patterns_compose_as_union():
    q, k, v = qkv(h=4, hkv=4, requires_grad=True)
    pat = Pattern(8, (Window(2),)) + Pattern(8, (DilatedWindow(2, 5),), column=Strided(8)) + Pattern(
        8, global_keys=torch.tensor([3]), global_queries=torch.tensor([50])
    )
    for causal in (False, True):
        mask = Mask(L, L, key_padding=padding_mask(), causal=causal)
        fast = block_sparse_attention(q, k, v, mask, 0.25, pat)
        ref = pattern_reference(q, k, v, mask, 0.25, pat)
        torch.testing.assert_close(fast, ref)
        for a, b in zip(grads(fast, (q, k, v)), grads(ref, (q, k, v))):
            torch.testing.assert_close(a, b)
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    union = ((i - j).abs() <= 2) | (((i - j).abs() <= 10) & ((i - j) % 5 == 0)) | ((i - j) % 8 == 0)
    assert torch.equal(pat.dense(i, j), union | (j == 3) | (i == 50))


# ---- engine: query groups (the memory-saving path) ------------------------------------------------
def _composite_pattern(nkb: int, with_column: bool) -> Pattern:
    """Every kind of block part at once: a band of consecutive offsets (window), constant offsets
    outside it (dilated window), blocks by index (random, ring ends), and global keys and queries."""
    table = torch.randint(0, nkb, (nkb, 2), generator=torch.Generator().manual_seed(3))
    parts = (Window(3), DilatedWindow(2, 5), RandomBlocks(table), RingWindow(1, nkb * 8))
    return Pattern(
        8, parts, column=Strided(8) if with_column else None,
        global_keys=torch.tensor([3, 40, 500]), global_queries=torch.tensor([5, 50, 57]),
    )


def _nodes(b: int, h: int, m: int = 3) -> Nodes:
    g = torch.Generator().manual_seed(4)
    nk = torch.randn(b, h, m, E, generator=g, dtype=torch.float64, requires_grad=True)
    nv = torch.randn(b, h, m, EV, generator=g, dtype=torch.float64, requires_grad=True)
    return Nodes(nk, nv, lambda qpos: (qpos + torch.arange(m)) % 3 != 0)  # each node hidden from some queries


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "lq,column,with_nodes", [(61, True, False), (37, True, True), (61, False, True), (23, False, False)]
)
def test_engine_query_groups_equal_one_group_and_reference(causal, lq, column, with_nodes):
    """Groups of one query block (and one global-query row) at a time give the values and gradients of
    one group of everything and of the dense reference: odd lengths (Lq < Lk, not multiples of the
    block), padding (one batch entry with no real key at all), every kind of key source."""
    q, k, v = qkv(h=2, hkv=2, lq=lq, lk=L, requires_grad=True)
    nodes = _nodes(B, 2) if with_nodes else None
    inputs = (q, k, v) + ((nodes.k, nodes.v) if nodes is not None else ())
    pat = _composite_pattern(-(-L // 8), column)
    for kpm in (padding_mask(), padding_mask(valid=(L, 0))):
        mask = Mask(lq, L, key_padding=kpm, causal=causal)
        ref = pattern_reference(q, k, v, mask, 0.25, pat, nodes)
        ref_grads = grads(ref, inputs)
        for group_bytes in (1, 1 << 40):  # one block (one row) per group / a single group
            out = block_sparse_attention(q, k, v, mask, 0.25, pat, nodes, group_bytes=group_bytes)
            torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
            for a, b in zip(grads(out, inputs), ref_grads):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_engine_global_rows_in_key_tiles_survive_masked_tiles_and_extreme_scores():
    """The rows of global queries are an online softmax over key tiles; a tile whose keys are all masked
    (padding) must not move the running maximum (scores near -2000 would underflow to a zero row)."""
    g = torch.Generator().manual_seed(6)
    u = torch.randn(E, generator=g, dtype=torch.float64)
    k = u.expand(B, 2, L, E).clone().requires_grad_(True)
    q = torch.randn(B, 2, L, E, generator=g, dtype=torch.float64)
    q[:, :, 5] = -2000.0 / (0.25 * u.dot(u)) * u  # every score of the global query 5 is -2000
    q.requires_grad_(True)
    v = torch.randn(B, 2, L, EV, generator=g, dtype=torch.float64, requires_grad=True)
    pat = Pattern(8, (Window(2),), global_queries=torch.tensor([5]))
    mask = Mask(L, L, key_padding=padding_mask())
    ref = pattern_reference(q, k, v, mask, 0.25, pat)
    out = block_sparse_attention(q, k, v, mask, 0.25, pat, group_bytes=1)  # one key per tile
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads(out, (q, k, v)), grads(ref, (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_engine_working_set_is_one_group_and_nothing_but_inputs_is_saved():
    """Backward keeps only q, k, v and the output (no scores or probabilities), and no operation of the
    forward or backward returns a tensor larger than the inputs or one group's scores."""
    n = 4096
    q, k, v = qkv(b=1, h=2, hkv=2, lq=n, dtype=torch.float32, requires_grad=True)
    pat, mask = Pattern(64, (Window(256),)), Mask(n, n)
    cached_plan(pat, n, n, False, q.device)  # the plan (cached) is built outside the measurement
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        with LargestTensor() as fwd:
            out = block_sparse_attention(q, k, v, mask, 0.25, pat)
    with LargestTensor() as bwd:
        out.backward(torch.ones_like(out))
    assert "bmm" in {op.split(".")[0] for op in bwd.ops}  # the backward's operations were seen
    all_scores = 2 * n * 9 * 64 * 4  # every query's 9 blocks of keys, float32: what a plain autograd path keeps
    group = engine.GROUP_BYTES["cpu"]
    assert all_scores > 2 * group  # (so the check below can fail)
    assert max(fwd.bytes, bwd.bytes) <= max(group, q.numel() * 4), (fwd.bytes, bwd.bytes)
    assert sum(saved) <= 4 * q.numel()  # q, k, v, out


def test_engine_inference_saves_nothing():
    q, k, v = qkv(h=2, hkv=2, lq=L, requires_grad=True)
    pat = _composite_pattern(-(-L // 8), True)
    with torch.no_grad():
        out = block_sparse_attention(q, k, v, Mask(L, L), 0.25, pat)
    assert out.grad_fn is None
    out2 = block_sparse_attention(q, k, v, Mask(L, L), 0.25, pat)
    torch.testing.assert_close(out, out2.detach(), rtol=0, atol=0)




# ---- partial results: (out, lse) -------------------------------------------------------------------
def _lse_reference(q, k, v, mask, scale, pat, nodes=None):
    """Log-sum-exp of the masked dense scores, written out: every query against every key (and node)."""
    kk = k if nodes is None else torch.cat([k, nodes.k], 2)
    qpos = mask.offset + torch.arange(q.shape[2])
    allowed = pattern_allowed(
        qpos, torch.arange(k.shape[2]), pat, causal=mask.causal, key_padding=mask.key_padding, nodes=nodes
    )
    s = (q @ kk.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    return torch.logsumexp(s, -1)  # -inf where a query sees no key


def _with_lse_loss(out, lse, seed=2):
    """A loss that reads both the output and the (finite part of the) log-sum-exp."""
    w = torch.randn(lse.shape, generator=torch.Generator().manual_seed(seed), dtype=lse.dtype)
    return out, torch.where(torch.isfinite(lse), lse, 0.0) * w


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lq,column,with_nodes", [(61, True, True), (37, False, True), (23, True, False)])
def test_engine_lse_is_logsumexp_of_masked_scores_with_gradients(causal, lq, column, with_nodes):
    """``return_lse``: the log-sum-exp equals that of the dense masked scores (``-inf`` for a batch entry
    with no real key), in one group and in one block per group; gradients through out and lse equal
    the dense reference's."""
    q, k, v = qkv(h=2, hkv=2, lq=lq, lk=L, requires_grad=True)
    nodes = _nodes(B, 2) if with_nodes else None
    inputs = (q, k, v) + ((nodes.k, nodes.v) if nodes is not None else ())
    pat = _composite_pattern(-(-L // 8), column)
    mask = Mask(lq, L, key_padding=padding_mask(valid=(L, 0)), causal=causal)
    expected = _lse_reference(q, k, v, mask, 0.25, pat, nodes)
    assert torch.isfinite(expected[0]).all()  # batch 1 has no real key: only the nodes, if any
    assert bool(torch.isinf(expected[1]).all()) == (nodes is None)
    ref_out, ref_lse = pattern_reference(q, k, v, mask, 0.25, pat, nodes, return_lse=True)
    torch.testing.assert_close(ref_lse, expected, rtol=1e-12, atol=1e-12)
    ref_grads = grads(torch.cat([x.flatten() for x in _with_lse_loss(ref_out, ref_lse)]), inputs)
    for group_bytes in (1, 1 << 40):
        out, lse = block_sparse_attention(q, k, v, mask, 0.25, pat, nodes, group_bytes=group_bytes, return_lse=True)
        torch.testing.assert_close(lse, expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
        got = grads(torch.cat([x.flatten() for x in _with_lse_loss(out, lse)]), inputs)
        for a, b in zip(got, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        with torch.no_grad():  # the inference path gives the same lse
            torch.testing.assert_close(
                block_sparse_attention(q, k, v, mask, 0.25, pat, nodes, group_bytes=group_bytes, return_lse=True)[1],
                expected, rtol=1e-10, atol=1e-12,
            )


def merge_by_lse(parts):
    """Partial results ``(out, lse)`` of the same queries over disjoint keys, merged by log-sum-exp
    (rows no part sees: zeros and ``-inf``)."""
    lses = torch.stack([lse for _, lse in parts])
    top = lses.detach().amax(0)
    w = torch.exp(lses - torch.where(torch.isfinite(top), top, 0.0))
    total = w.sum(0)
    alive = total > 0
    out = sum(wi[..., None] * o for wi, (o, _) in zip(w, parts)) / torch.where(alive, total, 1.0)[..., None]
    lse = torch.where(alive, top + torch.log(torch.where(alive, total, 1.0)), float("-inf"))
    return out, lse


@pytest.mark.parametrize("causal", [False, True])
def test_engine_partials_over_disjoint_patterns_merge_into_their_union(causal):
    """Two patterns with no common (query, key) pair, each run alone with ``return_lse``, merged by
    log-sum-exp, equal the engine over their union: values, lse and gradients."""
    q, k, v = qkv(h=2, hkv=2, lq=45, lk=L, requires_grad=True)
    mask = Mask(45, L, key_padding=padding_mask(valid=(50, 0)), causal=causal)
    own, prev = Pattern(8, (SameBlock(8),)), Pattern(8, (PrevBlock(8),))
    parts = [block_sparse_attention(q, k, v, mask, 0.25, p, return_lse=True) for p in (own, prev)]
    out, lse = merge_by_lse(parts)
    whole_out, whole_lse = block_sparse_attention(q, k, v, mask, 0.25, own + prev, return_lse=True)
    torch.testing.assert_close(out, whole_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lse, whole_lse, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads(out, (q, k, v)), grads(whole_out, (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ---- the plan cache ---------------------------------------------------------------------------------
@pytest.fixture
def count_plans(monkeypatch):
    """Counts make_plan calls, on an empty cache of the default bounds (restored afterwards)."""
    bounds = PLANS.max_plans, PLANS.max_bytes
    PLANS.clear()
    calls = []
    real = plan.make_plan
    monkeypatch.setattr(plan, "make_plan", lambda *a: calls.append(a[1:3]) or real(*a))
    yield calls
    PLANS.configure(*bounds)
    PLANS.clear()


def test_functional_calls_and_a_layer_share_one_plan(count_plans):
    """``fastattn.attention`` builds a new mechanism per call; the plan is built once for the pattern and
    lengths, and a layer with the same options reuses it; other lengths or causality build another."""
    q, k, v = qkv()
    first = fastattn.attention(q, k, v, "local", window=9, block=8)
    for _ in range(3):
        torch.testing.assert_close(fastattn.attention(q, k, v, "local", window=9, block=8), first, rtol=0, atol=0)
    layer = fastattn.MultiheadAttention(32, 4, "local", batch_first=True, window=9, block=8)
    layer(torch.randn(2, L, 32))
    assert count_plans == [(L, L)] and PLANS.hits >= 4
    fastattn.attention(q, k, v, "local", window=9, block=8, is_causal=True)
    fastattn.attention(q[:, :, :30], k, v, "local", window=9, block=8)
    fastattn.attention(q, k, v, "local", window=10, block=8)
    assert count_plans == [(L, L), (L, L), (30, L), (L, L)]


def test_plan_cache_keys_on_the_pattern_value_tables_included(count_plans):
    table = torch.randint(0, 8, (8, 2), generator=torch.Generator().manual_seed(0))
    pat = lambda t: Pattern(8, (Window(3), RandomBlocks(t)), global_keys=torch.tensor([1]))  # noqa: E731
    dev = torch.device("cpu")
    a = cached_plan(pat(table), 64, 64, False, dev)
    assert cached_plan(pat(table.clone()), 64, 64, False, dev) is a  # equal values, other tensors: a hit
    other = table.clone()
    other[3, 1] = (other[3, 1] + 1) % 8
    assert cached_plan(pat(other), 64, 64, False, dev) is not a  # another random table: another plan
    assert pat(table).key() == pat(table.clone()).key() != pat(other).key()
    assert Pattern(8, (Window(3),), global_keys=torch.tensor([1])).key() != Pattern(8, (Window(3),)).key()
    assert len(count_plans) == 2


def test_plan_cache_is_bounded_in_plans_and_bytes(count_plans):
    pat, dev = Pattern(4, (Window(5),)), torch.device("cpu")
    PLANS.configure(max_plans=3)
    for n in range(20, 26):
        cached_plan(pat, n, n, False, dev)
    assert len(PLANS) == 3 and len(count_plans) == 6
    cached_plan(pat, 25, 25, False, dev)  # the most recent: kept
    cached_plan(pat, 20, 20, False, dev)  # the oldest: evicted, built again
    assert len(count_plans) == 7 and len(PLANS) == 3
    size = plan.plan_bytes(cached_plan(pat, 25, 25, False, dev))
    PLANS.configure(max_plans=32, max_bytes=2 * size)
    assert PLANS.bytes <= 2 * size and len(PLANS) <= 2
    cached_plan(pat, 4000, 4000, False, dev)  # larger than the whole budget: built, not kept
    assert PLANS.bytes <= 2 * size and len(count_plans) == 8
    cached_plan(pat, 4000, 4000, False, dev)
    assert len(count_plans) == 9
    with pytest.raises(ValueError, match="max_plans"):
        PLANS.configure(max_plans=-1)
