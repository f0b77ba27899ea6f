"""The compiled CPU backend ("cpp"): the C++ linear-attention kernels against the tiled PyTorch kernels
(values and gradients, float64), through the op, the mechanisms and decoding; and the fallback when it
cannot be built. The kernel tests build the extension on first use (about 20-30 s, cached in torch's
extension directory) and are skipped where it cannot be built (no compiler / ninja); the reason is
printed in the skip."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from linear_scan import linear_inputs

import fastattn
from fastattn.core.masks import Mask
from fastattn.ops.linear import compiled
from fastattn.ops.linear.engine import linear_attention

N, D, EV = 37, 11, 45  # float64 vectors hold 8: EV covers a register block (32), one vector and a tail; D a
# group of 8 rows reduced together and 3 alone


@pytest.fixture(scope="module")
def built():
    why = compiled.build()
    if why is not None:
        pytest.skip(f"compiled backend unavailable: {why}")


def _grads(out, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in out if o is not None)
    return torch.autograd.grad(loss, inputs, allow_unused=True)


def _both(fn):
    """``fn()`` on the tiled kernels and on the compiled ones."""
    ref = fn()
    with compiled.use():
        got = fn()
    return ref, got


@pytest.mark.parametrize("hq,h", [(2, 2), (4, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("causal,gates", [(True, None), (True, "head"), (True, "token"), (False, None)])
def test_op_matches_tiled_values_and_grads(built, hq, h, normalize, causal, gates):
    x = linear_inputs(2, h, hq, N, D, EV, gates, torch.Generator().manual_seed(0))
    leaves = list(x.values())
    mask = Mask(causal=causal, lq=N, lk=N)
    state = fastattn.ops.linear.engine.LinearState(x["s0"], x["z0"] if normalize else None, 3)

    def run():
        kw = {"decay": x["lam"]} if gates == "head" else {"log_decay": F.logsigmoid(x["logit"])} if gates else {}
        (out, st) = linear_attention(x["fq"], x["fk"], x["v"], mask, normalize=normalize, state=state,
                                     return_state=True, **kw)
        return (out, st.kv, st.z), _grads((out, st.kv, st.z), leaves)

    (ref, gref), (got, ggot) = _both(run)
    for a, b in zip(ref + gref, got + ggot):
        if a is None:
            assert b is None
            continue
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


def test_op_takes_strided_layouts_and_padding(built):
    """(B, L, H, E)-transposed inputs (a projection's layout), key padding, Lq < Lk (a prefix folded into
    the state)."""
    g = torch.Generator().manual_seed(2)
    fq = (torch.rand(2, N - 5, 3, D, generator=g, dtype=torch.float64) + 0.1).transpose(1, 2).requires_grad_()
    fk = (torch.rand(2, N, 3, D, generator=g, dtype=torch.float64) + 0.1).transpose(1, 2).requires_grad_()
    v = torch.randn(2, N, 3, EV, generator=g, dtype=torch.float64).transpose(1, 2).requires_grad_()
    pad = torch.zeros(2, N, dtype=torch.bool)
    pad[1, :4] = True
    mask = Mask(key_padding=pad, causal=True, lq=N - 5, lk=N)

    def run():
        out = linear_attention(fq, fk, v, mask)
        return out, _grads((out,), (fq, fk, v))

    (ref, gref), (got, ggot) = _both(run)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(gref, ggot):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


def test_float32_vector_paths(built):
    """float32 (16 per vector): a value width of 84 = a 64-wide register block, one vector and a tail;
    20 features = one group of 16 rows summed together and 4 rows alone."""
    g = torch.Generator().manual_seed(4)
    fq, fk = (torch.rand(1, 2, 50, 20, generator=g) + 0.1 for _ in range(2))
    v = torch.randn(1, 2, 50, 84, generator=g)
    leaves = [t.requires_grad_() for t in (fq, fk, v)]

    def run():
        out = linear_attention(fq, fk, v, Mask(causal=True, lq=50, lk=50), decay=torch.tensor([0.9, 0.99]))
        return out, _grads((out,), leaves)

    (ref, gref), (got, ggot) = _both(run)
    for a, b in zip((ref, *gref), (got, *ggot)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["linear", "lightning", "performer"])
def test_mechanism_backend_cpp_equals_torch(built, method):
    """Plain features, per-head decay, positive random features with key log-scales: backend='cpp'
    against backend='torch' (values and gradients), causal with padding."""
    q, k, v = (torch.randn(2, 4, 29, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
               .requires_grad_() for i in range(3))
    pad = torch.zeros(2, 29, dtype=torch.bool)
    pad[0, -3:] = True
    mech = fastattn.get_method(method).cls(head_dim=8, num_heads=4).double()
    outs = [mech.run(q, k, v, is_causal=True, key_padding_mask=pad, backend=b) for b in ("torch", "cpp")]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-9, atol=1e-9)
    for a, b in zip(_grads(outs[:1], (q, k, v)), _grads(outs[1:], (q, k, v))):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype,n,e,tol", [(torch.float64, 61, 11, 1e-10), (torch.float32, 40, 20, 1e-4)])
def test_fused_feature_map_equals_torch(built, monkeypatch, dtype, n, e, tol, causal):
    """``linear`` without padding: elu + 1 applied inside the kernels (raw q, k reach the op), against the
    tiled kernels with the Python feature map -- values and gradients, causal and not (the non-causal
    kernel's blocks of 8 tokens end in a partial one: 61, 40); float32 runs the vector exp (20 features =
    one 16-lane vector and a scalar tail), inputs spread so that both branches of elu occur."""
    g = torch.Generator().manual_seed(5)
    q, k, v = ((torch.randn(2, 3, n, e, generator=g, dtype=dtype) * 4).requires_grad_() for _ in range(3))
    mech = fastattn.get_method("linear").cls(head_dim=e, num_heads=3).to(dtype)
    seen, op = [], compiled._op
    monkeypatch.setattr(compiled, "_op", lambda *a: seen.append(a[-1]) or op(*a))
    outs = [mech.run(q, k, v, is_causal=causal, backend=b) for b in ("torch", "cpp")]
    assert seen == [compiled.FUSED_FEATURES["elu_plus_one"]]  # the fused path ran
    torch.testing.assert_close(outs[1], outs[0], rtol=tol, atol=tol)
    for a, b in zip(_grads(outs[:1], (q, k, v)), _grads(outs[1:], (q, k, v))):
        torch.testing.assert_close(b, a, rtol=tol, atol=tol)


def test_decoding_steps_on_cpp_equal_torch(built):
    torch.manual_seed(0)
    layer = fastattn.MultiheadAttention(32, 4, "linear", batch_first=True).double()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    outs = {}
    for backend in ("torch", "cpp"):
        layer.backend = backend
        st, ys = None, []
        for t in range(x.shape[1]):
            y, st = layer.step(x[:, t:t + 1], st)
            ys.append(y)
        outs[backend] = torch.cat(ys, 1)
    torch.testing.assert_close(outs["cpp"], outs["torch"], rtol=1e-10, atol=1e-10)


def test_custom_op_schema_and_fake(built):
    g = torch.Generator().manual_seed(3)
    q, k = (torch.rand(1, 2, 6, 3, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(1, 2, 6, 4, generator=g, dtype=torch.float64)
    lg = -torch.rand(1, 2, 6, generator=g, dtype=torch.float64)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), lg.requires_grad_(), None, None, True, True)
    torch.library.opcheck(torch.ops.fastattn.linear_attention_cpp.default, args)


def test_unavailable_build_falls_back_and_says_why(monkeypatch):
    """No compiler (or a failed build): backend='cpp' is a ValueError naming the reason, auto runs the
    PyTorch kernels, fastattn.backends() reports it. FASTATTN_CPP=0 disables it."""
    monkeypatch.setattr(compiled, "_MODULE", None)
    monkeypatch.setattr(compiled, "_FAILED", "the C++ build failed: no compiler here")
    monkeypatch.setenv("FASTATTN_CPP", "1")  # auto would pick it if it could
    q, k, v = (torch.randn(1, 2, 7, 4, generator=torch.Generator().manual_seed(i)) for i in range(3))
    with pytest.raises(ValueError, match="cpp: the C.. build failed: no compiler here"):
        fastattn.attention(q, k, v, "linear", backend="cpp")
    torch.testing.assert_close(fastattn.attention(q, k, v, "linear"), fastattn.attention(q, k, v, "linear", backend="torch"))
    assert fastattn.backends()["cpp"] == "the C++ build failed: no compiler here"
    assert fastattn.backends()["torch"] is None
    monkeypatch.setattr(compiled, "_FAILED", None)
    monkeypatch.setenv("FASTATTN_CPP", "0")
    assert compiled.build() == "disabled by FASTATTN_CPP=0"
    with pytest.raises(ValueError, match="cpp: disabled by FASTATTN_CPP=0"):
        fastattn.attention(q, k, v, "linear", backend="cpp")


def test_cpp_is_opt_in_under_auto_and_kernel_family_only(monkeypatch):
    monkeypatch.delenv("FASTATTN_CPP", raising=False)
    spec = fastattn.get_method("linear")
    from fastattn.core.dispatch import Call, choose_backend
    assert choose_backend("auto", spec, Call()).name == "torch"
    assert "opt-in" in fastattn.backends()["cpp"] or compiled.status() is not None
    q, k, v = (torch.randn(1, 2, 7, 4) for _ in range(3))
    with pytest.raises(ValueError, match="cpp: compiled kernels exist for the linear-attention op"):
        fastattn.attention(q, k, v, "softmax", backend="cpp")
