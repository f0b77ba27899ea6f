"""Contract tests, parametrised over the registry: every sequence mechanism gets them for free."""

from __future__ import annotations

import pytest
import torch

import fastattn
from helpers import EV, B, E, H, L, grads, half_err, ids, make_mech, padding_mask, qkv, rel_err, sequence_specs

SPECS = sequence_specs()
CAUSAL = [s for s in SPECS if s.causal]
NONCAUSAL = [s for s in SPECS if not s.causal]
PADDING = [s for s in SPECS if s.padding]
DECODING = [s for s in SPECS if s.decoding]
FUNCTIONAL = [s for s in SPECS if s.functional]
EXACT = [s for s in SPECS if s.exact]


def _causal_flags(spec):
    return [False, True] if spec.causal else [False]


@pytest.mark.parametrize("spec", SPECS, ids=ids(SPECS))
def test_metadata_complete(spec):
    assert spec.title and spec.arxiv and spec.year >= 1990 and spec.complexity.startswith("O(")
    assert spec.summary and spec.family
    assert spec.cls is not None and spec.cls.spec is spec
    assert set(spec.options) == set(spec.make_options().__dataclass_fields__)


@pytest.mark.parametrize("spec", SPECS, ids=ids(SPECS))
def test_shape_dtype_finite_values_and_grads(spec):
    mech = make_mech(spec)
    for causal in _causal_flags(spec):
        q, k, v = qkv(dtype=torch.float32, requires_grad=True)
        out = mech.run(q, k, v, is_causal=causal)
        assert out.shape == (B, H, L, EV) and out.dtype == torch.float32
        assert torch.isfinite(out).all()
        for g, t in zip(grads(out, (q, k, v)), (q, k, v)):
            assert g is not None and g.shape == t.shape and torch.isfinite(g).all()


@pytest.mark.parametrize("spec", SPECS, ids=ids(SPECS))
@pytest.mark.parametrize("lq", [1, 61])
def test_fast_path_equals_reference_values_and_grads(spec, lq):
    """The efficient implementation equals the paper's formula (float64), with GQA, odd lengths,
    padding and causal masking, on values and on every gradient."""
    mech = make_mech(spec).double()
    masks = [None, padding_mask()] if spec.padding else [None]
    for causal in _causal_flags(spec):
        for kpm in masks:
            q, k, v = qkv(lq=lq, lk=L, requires_grad=True)
            if not causal and lq != L and not spec.functional:
                continue
            fast = mech.run(q, k, v, is_causal=causal, key_padding_mask=kpm)
            ref = mech.run(q, k, v, is_causal=causal, key_padding_mask=kpm, reference=True)
            torch.testing.assert_close(fast, ref, rtol=1e-7, atol=1e-9)
            for gf, gr in zip(grads(fast, (q, k, v)), grads(ref, (q, k, v))):
                torch.testing.assert_close(gf, gr, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("spec", EXACT, ids=ids(EXACT))
def test_exact_mechanisms_equal_softmax(spec):
    q, k, v = qkv(requires_grad=True)
    kpm = padding_mask()
    for causal in (False, True):
        ref = fastattn.attention(q, k, v, "softmax", is_causal=causal, key_padding_mask=kpm)
        ours = make_mech(spec).run(q, k, v, is_causal=causal, key_padding_mask=kpm)
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
        for a, b in zip(grads(ours, (q, k, v)), grads(ref, (q, k, v))):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("spec", SPECS, ids=ids(SPECS))
def test_batch_independence(spec):
    mech = make_mech(spec).double()
    q, k, v = qkv()
    for causal in _causal_flags(spec):
        both = mech.run(q, k, v, is_causal=causal)
        for i in range(B):
            one = mech.run(q[i:i + 1], k[i:i + 1], v[i:i + 1], is_causal=causal)
            torch.testing.assert_close(both[i:i + 1], one, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("spec", PADDING, ids=ids(PADDING))
def test_padded_keys_do_not_matter(spec):
    mech = make_mech(spec).double()
    q, k, v = qkv()
    kpm = padding_mask()
    k2, v2 = k.clone(), v.clone()
    k2[kpm[:, None, :, None].expand_as(k2)] = 1e3  # large garbage in the padded slots
    v2[kpm[:, None, :, None].expand_as(v2)] = -7e2
    for causal in _causal_flags(spec):
        a = mech.run(q, k, v, key_padding_mask=kpm, is_causal=causal)
        b = mech.run(q, k2, v2, key_padding_mask=kpm, is_causal=causal)
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("spec", PADDING, ids=ids(PADDING))
def test_all_keys_padded_gives_zeros_not_nan(spec):
    mech = make_mech(spec)
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = qkv(dtype=dtype, requires_grad=True)
        kpm = padding_mask(valid=(L, 0))  # batch 1 has no real key at all
        for causal in _causal_flags(spec):
            out = mech.run(q, k, v, key_padding_mask=kpm, is_causal=causal)
            assert torch.isfinite(out).all()
            if spec.functional:
                assert out[1].abs().max().item() == 0.0
            assert all(torch.isfinite(g).all() for g in grads(out, (q, k, v)) if g is not None)


@pytest.mark.parametrize("spec", CAUSAL, ids=ids(CAUSAL))
def test_causal_does_not_leak_the_future(spec):
    mech = make_mech(spec).double()
    q, k, v = qkv()
    out = mech.run(q, k, v, is_causal=True)
    for t in (0, 17, 32, L - 1):
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        for x in (q2, k2, v2):
            x[:, :, t + 1:] = torch.randn_like(x[:, :, t + 1:]) * 5
        out2 = mech.run(q2, k2, v2, is_causal=True)
        torch.testing.assert_close(out[:, :, : t + 1], out2[:, :, : t + 1], rtol=1e-9, atol=1e-10)
    # and the mask is not a no-op: changing the past (keys by a random amount -- some feature maps are
    # invariant to a constant shift -- and values -- input-independent weights ignore keys) changes the present
    k3, v3 = k.clone(), v.clone()
    g = torch.Generator().manual_seed(5)
    k3[:, :, :5] += 3.0 * torch.randn(k3[:, :, :5].shape, generator=g, dtype=k3.dtype)
    v3[:, :, :5] += 3.0
    assert not torch.allclose(mech.run(q, k3, v3, is_causal=True)[:, :, 10:], out[:, :, 10:])


@pytest.mark.parametrize("spec", NONCAUSAL, ids=ids(NONCAUSAL))
def test_causal_request_without_causal_form_is_an_error(spec):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="no causal form"):
        make_mech(spec).run(q, k, v, is_causal=True)


@pytest.mark.parametrize("spec", DECODING, ids=ids(DECODING))
def test_step_equals_causal_forward(spec):
    mech = make_mech(spec).double()
    q, k, v = qkv()
    full = mech.run(q, k, v, is_causal=True)
    outs, state, t = [], None, 0
    for size in (1, 1, 3, 8, 1, 20, 27):  # sums to 61
        o, state = mech.step(q[:, :, t:t + size], k[:, :, t:t + size], v[:, :, t:t + size], state, E ** -0.5)
        outs.append(o)
        t += size
    assert t == L
    torch.testing.assert_close(torch.cat(outs, dim=2), full, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("spec", SPECS, ids=ids(SPECS))
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 4e-2), (torch.float16, 8e-3)])
def test_half_precision_close_to_fp32(spec, dtype, tol):
    mech = make_mech(spec)
    q, k, v = qkv(dtype=torch.float32)
    for causal in _causal_flags(spec):
        ref = mech.run(q, k, v, is_causal=causal)
        half = mech.run(q.to(dtype), k.to(dtype), v.to(dtype), is_causal=causal)
        assert half.dtype == dtype and torch.isfinite(half).all()
        assert half_err(spec, half, ref) < tol


@pytest.mark.parametrize("spec", SPECS, ids=ids(SPECS))
def test_layer_state_dict_round_trip(spec, tmp_path):
    kw = {"generator": torch.Generator().manual_seed(1)} if spec.randomized else {}
    a = fastattn.MultiheadAttention(32, 4, spec.name, num_kv_heads=2, batch_first=True, **spec.cls.test_options, **kw)
    kw = {"generator": torch.Generator().manual_seed(2)} if spec.randomized else {}
    b = fastattn.MultiheadAttention(32, 4, spec.name, num_kv_heads=2, batch_first=True, **spec.cls.test_options, **kw)
    torch.save(a.state_dict(), tmp_path / "a.pt")
    b.load_state_dict(torch.load(tmp_path / "a.pt"))
    x = torch.randn(2, L, 32)
    a.eval(), b.eval()
    torch.testing.assert_close(a(x)[0], b(x)[0])


@pytest.mark.parametrize("spec", DECODING, ids=ids(DECODING))
def test_layer_step_equals_causal_forward(spec):
    layer = fastattn.MultiheadAttention(32, 4, spec.name, num_kv_heads=2, **spec.cls.test_options).double().eval()
    x = torch.randn(L, 2, 32, dtype=torch.float64)  # batch_first=False, as torch's default
    full, _ = layer(x, is_causal=True)
    state, outs = None, []
    for chunk in x.split(13, dim=0):
        o, state = layer.step(chunk, state)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, dim=0), full)


@pytest.mark.parametrize("spec", FUNCTIONAL, ids=ids(FUNCTIONAL))
def test_functional_matches_mechanism(spec):
    q, k, v = qkv()
    kw = {"generator": torch.Generator().manual_seed(0)} if spec.randomized else {}
    out = fastattn.attention(q, k, v, spec.name, **spec.cls.test_options, **kw)
    torch.testing.assert_close(out, make_mech(spec).double().run(q, k, v))


@pytest.mark.parametrize("spec", SPECS, ids=ids(SPECS))
def test_half_precision_layer_close_to_fp32(spec):
    """A whole layer in bfloat16 (learned parts included) runs and stays close to the float32 layer;
    decoding too where the mechanism decodes."""
    torch.manual_seed(0)  # the layer's weights and the input: one draw, whatever ran before
    kw = {"generator": torch.Generator().manual_seed(1)} if spec.randomized else {}
    layer = fastattn.MultiheadAttention(32, 4, spec.name, num_kv_heads=2, batch_first=True, **spec.cls.test_options, **kw)
    layer.eval()
    x = torch.randn(2, L, 32)
    causal = spec.causal
    ref = layer(x, is_causal=causal)[0]
    half = layer.to(torch.bfloat16)
    out = half(x.to(torch.bfloat16), is_causal=causal)[0]
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert half_err(spec, out, ref) < 5e-2
    if spec.decoding:
        a, state = half.step(x[:, :40].to(torch.bfloat16))
        b, _ = half.step(x[:, 40:].to(torch.bfloat16), state)
        assert half_err(spec, torch.cat([a, b], 1), ref) < 5e-2


@pytest.mark.parametrize("spec", SPECS, ids=ids(SPECS))
def test_reference_backend_equals_torch_backend(spec):
    """``backend="reference"`` (the paper's formula) and ``"torch"`` (the efficient path) agree, through
    ``fastattn.attention`` where the mechanism is functional and through the layer otherwise."""
    kpm = padding_mask() if spec.padding else None
    for causal in _causal_flags(spec):
        if spec.functional:
            q, k, v = qkv()
            kw = lambda: {"generator": torch.Generator().manual_seed(0)} if spec.randomized else {}  # noqa: E731
            run = lambda backend: fastattn.attention(  # noqa: E731
                q, k, v, spec.name, key_padding_mask=kpm, is_causal=causal, backend=backend,
                **spec.cls.test_options, **kw(),
            )
        else:
            kw = {"generator": torch.Generator().manual_seed(0)} if spec.randomized else {}
            layer = fastattn.MultiheadAttention(32, 4, spec.name, num_kv_heads=2, batch_first=True,
                                                **spec.cls.test_options, **kw).double().eval()
            x = torch.randn(B, L, 32, dtype=torch.float64)

            def run(backend):
                layer.backend = backend
                return layer(x, key_padding_mask=kpm, is_causal=causal)[0]
        torch.testing.assert_close(run("reference"), run("torch"), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("spec", SPECS, ids=ids(SPECS))
def test_half_precision_policy_is_applied_before_dispatch(spec):
    """``half_precision = "upcast"``: the implementation sees float32 and the caller gets float16 back;
    ``"native"``: the implementation sees the half inputs."""
    mech = make_mech(spec)
    seen = []
    real = mech.forward
    mech.forward = lambda q, k, v, *a, **kw: seen.append({q.dtype, k.dtype, v.dtype}) or real(q, k, v, *a, **kw)
    q, k, v = qkv(dtype=torch.float16)
    assert mech.run(q, k, v).dtype == torch.float16
    assert seen == [{torch.float16 if spec.cls.half_precision == "native" else torch.float32}]


def test_assigning_a_layers_backend_reaches_its_forward(monkeypatch):
    """``layer.backend = ...`` after construction is what the forward runs (the contract test above sets it
    that way on the layer path)."""
    layer = fastattn.MultiheadAttention(16, 2, "linear", batch_first=True)
    seen = []
    run = type(layer.attn).run

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("backend"))
        return run(self, *args, **kwargs)

    monkeypatch.setattr(type(layer.attn), "run", spy)
    x = torch.randn(1, 5, 16)
    for backend in ("reference", "torch"):
        layer.backend = backend
        layer(x)
    assert seen == ["reference", "torch"] and layer.backend == "torch"
    with pytest.raises(ValueError, match="backend"):
        layer.backend = "nope"
