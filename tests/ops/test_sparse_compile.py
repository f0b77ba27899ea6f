"""The block-sparse engine under ``torch.compile``: plans are built eagerly (outside the compiled
region), so a pattern mechanism traces with no graph break but that boundary, and the compiled call
equals the eager one on values and gradients. ``aot_eager`` traces forward and backward (the custom
autograd function included) without the slow C++ code generation; ``benchmarks/sparse_compile.py``
lists the break counts of every sparse mechanism."""

from __future__ import annotations

import torch

import fastattn
from fastattn.ops.sparse import plan
from fastattn.ops.sparse.plan import PLANS
from helpers import grads, make_mech, padding_mask, qkv


def test_local_compiles_with_the_plan_built_outside_and_equals_eager(monkeypatch):
    mech = make_mech(fastattn.get_method("local"), window=9, block=8).double()
    kpm = padding_mask()

    def f(q, k, v):
        return mech.run(q, k, v, is_causal=True, key_padding_mask=kpm)

    q, k, v = qkv(requires_grad=True)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(f)(q, k, v)
    # only the eager plan lookup (dynamo counts it once per frame it unwinds: the dispatch and the mechanism)
    assert explained.graph_break_count <= 2, explained.break_reasons
    assert all("disable" in r.reason for r in explained.break_reasons), explained.break_reasons

    PLANS.clear()
    built = []
    real = plan.make_plan
    monkeypatch.setattr(plan, "make_plan", lambda *a: built.append(a[1:3]) or real(*a))
    compiled = torch.compile(f, backend="aot_eager")
    for seed in (0, 1):  # the second call reuses the compiled graph and the cached plan
        q, k, v = qkv(requires_grad=True, seed=seed)
        out, ref = compiled(q, k, v), f(q, k, v)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        for a, b in zip(grads(out, (q, k, v)), grads(ref, (q, k, v))):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert len(built) == 1
    torch._dynamo.reset()
