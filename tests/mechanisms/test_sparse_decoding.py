"""Decoding of the sparse patterns that keep every key: a one-token step gathers only the keys the
pattern keeps for the new position (no plan, no engine call) and equals the causal forward."""

from __future__ import annotations

import importlib

import pytest
import torch

import fastattn
from fastattn.mechanisms.sparse import base
from fastattn.ops.sparse import engine
from fastattn.ops.sparse.decode import ExtendedCache
from fastattn.ops.sparse.patterns import (
    BlockWindow, DilatedWindow, Pattern, PrevBlock, SameBlock, Strided, Window,
)
from tests.helpers import make_mech

PATTERNS = [
    Pattern(8, (Window(7),), column=Strided(8)), Pattern(8, (SameBlock(8), PrevBlock(8))),
    Pattern(4, (BlockWindow(1),)), Pattern(4, (DilatedWindow(3, 2), Window(2))),
    Pattern(4, (Window(2), SameBlock(4)), column=Strided(4)),
]


@pytest.mark.parametrize("pat", PATTERNS, ids=range(len(PATTERNS)))
def test_key_ranges_list_each_causal_key_of_the_pattern_once(pat):
    n = 45
    dense = pat.dense(torch.arange(n)[:, None], torch.arange(n)[None]) & torch.ones(n, n, dtype=torch.bool).tril()
    for i in range(n):
        got = [j for r in pat.key_ranges(i) for j in r]
        assert len(got) == len(set(got))
        assert sorted(got) == dense[i].nonzero().flatten().tolist()


def _forbid_engine(monkeypatch, mech):
    def no_engine(*a, **kw):
        raise AssertionError("a one-token step planned an engine call")

    for module in (engine, base, importlib.import_module(type(mech).__module__)):
        monkeypatch.setattr(module, "block_sparse_attention", no_engine, raising=module is engine or module is base)


@pytest.mark.parametrize("method,options,h,hkv", [
    ("sparse_transformer", {"stride": 8}, 4, 2),
    ("jukebox", {"width": 8}, 6, 2),  # three head groups, not aligned with the key heads
    ("jukebox", {"width": 5, "kinds": ("column", "row")}, 3, 1),
])
def test_one_token_steps_gather_and_equal_the_forward(monkeypatch, method, options, h, hkv):
    mech = make_mech(fastattn.get_method(method), h=h, hkv=hkv, **options).double()
    g = torch.Generator().manual_seed(0)
    n, e = 43, 16
    q = torch.randn(2, h, n, e, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, hkv, n, e, generator=g, dtype=torch.float64) for _ in range(2))
    full = mech.run(q, k, v, is_causal=True)
    out, state = mech.step(q[:, :, :3], k[:, :, :3], v[:, :, :3], None, e ** -0.5)  # prefill: the engine
    outs = [out]
    _forbid_engine(monkeypatch, mech)
    for t in range(3, n):
        out, state = mech.step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state, e ** -0.5)
        outs.append(out)
    assert state.length == n
    torch.testing.assert_close(torch.cat(outs, 2), full, rtol=1e-9, atol=1e-10)


def _qkv(h, hkv, n, e=16, b=2):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, h, n, e, generator=g, dtype=torch.float64)
    return (q, *(torch.randn(b, hkv, n, e, generator=g, dtype=torch.float64) for _ in range(2)))


@pytest.mark.parametrize("method,options", [("sparse_transformer", {"stride": 4}), ("jukebox", {"width": 4})])
def test_left_padded_rows_gather_as_if_alone(monkeypatch, method, options):
    """After a left-padded prompt, one-token steps gather each row's keys at its own positions (rows with
    different padding counts one by one) and give each row's output alone; a padding token after real
    ones sends later steps back to the general path, still exact."""
    mech = make_mech(fastattn.get_method(method), h=4, hkv=2, **options).double()
    q, k, v = _qkv(4, 2, 30, b=3)
    prompt, lead = 6, (0, 4, 1)
    pad = torch.zeros(3, prompt, dtype=torch.bool)
    for row, m in enumerate(lead):
        pad[row, :m] = True
    _, state = mech.step(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], None, 0.25, key_padding_mask=pad)
    with monkeypatch.context() as mp:
        _forbid_engine(mp, mech)
        outs = []
        for t in range(prompt, 20):
            out, state = mech.step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state, 0.25)
            outs.append(out)
    assert state.key_padding is not None
    late = torch.tensor([[False], [True], [False]])  # row 1: a padding token after real ones
    out, state = mech.step(q[:, :, 20:21], k[:, :, 20:21], v[:, :, 20:21], state, 0.25, key_padding_mask=late)
    outs.append(out)
    for t in range(21, 30):
        out, state = mech.step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state, 0.25)
        outs.append(out)
    got = torch.cat(outs, 2)
    for row, m in enumerate(lead):
        keep = [p for p in range(m, 30) if not (row == 1 and p == 20)]
        qr, kr, vr = (x[row:row + 1, :, keep] for x in (q, k, v))
        alone = mech.run(qr, kr, vr, is_causal=True)[:, :, prompt - m:]
        mine = got[row:row + 1, :, [t - prompt for t in range(prompt, 30) if not (row == 1 and t == 20)]]
        torch.testing.assert_close(mine, alone, rtol=1e-9, atol=1e-10)


def _mixed_steps(method, options, sizes, check):
    """Steps of ``sizes`` tokens (general steps return a plain cache, whose tables the next one-token
    step rebuilds in one call); ``check(options, state, t)`` after each one-token step; the outputs
    equal the causal forward."""
    mech = make_mech(fastattn.get_method(method), h=4, hkv=2, **options).double()
    q, k, v = _qkv(4, 2, sum(sizes))
    full = mech.run(q, k, v, is_causal=True)
    outs, state, t = [], None, 0
    for size in sizes:
        out, state = mech.step(q[:, :, t:t + size], k[:, :, t:t + size], v[:, :, t:t + size], state, 0.25)
        outs.append(out)
        t += size
        if size == 1 and t > 2:
            check(mech.options, state, t)
    torch.testing.assert_close(torch.cat(outs, 2), full, rtol=1e-9, atol=1e-10)


MIXED = [1, 1, 6, 1, 1, 9] + [1] * 29 + [2]


@pytest.mark.parametrize("options", [{}, {"block": 3, "radius": 2, "factor": 3, "levels": 3}])
def test_multiscale_steps_pool_each_span_once_and_equal_the_forward(options):
    """One-token steps append each completed span's mean to its level's table."""
    def check(o, state, t):
        assert isinstance(state, ExtendedCache)
        assert [tb.length for tb in state.tables] == [t // (o.block * o.factor ** j) for j in range(o.levels)]

    _mixed_steps("multiscale", options, [1, 1, 5, 1, 1, 1, 20] + [1] * 48 + [2], check)


def test_extended_cache_selects_and_moves_its_tables():
    mech = make_mech(fastattn.get_method("multiscale"), h=4, hkv=2).double()
    q, k, v = _qkv(4, 2, 30, b=3)
    _, state = mech.step(q[:, :, :28], k[:, :, :28], v[:, :, :28], None, 0.25)
    _, state = mech.step(q[:, :, 28:29], k[:, :, 28:29], v[:, :, 28:29], state, 0.25)
    picked = state.select([2, 0])
    out, _ = mech.step(q[[2, 0], :, 29:], k[[2, 0], :, 29:], v[[2, 0], :, 29:], picked, 0.25)
    torch.testing.assert_close(out, mech.run(q, k, v, is_causal=True)[[2, 0], :, 29:], rtol=1e-9, atol=1e-10)
    assert picked.batch_size == 2 and all(t.k.shape[0] == 2 for t in picked.tables)
    moved = state.to("meta")
    assert moved.length == 29 and all(t.k.device.type == "meta" for t in (moved.cache, *moved.tables))


@pytest.mark.parametrize("options", [{"group": 5}, {"group": 4, "causal_form": "masked"}, {"group": 4, "stage": "long"}])
def test_interlaced_steps_keep_the_long_range_outputs_and_equal_the_forward(options):
    """The table of long-range outputs always covers every cached key (one new column per token)."""
    def check(o, state, t):
        if o.stage == "both":
            assert isinstance(state, ExtendedCache) and state.tables[0].length == t

    _mixed_steps("interlaced", options, MIXED, check)


@pytest.mark.parametrize("options", [{"width": 5}, {"width": 4, "causal_form": "masked"}, {"width": 3, "axes": "column"}])
def test_axial_steps_keep_complete_rows_upper_context_and_equal_the_forward(options):
    """The table of row attentions holds exactly the complete rows before the current one."""
    def check(o, state, t):
        if o.causal_form == "upper_context" and o.axes == "both":
            assert isinstance(state, ExtendedCache) and state.tables[0].length == (t - 1) - (t - 1) % o.width

    _mixed_steps("axial", options, MIXED, check)
