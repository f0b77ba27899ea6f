"""Decoding of the sparse patterns that keep every key: a one-token step gathers only the keys the
pattern keeps for the new position (no plan, no engine call) and equals the causal forward."""

from __future__ import annotations

import importlib

import pytest
import torch

import fastattn
from fastattn.mechanisms.sparse import base
from fastattn.ops.sparse import engine
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

    def no_engine(*a, **kw):
        raise AssertionError("a one-token step planned an engine call")

    for module in (engine, base, importlib.import_module(type(mech).__module__)):
        monkeypatch.setattr(module, "block_sparse_attention", no_engine, raising=module is engine or module is base)
    for t in range(3, n):
        out, state = mech.step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state, e ** -0.5)
        outs.append(out)
    assert state.length == n
    torch.testing.assert_close(torch.cat(outs, 2), full, rtol=1e-9, atol=1e-10)
