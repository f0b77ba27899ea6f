"""Contract tests of layer-level mechanisms (registry ``level="layer"``), parametrised over the registry.

A layer-level mechanism sees the layer input, so its checks are made on ``MultiheadAttention`` and on
the mechanism (``layer.mechanism``): shapes in both layouts and unbatched, the efficient forward equal to
the literal reference (float64, values and gradients), gradients reaching every parameter, batch
independence, no causal leak, padding invariance, decoding equal to the causal forward, save/load,
``aux_loss`` a scalar. A mechanism that wraps an attention core (option ``core``) runs the suite with its
default core and with a kernel core (``linear``), so ``core=`` is exercised, not only declared.
"""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import layer_form_specs, layer_specs

import fastattn
from fastattn.core.layer import LayerMechanism

B, D, H, HKV, L = 2, 36, 6, 3, 13  # GQA, odd length, head_dim 6
SPECS = layer_specs()
FORMS = layer_form_specs()  # sequence-level ids whose layer is their own (layer_form)
OTHER_CORE = "linear"


def _configs(specs):
    out = []
    for s in specs:
        out.append(pytest.param(s, None, id=s.name))
        if "core" in s.options:
            out.append(pytest.param(s, OTHER_CORE, id=f"{s.name}-core={OTHER_CORE}"))
    return out


CONFIGS = _configs(SPECS) + [pytest.param(s, None, id=f"{s.name}-layer_form") for s in FORMS]


def _flag(spec, core, name):
    """A capability of the layer: the mechanism's, and its core's where it wraps one."""
    core = core or spec.options.get("core")
    return getattr(spec, name) and (core is None or getattr(fastattn.get_method(core), name))


def _layer(spec, core=None, *, batch_first=True, seed=0, dtype=torch.float64, **kwargs):
    if spec.level == "layer":
        options = dict(spec.cls.test_options)
    else:  # a sequence id's layer form
        options = dict(spec.cls.layer_test_options or spec.cls.test_options)
    if core is not None:
        options.update(core=core, core_options=dict(fastattn.get_method(core).cls.test_options))
    torch.manual_seed(seed)
    heads = getattr(spec.cls, "fixed_heads", None)  # a layer with a fixed number of heads (mega: 1)
    layer = fastattn.MultiheadAttention(
        D, heads or H, spec.name, num_kv_heads=heads or HKV, batch_first=batch_first, dtype=dtype, **options, **kwargs
    )
    return layer.eval()


def _x(b=B, n=L, d=D, seed=1, dtype=torch.float64):
    return torch.randn(b, n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _only_causal(spec, core) -> bool:
    """The layer has only a causal form (gated rfa): every call of the suite is then causal."""
    return _requires_causal(spec.name, core)


@functools.cache
def _requires_causal(name, core) -> bool:
    return _layer(fastattn.get_method(name), core).mechanism.requires_causal


def _cross(spec) -> bool:
    """The layer takes key/value inputs (not a self-attention-only layer such as mega)."""
    return not getattr(spec.cls, "self_attention_only", False)


def _causal_flags(spec, core):
    if _only_causal(spec, core):
        return [True]
    return [False, True] if _flag(spec, core, "causal") else [False]


def _padding(b=B, n=L, valid=(L, 8)):
    m = torch.zeros(b, n, dtype=torch.bool)
    for i, v in enumerate(valid[:b]):
        m[i, v:] = True
    return m


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_metadata(spec):
    assert spec.level == "layer" and spec.kind == "sequence" and not spec.functional
    assert spec.title and spec.arxiv and spec.year >= 1990 and spec.complexity.startswith("O(")
    assert issubclass(spec.cls, LayerMechanism) and spec.cls.spec is spec
    assert set(spec.options) == set(spec.make_options().__dataclass_fields__)
    with pytest.raises(ValueError, match="has learned parameters"):
        fastattn.attention(*(torch.randn(1, 2, 5, 4) for _ in range(3)), method=spec.name)


@pytest.mark.parametrize("spec", FORMS, ids=[s.name for s in FORMS])
def test_layer_form_metadata(spec):
    """A sequence id with its own layer: the id stays sequence-level (functional where the operator owns
    no parameters), MultiheadAttention builds the layer form."""
    assert spec.level == "sequence" and spec.kind == "sequence"
    assert spec.functional == (not any(True for _ in spec.cls(
        None, head_dim=4, num_heads=2, **({"generator": torch.Generator()} if spec.randomized else {})
    ).parameters()))
    layer = _layer(spec)
    assert type(layer.mechanism) is spec.cls.layer_form and isinstance(layer.mechanism, LayerMechanism)


def test_registry_checks_the_level():
    from dataclasses import dataclass

    from fastattn.registry import catalogue, register

    class Dummy(LayerMechanism):
        @dataclass(frozen=True)
        class Options:
            pass

    done = {s.name for s in fastattn.methods()}
    free = next((n for n in catalogue() if n not in done), None)  # the checks raise before registering
    if free is None:
        pytest.skip("every catalogue id is registered")
    with pytest.raises(ValueError, match="level must be"):
        register(free, complexity="O(n)", causal=False, decoding=False, padding=False, level="head")(Dummy)
    assert not hasattr(Dummy, "spec")


@pytest.mark.parametrize("spec,core", CONFIGS)
def test_shapes_in_both_layouts_and_unbatched(spec, core):
    bf = _layer(spec, core, batch_first=True)
    sf = _layer(spec, core, batch_first=False)
    sf.load_state_dict(bf.state_dict())
    x = _x()
    for causal in _causal_flags(spec, core):
        a, _ = bf(x, is_causal=causal)
        b, _ = sf(x.transpose(0, 1), is_causal=causal)
        assert a.shape == (B, L, D) and b.shape == (L, B, D) and a.dtype == torch.float64
        torch.testing.assert_close(a, b.transpose(0, 1), rtol=1e-12, atol=1e-12)
        one, _ = bf(x[0], is_causal=causal)  # unbatched (L, D)
        torch.testing.assert_close(one, a[0], rtol=1e-12, atol=1e-12)
    # cross-attention over another sequence of another length and width
    if not _cross(spec):
        with pytest.raises(ValueError, match="self-attention"):
            _layer(spec, core, kdim=10, vdim=7)
        with pytest.raises(ValueError, match="self-attention"):
            bf(x, _x(n=L + 4, seed=2), _x(n=L + 4, seed=3))
        return
    cross = _layer(spec, core, kdim=10, vdim=7)
    out, _ = cross(x, _x(n=L + 4, d=10, seed=2), _x(n=L + 4, d=7, seed=3), is_causal=_only_causal(spec, core))
    assert out.shape == (B, L, D) and torch.isfinite(out).all()


@pytest.mark.parametrize("spec,core", CONFIGS)
def test_fast_path_equals_reference_values_and_grads(spec, core):
    """float64: the efficient forward equals the literal reference on values and every gradient
    (input and parameters), with padding and causal masking."""
    layer = _layer(spec, core)
    params = [p for p in layer.parameters()]
    masks = [None, _padding()] if _flag(spec, core, "padding") else [None]
    for causal in _causal_flags(spec, core):
        for kpm in masks:
            x = _x().requires_grad_(True)
            fast, _ = layer(x, key_padding_mask=kpm, is_causal=causal)
            ref = layer.mechanism.reference(x, key_padding_mask=kpm, is_causal=causal)
            torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)
            w = _x(seed=5)
            gf = torch.autograd.grad((fast * w).sum(), [x, *params], allow_unused=True)
            gr = torch.autograd.grad((ref * w).sum(), [x, *params], allow_unused=True)
            for a, b in zip(gf, gr):
                assert (a is None) == (b is None)
                if a is not None:
                    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("spec,core", CONFIGS)
def test_gradients_reach_every_parameter(spec, core):
    layer = _layer(spec, core).train()
    x = _x()
    out, _ = layer(x, is_causal=_flag(spec, core, "causal"))
    loss = (out * _x(seed=7)).sum() + layer.aux_loss
    names, params = zip(*layer.named_parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    for name, g in zip(names, grads):
        assert g is not None, f"{name} gets no gradient"
        assert torch.isfinite(g).all(), name
        # a key bias shifts all of a query's scores by one constant, which softmax cannot see
        if not name.endswith("k_proj.bias"):
            assert g.abs().max() > 0, f"{name} has an all-zero gradient"


@pytest.mark.parametrize("spec,core", CONFIGS)
def test_batch_independence(spec, core):
    layer = _layer(spec, core)
    x = _x(b=3)
    for causal in _causal_flags(spec, core):
        both, _ = layer(x, is_causal=causal)
        for i in range(3):
            one, _ = layer(x[i:i + 1], is_causal=causal)
            torch.testing.assert_close(both[i:i + 1], one, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("spec,core", [c for c in CONFIGS if _flag(*c.values, "causal")])
def test_causal_does_not_leak_the_future(spec, core):
    layer = _layer(spec, core)
    x = _x()
    out, _ = layer(x, is_causal=True)
    for t in (0, 5, L - 2):
        y = x.clone()
        y[:, t + 1:] = 10.0 * _x(seed=t + 11)[:, t + 1:]
        out2, _ = layer(y, is_causal=True)
        torch.testing.assert_close(out2[:, :t + 1], out[:, :t + 1], rtol=1e-10, atol=1e-12)
        assert not torch.allclose(out2[:, t + 1:], out[:, t + 1:])


@pytest.mark.parametrize("spec,core", [c for c in CONFIGS if _flag(*c.values, "padding")])
def test_padding_does_not_matter(spec, core):
    """Garbage in padded positions changes neither the real tokens' outputs nor the auxiliary loss
    (self-attention), nor any output (cross-attention over a padded context)."""
    layer = _layer(spec, core).train()
    kpm = _padding()
    x = _x()
    y = x.clone()
    y[kpm] = 50.0 * _x(seed=9)[kpm]
    for causal in _causal_flags(spec, core):
        a, _ = layer(x, key_padding_mask=kpm, is_causal=causal)
        aux_a = layer.aux_loss
        b, _ = layer(y, key_padding_mask=kpm, is_causal=causal)
        torch.testing.assert_close(a[~kpm], b[~kpm], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(aux_a, layer.aux_loss, rtol=1e-10, atol=1e-12)
    if not _cross(spec):
        return
    layer.eval()
    q = _x(n=7, seed=4)
    a, _ = layer(q, x, x, key_padding_mask=kpm, is_causal=_only_causal(spec, core))
    b, _ = layer(q, y, y, key_padding_mask=kpm, is_causal=_only_causal(spec, core))
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("spec,core", [c for c in CONFIGS if _flag(*c.values, "attn_mask")])
def test_attn_mask_in_torch_conventions(spec, core):
    """A boolean ``attn_mask`` (True = masked), 2-D or torch's 3-D ``(B * H, Lq, Lk)``, and its float
    form all act like the mask they describe (here: causal, where the layer has a causal form)."""
    layer = _layer(spec, core)
    x = _x()
    upper = torch.ones(L, L, dtype=torch.bool).triu(1)
    expect, _ = layer(x, is_causal=True) if _flag(spec, core, "causal") else (None, None)
    outs = [layer(x, attn_mask=m)[0] for m in (
        upper, upper.expand(B * H, L, L), torch.zeros(L, L, dtype=torch.float64).masked_fill(upper, float("-inf"))
    )]
    for out in outs:
        torch.testing.assert_close(out, outs[0], rtol=1e-12, atol=1e-12)
    if expect is not None:
        torch.testing.assert_close(outs[0], expect, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="3-D attn_mask"):
        layer(x, attn_mask=upper.expand(B, L, L))


@pytest.mark.parametrize("spec,core", [c for c in CONFIGS if _flag(*c.values, "decoding")])
@pytest.mark.parametrize("batch_first", [True, False])
def test_step_equals_causal_forward(spec, core, batch_first):
    layer = _layer(spec, core, batch_first=batch_first)
    x = _x()
    xl = x if batch_first else x.transpose(0, 1)
    full, _ = layer(xl, is_causal=True)
    state, outs = None, []
    for chunk in x.split([1, 3, 5, 4], dim=1):
        out, state = layer.step(chunk if batch_first else chunk.transpose(0, 1), state)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, dim=1 if batch_first else 0), full, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("spec,core", [c for c in CONFIGS if _flag(*c.values, "decoding")])
def test_left_padded_batch_decodes_like_each_row_alone(spec, core):
    layer = _layer(spec, core)
    x = _x()
    pad = 3  # row 1 is left-padded by `pad` tokens
    kpm = torch.zeros(B, 6, dtype=torch.bool)
    kpm[1, :pad] = True
    prompt = x[:, :6].clone()
    prompt[1, :pad] = 99.0
    out, state = layer.step(prompt, None, key_padding_mask=kpm)
    more, _ = layer.step(x[:, 6:9], state)
    alone, st1 = layer.step(x[1:2, pad:6], None)
    alone_more, _ = layer.step(x[1:2, 6:9], st1)
    torch.testing.assert_close(out[1:2, pad:], alone, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(more[1:2], alone_more, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("spec,core", CONFIGS)
def test_state_dict_round_trip(spec, core):
    a = _layer(spec, core, seed=0)
    b = _layer(spec, core, seed=1)
    x = _x()
    c = _only_causal(spec, core)
    assert not torch.allclose(a(x, is_causal=c)[0], b(x, is_causal=c)[0])
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a(x, is_causal=c)[0], b(x, is_causal=c)[0], rtol=0, atol=0)


@pytest.mark.parametrize("spec,core", CONFIGS)
def test_float32_and_float64(spec, core):
    for dtype in (torch.float32, torch.float64):
        layer = _layer(spec, core, dtype=dtype)
        out, _ = layer(_x(dtype=dtype), is_causal=_flag(spec, core, "causal"))
        assert out.dtype == dtype and torch.isfinite(out).all()
    layer = _layer(spec, core, dtype=torch.float32).double()
    assert layer(_x(), is_causal=_only_causal(spec, core))[0].dtype == torch.float64


@pytest.mark.parametrize("spec,core", CONFIGS)
def test_aux_loss_is_a_scalar_tensor(spec, core):
    layer = _layer(spec, core)
    assert isinstance(layer.aux_loss, torch.Tensor) and layer.aux_loss.dim() == 0
    for mode in (layer.train, layer.eval):
        mode()
        layer(_x(), is_causal=_only_causal(spec, core))
        aux = layer.aux_loss
        assert isinstance(aux, torch.Tensor) and aux.dim() == 0 and torch.isfinite(aux)
