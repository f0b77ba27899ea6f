"""``fastattn.attention``: one validation per call, constructed modules reused, randomness as documented,
``functional`` derived from the class."""

from __future__ import annotations

import pytest
import torch

import fastattn
import fastattn.core.base
import fastattn.functional as F_
from fastattn.registry import owns_no_parameters
from helpers import qkv


def test_inputs_are_validated_once_per_call(monkeypatch):
    calls = []
    for module in (F_, fastattn.core.base):
        real = module.check_inputs
        monkeypatch.setattr(module, "check_inputs", lambda *a, _real=real, **kw: calls.append(1) or _real(*a, **kw))
    q, k, v = qkv()
    fastattn.attention(q, k, v, "flash", is_causal=True)
    assert len(calls) == 1


def test_deterministic_modules_are_built_once_and_bounded():
    F_.clear_cache()
    q, k, v = qkv()
    fastattn.attention(q, k, v, "local", is_causal=True, window=8, block=8)
    (mech,) = F_._MODULES.values()
    fastattn.attention(q, k, v, "local", is_causal=True, window=8, block=8)
    assert list(F_._MODULES.values()) == [mech]  # same module, same sparse plan
    fastattn.attention(q, k, v, "local", is_causal=True, window=4, block=8)  # other options: another module
    fastattn.attention(q[:, :2], k[:, :1], v[:, :1], "local", is_causal=True, window=8, block=8)  # other heads
    assert len(F_._MODULES) == 3
    for w in range(1, F_.CACHE_SIZE + 5):
        fastattn.attention(q, k, v, "local", window=w, block=8)
    assert len(F_._MODULES) == F_.CACHE_SIZE
    F_.clear_cache()
    assert not F_._MODULES


def test_randomised_methods_draw_anew_each_call_unless_seeded_alike():
    q, k, v = qkv()
    seeded = [fastattn.attention(q, k, v, "performer", generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    torch.testing.assert_close(seeded[0], seeded[1])  # same seed: the same draw
    g = torch.Generator().manual_seed(3)
    first, second = (fastattn.attention(q, k, v, "performer", generator=g) for _ in range(2))
    torch.testing.assert_close(first, seeded[0])
    assert not torch.allclose(first, second)  # one generator, two calls: two draws
    assert not torch.allclose(fastattn.attention(q, k, v, "performer"), fastattn.attention(q, k, v, "performer"))
    assert all(key[0] != "performer" for key in F_._MODULES)  # never cached


def test_functional_is_derived_from_the_class():
    specs = fastattn.methods()
    for spec in specs:
        plain = spec.kind == "sequence" and getattr(spec, "level", "sequence") != "layer"
        assert spec.functional is (plain and owns_no_parameters(spec.cls)), spec.name
        assert spec.cls.spec is spec
    assert {s.name for s in specs if not s.functional} >= {"hedgehog", "sac"}
    with pytest.raises(TypeError):
        fastattn.registry.register("softmax", complexity="O(1)", causal=True, decoding=True, padding=True, functional=True)
