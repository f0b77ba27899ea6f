"""Defining properties of the sparse-pattern family (the contract tests check each mechanism's fast
path against its dense-masked reference; the engine's own tests are in ``tests/ops/test_sparse_engine.py``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn.core.masks import Mask
from fastattn.ops.sparse import engine
from helpers import E, L, grads, make_mech, padding_mask, qkv


def _spec(name):
    return fastattn.get_method(name)


def _check_fast_equals_reference(mech, causal_flags=(False, True), lq=L):
    mech = mech.double()
    for causal in causal_flags:
        for kpm in (None, padding_mask()):
            q, k, v = qkv(lq=lq, lk=L, requires_grad=True)
            fast = mech.run(q, k, v, is_causal=causal, key_padding_mask=kpm)
            ref = mech.run(q, k, v, is_causal=causal, key_padding_mask=kpm, reference=True)
            torch.testing.assert_close(fast, ref, rtol=1e-7, atol=1e-9)
            for a, b in zip(grads(fast, (q, k, v)), grads(ref, (q, k, v))):
                torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


# ---- local --------------------------------------------------------------------------------------
@pytest.mark.parametrize("block", [4, 16, 64])
def test_local_with_window_covering_everything_is_softmax(block):
    q, k, v = qkv()
    kpm = padding_mask()
    for causal in (False, True):
        ours = fastattn.attention(q, k, v, "local", window=L, block=block, is_causal=causal, key_padding_mask=kpm)
        ref = fastattn.attention(q, k, v, "softmax", is_causal=causal, key_padding_mask=kpm)
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_local_sees_exactly_its_window():
    q, k, v = qkv(b=1)
    out = fastattn.attention(q, k, v, "local", window=5, block=8)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 40:], v2[:, :, 40:] = 9.0, 9.0  # keys beyond 39: invisible to queries <= 34
    out2 = fastattn.attention(q, k2, v2, "local", window=5, block=8)
    torch.testing.assert_close(out[:, :, :35], out2[:, :, :35])
    assert not torch.allclose(out[:, :, 35], out2[:, :, 35])


def test_block_size_does_not_change_the_result():
    q, k, v = qkv()
    a = fastattn.attention(q, k, v, "local", window=7, block=3, is_causal=True)
    b = fastattn.attention(q, k, v, "local", window=7, block=32, is_causal=True)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_local_decoding_cache_is_bounded():
    mech = make_mech(_spec("local"), window=6, block=4).double()
    q, k, v = qkv()
    state, outs = None, []
    for t in range(L):
        o, state = mech.step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state, E ** -0.5)
        outs.append(o)
        assert state.k.shape[2] <= 6
    torch.testing.assert_close(torch.cat(outs, 2), mech.run(q, k, v, is_causal=True))


# ---- sparse transformer ------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["strided", "fixed"])
def test_sparse_transformer_two_hop_reachability(mode):
    n = 64
    mech = make_mech(_spec("sparse_transformer"), mode=mode, stride=8, summary=1)
    m = mech.dense_mask(n, n, causal=True).double()
    two_hops = (m @ m) > 0
    lower = torch.ones(n, n, dtype=torch.bool).tril()
    assert torch.equal(two_hops | m.bool(), lower)
    assert m.sum() < 0.4 * lower.sum()  # and it is sparse: one hop does not reach everything


def test_sparse_transformer_fixed_fast_path_equals_reference():
    _check_fast_equals_reference(make_mech(_spec("sparse_transformer"), mode="fixed", stride=8, summary=3))
    _check_fast_equals_reference(make_mech(_spec("sparse_transformer"), mode="fixed", stride=8, summary=3), lq=1)


def test_sparse_transformer_strided_mask_is_the_paper_formula():
    n, l = 40, 8
    m = make_mech(_spec("sparse_transformer"), stride=l).dense_mask(n, n, causal=True)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    assert torch.equal(m, (j <= i) & ((i - j < l) | ((i - j) % l == 0)))


# ---- longformer --------------------------------------------------------------------------------
def test_longformer_global_rows_are_full_attention_and_window_is_dilated():
    q, k, v = qkv()
    out = fastattn.attention(q, k, v, "longformer", window=3, dilation=2, global_tokens=(0, 17), block=8)
    full = fastattn.attention(q, k, v, "softmax")
    torch.testing.assert_close(out[:, :, [0, 17]], full[:, :, [0, 17]])
    m = make_mech(_spec("longformer"), window=3, dilation=2, global_tokens=(0, 17), block=8).dense_mask(L, L)
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    glob = (i == 0) | (i == 17) | (j == 0) | (j == 17)
    assert torch.equal(m, glob | (((i - j).abs() <= 6) & ((i - j) % 2 == 0)))


def test_longformer_decoding_cache_is_bounded():
    mech = make_mech(_spec("longformer"), window=4, dilation=2, global_tokens=(0, 3), block=8).double()
    q, k, v = qkv()
    state, outs = None, []
    for t in range(0, L, 2):
        o, state = mech.step(q[:, :, t:t + 2], k[:, :, t:t + 2], v[:, :, t:t + 2], state, E ** -0.5)
        outs.append(o)
        assert state.k.shape[2] <= 8 + 2
    torch.testing.assert_close(torch.cat(outs, 2), mech.run(q, k, v, is_causal=True))


# ---- bigbird -----------------------------------------------------------------------------------
def test_bigbird_random_blocks_reproducible_and_saved(tmp_path):
    spec = _spec("bigbird")
    a, b, c = (make_mech(spec, h=4, hkv=4, seed=s) for s in (3, 3, 4))
    q, k, v = qkv(hkv=4)
    torch.testing.assert_close(a.run(q, k, v), b.run(q, k, v))  # same seed, same graph
    assert not torch.allclose(a.run(q, k, v), c.run(q, k, v))  # another seed, another graph
    torch.save(a.state_dict(), tmp_path / "bb.pt")
    c.load_state_dict(torch.load(tmp_path / "bb.pt"))
    torch.testing.assert_close(a.run(q, k, v), c.run(q, k, v))
    before = a.run(q, k, v)
    a.redraw(torch.Generator().manual_seed(99))
    assert not torch.allclose(before, a.run(q, k, v))


def test_bigbird_pattern_has_window_global_and_distinct_random_blocks():
    for global_at, per_head in (("start", False), ("ends", True)):
        mech = make_mech(_spec("bigbird"), block=4, window_blocks=3, global_blocks=2, random_blocks=2,
                         global_at=global_at, per_head=per_head)
        n, b = 64, 4
        masks = mech.dense_mask(n, n)
        masks = masks if per_head else masks[None]
        glob = [0, 1] if global_at == "start" else [0, n // b - 1]
        for m in masks:
            blocks = m.view(n // b, b, n // b, b).any(3).any(1)  # block-level graph
            assert torch.equal(m, blocks.repeat_interleave(b, 0).repeat_interleave(b, 1))  # whole blocks
            t = torch.arange(n // b)
            window = (t[:, None] - t[None, :]).abs() <= 1
            assert blocks[window].all() and blocks[glob].all() and blocks[:, glob].all()
            extra = blocks & ~window
            extra[:, glob] = False
            rows = torch.ones(n // b, dtype=torch.bool)
            rows[glob] = False
            assert (extra[rows].sum(1) == 2).all()  # exactly r random blocks per non-global row


# ---- axial -------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
def test_axial_equals_attention_over_each_axis(causal):
    rows, width = 6, 8
    q, k, v = qkv(h=4, hkv=4, lq=rows * width)
    out = fastattn.attention(q, k, v, "axial", width=width, is_causal=causal, causal_form="masked")
    grid = lambda x: x.reshape(*x.shape[:2], rows, width, x.shape[-1])  # noqa: E731
    row = F.scaled_dot_product_attention(grid(q), grid(k), grid(v), is_causal=causal)
    col = F.scaled_dot_product_attention(
        grid(q).transpose(2, 3), grid(k).transpose(2, 3), grid(v).transpose(2, 3), is_causal=causal
    ).transpose(2, 3)
    torch.testing.assert_close(out, (row + col).reshape(out.shape), rtol=1e-10, atol=1e-10)


# ---- every engine mechanism in the smallest query groups -------------------------------------------
ENGINE_SPECS = [s for s in fastattn.methods("sparse") if s.name != "sac"]


@pytest.mark.parametrize("spec", ENGINE_SPECS, ids=[s.name for s in ENGINE_SPECS])
def test_sparse_mechanisms_in_one_block_groups_equal_reference(spec, monkeypatch):
    """Every engine mechanism (GQA, padding, causal, nodes, random blocks, column parts) with the
    smallest query groups equals its reference on values and gradients."""
    monkeypatch.setattr(engine, "GROUP_BYTES", {"cpu": 1, "cuda": 1})
    flags = (False, True) if spec.causal else (False,)
    _check_fast_equals_reference(make_mech(spec), causal_flags=flags)
    if spec.causal:
        _check_fast_equals_reference(make_mech(spec), causal_flags=(True,), lq=29)


# ---- etc, diet, jukebox, handcrafted -------------------------------------------------------------
def test_etc_global_input_and_long_radius():
    m = make_mech(_spec("etc"), num_global=3, radius=4, block=8).dense_mask(L, L)
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    assert torch.equal(m, (i < 3) | (j < 3) | ((i - j).abs() <= 4))


def test_diet_modes_are_dilated_and_cascaded_windows():
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    d = make_mech(_spec("diet"), mode="dilated", window=3, dilation=4, block=8).dense_mask(L, L)
    assert torch.equal(d, ((i - j).abs() <= 12) & ((i - j) % 4 == 0))
    c = make_mech(_spec("diet"), mode="cascade", window=3, layer=2, block=8).dense_mask(L, L)
    assert torch.equal(c, (i - j).abs() <= 12)
    _check_fast_equals_reference(make_mech(_spec("diet"), mode="dilated", window=2, dilation=5, block=4))


def test_jukebox_patterns_and_head_groups():
    w = 8
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    row = make_mech(_spec("jukebox"), width=w, kinds=("row",)).dense_mask(L, L)
    col = make_mech(_spec("jukebox"), width=w, kinds=("column",)).dense_mask(L, L)
    prev = make_mech(_spec("jukebox"), width=w, kinds=("previous_row",)).dense_mask(L, L)
    assert torch.equal(row, i // w == j // w)
    assert torch.equal(col, i % w == j % w)
    assert torch.equal(prev, i // w - j // w == 1)
    # three kinds over 4 heads: groups of 1, 2, 1 heads, each its own pattern
    mech = make_mech(_spec("jukebox"), h=4, hkv=4, width=w, kinds=("row", "column", "previous_row"))
    q, k, v = qkv(hkv=4)
    out = mech.run(q, k, v, is_causal=True)
    col_only = make_mech(_spec("jukebox"), h=2, hkv=2, width=w, kinds=("column",))
    torch.testing.assert_close(out[:, 1:3], col_only.run(q[:, 1:3], k[:, 1:3], v[:, 1:3], is_causal=True))
    _check_fast_equals_reference(make_mech(_spec("jukebox"), width=w, kinds=("row", "column", "previous_row")))


@pytest.mark.parametrize("kind", ["block", "global"])
def test_handcrafted_weights_are_uniform_and_input_independent(kind):
    q, k, v = qkv()
    kpm = padding_mask()
    mech = make_mech(_spec("handcrafted"), kind=kind, block=8).double()
    for causal in (False, True):
        out = mech.run(q, k, v, is_causal=causal, key_padding_mask=kpm)
        i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
        allowed = (i // 8 == j // 8) if kind == "block" else torch.ones(L, L, dtype=torch.bool)
        allowed = (allowed & (j <= i) if causal else allowed)[None] & ~kpm[:, None, :]
        w = allowed.double() / allowed.sum(-1, keepdim=True).clamp(min=1)
        torch.testing.assert_close(out, w[:, None] @ v.repeat_interleave(2, 1))
        torch.testing.assert_close(out, mech.run(q * 3 + 1, -k, v, is_causal=causal, key_padding_mask=kpm))
    _check_fast_equals_reference(mech)


# ---- gmat, star --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gmat", "star", "hat"])
def test_memory_nodes_are_learned_and_read_the_whole_sequence(name):
    layer = fastattn.MultiheadAttention(32, 4, name, batch_first=True, **_spec(name).cls.test_options)
    params = dict(layer.attn.named_parameters())
    assert params and all(p.requires_grad for p in params.values())
    x = torch.randn(2, L, 32, requires_grad=True)
    out, _ = layer(x)
    out[:, 0].sum().backward()
    assert x.grad[:, L // 2].abs().sum() > 0  # token 0 hears the far middle only through the memory/relay
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())


def test_star_ring_wraps_around():
    m = make_mech(_spec("star"), radius=1, block=8).dense_mask(L, L)
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    d = (i - j).abs()
    assert torch.equal(m, torch.minimum(d, L - d) <= 1) and m[0, L - 1] and m[L - 1, 0]


# ---- interlaced --------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
def test_interlaced_is_long_range_then_short_range(causal):
    rows, p = 6, 8
    q, k, v = qkv(h=4, hkv=4, lq=rows * p)
    out = fastattn.attention(q, k, v, "interlaced", group=p, is_causal=causal, causal_form="masked")
    grid = lambda x: x.reshape(*x.shape[:2], rows, p, x.shape[-1])  # noqa: E731
    col = lambda x: grid(x).transpose(2, 3)  # noqa: E731
    v_long = F.scaled_dot_product_attention(col(k), col(k), col(v), is_causal=causal).transpose(2, 3)
    short = F.scaled_dot_product_attention(grid(q), grid(k), v_long, is_causal=causal)
    torch.testing.assert_close(out, short.reshape(out.shape), rtol=1e-10, atol=1e-10)


# ---- multiscale --------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
def test_multiscale_counts_every_position_once_at_one_scale(causal):
    o = {"block": 4, "radius": 1, "factor": 2, "levels": 2}
    mech = make_mech(_spec("multiscale"), **o)
    n = 64
    k = torch.zeros(1, 1, n, 2)
    nodes = mech.nodes(k, k, k, Mask(n, n, causal=causal))
    i = torch.arange(n)
    fine = mech.dense_mask(n, n, causal=causal).long()
    node_allowed = nodes.mask(i[:, None])[0, 0].long()  # (n, m)
    sizes = [4] * 16 + [8] * 8
    starts = [u * 4 for u in range(16)] + [u * 8 for u in range(8)]
    member = torch.zeros(len(sizes), n, dtype=torch.long)
    for m, (a, s) in enumerate(zip(starts, sizes)):
        member[m, a:a + s] = 1
    coverage = fine + node_allowed @ member
    expected = torch.ones(n, n, dtype=torch.long)
    if causal:
        expected = expected.tril()
    assert torch.equal(coverage, expected)
    assert node_allowed.sum(1).max() < 16  # far away only coarse summaries


def test_hat_tokens_see_their_segment_and_the_representatives_only():
    mech = make_mech(_spec("hat"), hkv=4, segment=8).double()
    q, k, v = qkv(hkv=4)
    out = mech.run(q, k, v)
    nodes = mech.nodes(q, k, v, Mask(L, L))
    assert nodes.k.shape[2] == -(-L // 8)
    # with the representatives fixed, moving a token of another segment changes nothing else
    k2 = k.clone()
    k2[:, :, 40] += 5.0
    mech.nodes = lambda *a: nodes  # type: ignore[method-assign]
    out2 = mech.run(q, k2, v)
    torch.testing.assert_close(out[:, :, :40], out2[:, :, :40])
    assert not torch.allclose(out[:, :, 40:48], out2[:, :, 40:48])


def test_bp_transformer_span_nodes_grow_with_distance():
    mech = make_mech(_spec("bp_transformer"), leaf=2, k=2)
    n = 256
    k = torch.zeros(1, 1, n, 2)
    nodes = mech.nodes(k, k, k, Mask(n, n))
    seen = nodes.mask(torch.arange(n)[:, None])[0, 0].sum(1)
    levels = mech.levels(n)
    assert levels == 7 and seen.max() <= 2 * 2 * levels  # k spans per side per level
    fine = mech.dense_mask(n, n).sum(1)
    assert fine.max() <= (2 * 2 + 1) * 2


# ---- sac ---------------------------------------------------------------------------------------
def _sac(**o):
    return make_mech(_spec("sac"), hkv=4, **o).double()


@pytest.mark.parametrize("causal", [False, True])
def test_sac_each_query_attends_exactly_its_chosen_edges_and_itself(causal):
    edges = 5
    mech = _sac(edges=edges)
    q, k, v = qkv(hkv=4)
    kpm = padding_mask()
    m = mech.dense_mask(k, key_padding_mask=kpm, is_causal=causal)  # (B, H, L, L)
    t = torch.arange(L)
    real = ~kpm[:, None, None, :]
    n_real = real.sum(-1)  # (B, 1, 1)
    # candidates of query t: the real keys other than t (and before t when causal)
    cand = (real & (t[None, :] != t[:, None]) & ((t[None, :] < t[:, None]) if causal else True)).sum(-1)
    self_ok = ~kpm[:, None, :]  # (B, 1, L)
    assert torch.equal(m.sum(-1), cand.clamp(max=edges) + self_ok.long().expand(-1, 4, -1))
    assert not (m & ~real).any()  # padded keys never chosen
    assert torch.equal(m.diagonal(dim1=-2, dim2=-1), self_ok.expand(-1, 4, -1))
    if causal:
        assert not m.triu(1).any()
    assert n_real.min() > edges
    # the output depends on exactly the chosen values (the predictor reads keys, not values)
    out = mech.run(q, k, v, is_causal=causal, key_padding_mask=kpm)
    b, h, i = 0, 1, 30
    others = (~m[b, h, i]).nonzero().flatten()
    chosen = m[b, h, i].nonzero().flatten()
    v2 = v.clone()
    v2[b, h, others] += 10.0
    out2 = mech.run(q, k, v2, is_causal=causal, key_padding_mask=kpm)
    torch.testing.assert_close(out[b, h, i], out2[b, h, i])
    v2[b, h, chosen[-1]] += 10.0
    assert not torch.allclose(out[b, h, i], mech.run(q, k, v2, is_causal=causal, key_padding_mask=kpm)[b, h, i])


def test_sac_causal_edges_do_not_depend_on_the_future():
    mech = _sac(edges=4)
    q, k, v = qkv(hkv=4, lq=20, lk=L)  # bottom-right: query i sits at L - 20 + i
    m = mech.dense_mask(k, is_causal=True, lq=20)
    qpos = torch.arange(L - 20, L)[:, None]
    assert not (m & (torch.arange(L)[None, :] > qpos)).any()
    k2 = k.clone()
    k2[:, :, 50:] = torch.randn_like(k2[:, :, 50:]) * 5
    m2 = mech.dense_mask(k2, is_causal=True, lq=20)
    assert torch.equal(m[:, :, :9], m2[:, :, :9])  # queries at positions <= 49 keep their edges
    assert not torch.equal(m[:, :, 9:], m2[:, :, 9:])


def test_sac_predictor_gets_gradients_and_changing_it_changes_the_edges():
    layer = fastattn.MultiheadAttention(32, 4, "sac", batch_first=True, **_spec("sac").cls.test_options)
    params = dict(layer.attn.named_parameters())
    assert {"lstm.weight_ih_l0", "w_query.weight", "w_key.weight"} <= set(params)
    x = torch.randn(2, L, 32)
    out, _ = layer(x, is_causal=True)
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
    assert layer.aux_loss == 0
    mech = _sac(edges=4)
    _, k, _ = qkv(hkv=4)
    before = mech.dense_mask(k)
    with torch.no_grad():
        mech.w_query.weight.add_(torch.randn_like(mech.w_query.weight))
    after = mech.dense_mask(k)
    assert (before != after).any(-1).float().mean() > 0.5  # most rows choose other edges


def test_sac_eval_is_top_k_training_samples_with_the_generator():
    q, k, v = qkv(hkv=4)
    a = _sac(edges=4)
    assert torch.equal(a.dense_mask(k), a.dense_mask(k))
    # eval: the chosen edges are the top-scoring candidates
    states = a.node_states(k, None)
    e = a.w_query(states) @ a.w_key(states).transpose(-1, -2)
    e = e.masked_fill(torch.eye(L, dtype=torch.bool), float("-inf"))
    eye = torch.eye(L, dtype=torch.bool)
    top = torch.zeros_like(e, dtype=torch.bool).scatter_(-1, e.topk(4, -1).indices, True) | eye
    assert torch.equal(a.dense_mask(k), top)
    a.train()
    s1, s2 = a.dense_mask(k), a.dense_mask(k)
    assert not torch.equal(s1, s2) and torch.equal(s1.sum(-1), s2.sum(-1))
    b = make_mech(_spec("sac"), hkv=4, edges=4).double()
    b.load_state_dict(a.state_dict())
    b.generator = torch.Generator().manual_seed(7)
    a.generator = torch.Generator().manual_seed(7)
    b.train()
    torch.testing.assert_close(a.run(q, k, v), b.run(q, k, v))
