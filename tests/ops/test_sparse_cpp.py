"""The compiled block-sparse kernels (backend "cpp"): against the PyTorch engine and the dense masked
softmax (pattern reference) in float64 at awkward sizes -- length 61 with blocks that do not divide it,
fewer queries than keys, one head, grouped-query heads, key padding, causal, global keys and queries --
values, log-sum-exp and gradients; the mechanisms through ``backend="cpp"``; the fallback of calls the
kernels do not take. Skipped where the extension cannot be built (the reason is in the skip)."""

from __future__ import annotations

import pytest
import torch

import fastattn
from fastattn.core.masks import Mask
from fastattn.ops.linear import compiled as build_helper
from fastattn.ops.sparse import compiled
from fastattn.ops.sparse.engine import block_sparse_attention
from fastattn.ops.sparse.nodes import Nodes
from fastattn.ops.sparse.patterns import Pattern, RandomBlocks, Strided, Window
from fastattn.ops.sparse.plan import cached_plan
from fastattn.ops.sparse.reference import pattern_reference

N, EV = 61, 5


@pytest.fixture(scope="module")
def built():
    why = build_helper.build()
    if why is not None:
        pytest.skip(f"compiled backend unavailable: {why}")


def _inputs(b, h, hk, lq, lk, e=7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, e, generator=g, dtype=dtype)
    k = torch.randn(b, hk, lk, e, generator=g, dtype=dtype)
    v = torch.randn(b, hk, lk, EV, generator=g, dtype=dtype)
    return [x.requires_grad_() for x in (q, k, v)]


def _loss(out, lse, seed=2):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    alive = torch.isfinite(lse)
    return (out * w).sum() + 0.3 * torch.where(alive, lse, 0.0).sum()


def _patterns(nkb):
    table = torch.randint(0, nkb, (nkb, 2), generator=torch.Generator().manual_seed(3))
    return {
        "window": Pattern(16, (Window(9),)),
        "wide": Pattern(40, (Window(50),)),  # several vectors of rows per block: the kernels' row ranges
        # 12 global keys (more than a block: the backward takes them b at a time), one out of range
        "global": Pattern(8, (Window(5), RandomBlocks(table)), global_keys=torch.tensor([2, 33, 500, *range(40, 50)]),
                          global_queries=torch.tensor([4, 40, 59])),
    }


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("name", ["window", "wide", "global"])
@pytest.mark.parametrize("lq,pad", [(N, False), (45, True)], ids=["square", "shorter+padding"])
def test_kernels_match_engine_and_dense(built, causal, name, lq, pad):
    """Values, lse and gradients of the compiled op equal the PyTorch engine's and the dense masked
    softmax's (float64), one head and two."""
    for h in (1, 2):
        q, k, v = _inputs(2, h, h, lq, N, seed=h)
        kp = torch.zeros(2, N, dtype=torch.bool)
        if pad:
            kp[1, 50:] = True
            kp[0, :3] = True
        mask = Mask(lq, N, key_padding=kp if pad else None, causal=causal)
        pat = _patterns(-(-N // 8))[name]
        scale = 0.37
        ref, ref_lse = pattern_reference(q, k, v, mask, scale, pat, return_lse=True)
        eng, eng_lse = block_sparse_attention(q, k, v, mask, scale, pat, return_lse=True)
        plan = cached_plan(pat, lq, N, causal, q.device)
        got, got_lse = compiled.attention(q, k, v, mask, scale, pat.block, plan, None)
        for a in (ref, eng):
            torch.testing.assert_close(got, a)
        torch.testing.assert_close(got_lse, eng_lse)
        assert torch.isfinite(got).all()
        g_got = torch.autograd.grad(_loss(got, got_lse), (q, k, v), retain_graph=True)
        g_eng = torch.autograd.grad(_loss(eng, eng_lse), (q, k, v))
        g_ref = torch.autograd.grad(_loss(ref, torch.zeros_like(ref_lse)), (q, k, v))
        g_got_o = torch.autograd.grad(_loss(got, torch.zeros_like(got_lse)), (q, k, v))
        for a, b in zip(g_got, g_eng):
            torch.testing.assert_close(a, b)
        for a, b in zip(g_got_o, g_ref):  # output only against the dense reference
            torch.testing.assert_close(a, b)


def test_grouped_query_heads_and_float32(built):
    """k, v with fewer heads (each shared by a group of query heads) equal the expanded call; float32
    agrees with float64 to float32 precision."""
    q, k, v = _inputs(1, 4, 2, N, N, seed=5)
    pat, mask = Pattern(16, (Window(20),)), Mask(N, N, causal=True)
    plan = cached_plan(pat, N, N, True, q.device)
    got, lse = compiled.attention(q, k, v, mask, 0.5, 16, plan, None)
    ke, ve = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    ref, ref_lse = block_sparse_attention(q, ke, ve, mask, 0.5, pat, return_lse=True)
    torch.testing.assert_close(got, ref)
    for a, b in zip(torch.autograd.grad(_loss(got, lse), (q, k, v), retain_graph=True),
                    torch.autograd.grad(_loss(ref, ref_lse), (q, k, v))):
        torch.testing.assert_close(a, b)
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    got32, lse32 = compiled.attention(q32, k32, v32, mask, 0.5, 16, plan, None)
    torch.testing.assert_close(got32, got.float(), rtol=1e-4, atol=1e-5)
    g32 = torch.autograd.grad(_loss(got32, lse32), (q32, k32, v32))
    for a, b in zip(g32, torch.autograd.grad(_loss(got, lse), (q, k, v))):
        torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-4)


def test_rows_without_keys_give_zeros(built):
    """A batch row whose keys are all padded: zero output, lse -inf, finite (zero) gradients."""
    q, k, v = _inputs(2, 1, 1, N, N, seed=7)
    kp = torch.zeros(2, N, dtype=torch.bool)
    kp[1] = True
    mask = Mask(N, N, key_padding=kp, causal=True)
    pat = Pattern(16, (Window(9),))
    got, lse = compiled.attention(q, k, v, mask, 0.3, 16, cached_plan(pat, N, N, True, q.device), None)
    assert torch.equal(got[1], torch.zeros_like(got[1])) and torch.isinf(lse[1]).all()
    dq, dk, dv = torch.autograd.grad((got * 1.5).sum(), (q, k, v))
    assert torch.isfinite(dq).all() and (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()


@pytest.fixture
def taken(monkeypatch):
    """Whether each call of the compiled block-sparse entry point ran on the kernels (True) or declined
    and left the call to the PyTorch engine (False), in order."""
    calls = []
    real = compiled.attention

    def spy(*args, **kw):
        res = real(*args, **kw)
        calls.append(res is not None)
        return res

    monkeypatch.setattr(compiled, "attention", spy)
    return calls


@pytest.mark.parametrize("method,options", [("local", {"window": 16}), ("longformer", {}), ("bigbird", {})])
def test_mechanisms_run_on_the_kernels(built, taken, method, options):
    """backend="cpp" runs the pattern mechanisms on the compiled kernels (the op is called, not the
    fallback) with the torch backend's values and gradients."""
    q, k, v = _inputs(2, 2, 2, N, N, e=8, seed=11)
    kp = torch.zeros(2, N, dtype=torch.bool)
    kp[0, 55:] = True
    for causal in (False, True) if fastattn.get_method(method).causal else (False,):
        out = {}
        for backend in ("torch", "cpp"):
            o = fastattn.attention(q, k, v, method, is_causal=causal, key_padding_mask=kp, backend=backend, **options)
            out[backend] = (o, *torch.autograd.grad((o * o).sum(), (q, k, v)))
        for a, b in zip(out["cpp"], out["torch"]):
            torch.testing.assert_close(a, b)
    assert taken and all(taken)


def test_column_part_and_the_nodes_fallback(built):
    """A column part (strided pattern) is merged with the kernel's result by log-sum-exp: values, lse
    and gradients equal the engine's and the dense reference's (causal, padding, shorter queries).
    Extra nodes are not in the kernels: attention() declines (the engine computes the call)."""
    pat = Pattern(8, (Window(4),), column=Strided(8), global_keys=torch.tensor([5]))
    for lq, causal in ((N, True), (45, False)):
        q, k, v = _inputs(2, 2, 1, lq, N, seed=3)
        kp = torch.zeros(2, N, dtype=torch.bool)
        kp[1, 50:] = True
        mask = Mask(lq, N, key_padding=kp, causal=causal)
        plan = cached_plan(pat, lq, N, causal, q.device)
        got, lse = compiled.attention(q, k, v, mask, 0.4, 8, plan, None)
        ke, ve = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
        ref, ref_lse = block_sparse_attention(q, ke, ve, mask, 0.4, pat, return_lse=True)
        torch.testing.assert_close(got, pattern_reference(q, ke, ve, mask, 0.4, pat))
        torch.testing.assert_close(lse, ref_lse)
        g_got = torch.autograd.grad(_loss(got, lse), (q, k, v))
        for a, b in zip(g_got, torch.autograd.grad(_loss(ref, ref_lse), (q, k, v))):
            torch.testing.assert_close(a, b)
    nodes = Nodes(k[:, :, :3].detach(), v[:, :, :3].detach(), lambda qpos: qpos >= 0)
    assert compiled.unsupported(plan, nodes, q.dtype, q.device) is not None
    assert compiled.attention(q, k, v, mask, 0.4, 8, plan, nodes) is None


def test_opcheck(built):
    q, k, v = (x.detach() for x in _inputs(1, 2, 1, 20, 20, e=4, seed=1))
    pat = Pattern(8, (Window(5),), global_keys=torch.tensor([1]))
    plan = cached_plan(pat, 20, 20, True, q.device)
    flat = compiled.flat_plan(plan, 8, 20)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), *(flat[n] for n in compiled._KEYS), None,
            plan.lpad, 8, 0.5)
    torch.library.opcheck(torch.ops.fastattn.block_sparse_cpp.default, args)


CPP_SPECS = [s for s in fastattn.methods() if getattr(s.cls, "compiled_block_sparse", False)]


@pytest.mark.parametrize("spec", CPP_SPECS, ids=[s.name for s in CPP_SPECS])
def test_every_pattern_mechanism_cpp_equals_torch(built, taken, spec):
    """Every mechanism the cpp backend takes for its block-sparse engine gives the torch backend's output
    and input gradient (float64 layer, GQA heads, key padding, causal where it exists); calls its plan
    does not fit run on the PyTorch engine."""
    x = torch.randn(2, N, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    kpm = torch.zeros(2, N, dtype=torch.bool)
    kpm[1, 45:] = True
    for causal in (False, True) if spec.causal else (False,):
        res = {}
        for backend in ("torch", "cpp"):  # the same weights (seeded), the backend fixed at construction
            kw = {"generator": torch.Generator().manual_seed(0)} if spec.randomized else {}
            torch.manual_seed(0)
            layer = fastattn.MultiheadAttention(32, 4, spec.name, num_kv_heads=2, batch_first=True, backend=backend,
                                                **spec.cls.test_options, **kw).double().eval()
            out = layer(x, key_padding_mask=kpm if spec.padding else None, is_causal=causal)[0]
            res[backend] = (out, *torch.autograd.grad((out * out).sum(), (x,)))
        for a, b in zip(res["cpp"], res["torch"]):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    assert taken  # the engine was asked to use the kernels (a call may still decline: nodes, column part)
