"""Backend dispatch: names, reasons, priority and the one-call registration of a new backend."""

from __future__ import annotations

import pytest
import torch

import fastattn
from fastattn.core import dispatch
from fastattn.core.dispatch import Backend, Call, backends, choose_backend, register_backend
from helpers import qkv


def test_builtin_backends_in_auto_order():
    assert backends()[-2:] == ["torch", "reference"]
    spec = fastattn.get_method("softmax")
    assert choose_backend("auto", spec, Call()).name == "torch"


def test_reference_backend_runs_the_formula(monkeypatch):
    q, k, v = qkv()
    cls = fastattn.get_method("linear").cls
    monkeypatch.setattr(cls, "reference", lambda self, q, k, v, mask, scale: torch.zeros(*q.shape[:3], v.shape[-1]))
    assert (fastattn.attention(q, k, v, "linear", backend="reference") == 0).all()
    assert not (fastattn.attention(q, k, v, "linear", backend="torch") == 0).all()
    assert not (fastattn.attention(q, k, v, "linear") == 0).all()  # auto: torch first


def test_impossible_request_lists_every_backend_reason():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"reference: the reference formula has no attention dropout.*torch: would take"):
        fastattn.attention(q, k, v, "softmax", dropout_p=0.1, backend="reference")
    layer = fastattn.MultiheadAttention(16, 2, "softmax", batch_first=True, backend="reference")
    layer(torch.randn(1, 3, 16))  # a forward is fine
    with pytest.raises(ValueError, match="reference: the reference formula keeps no decoding state"):
        layer.step(torch.randn(1, 3, 16))
    layer = fastattn.MultiheadAttention(16, 2, "softmax", batch_first=True, backend="reference", dropout=0.5)
    layer.eval()(torch.randn(1, 3, 16))  # no dropout in eval mode: fine
    with pytest.raises(ValueError, match="no attention dropout"):
        layer.train()(torch.randn(1, 3, 16))


def test_unknown_backend_lists_the_valid_ones():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"unknown backend 'cuda'; valid backends: 'auto', .*'torch'.*'reference'"):
        fastattn.attention(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        fastattn.MultiheadAttention(16, 2, backend="sdpa")
    with pytest.raises(ValueError, match="'triton' is not installed in this build; valid backends: 'auto'"):
        fastattn.MultiheadAttention(16, 2, backend="triton")
    mech = fastattn.get_method("softmax").cls(head_dim=16, num_heads=4, num_kv_heads=2)
    with pytest.raises(ValueError, match="contradicts"):
        mech.run(q, k, v, reference=True, backend="torch")


class _Doubling(Backend):
    """A stand-in compiled backend: takes only float64 calls of ``softmax``."""

    name = "doubling"
    calls = 0

    def why_not(self, spec, call):
        if spec.name != "softmax":
            return "no kernel for this method"
        if call.dtype != torch.float64:
            return "float64 only"
        return None

    def run(self, mech, q, k, v, mask, scale, dropout_p):
        type(self).calls += 1
        return 2 * mech.forward(q, k, v, mask, scale, dropout_p)


def test_registering_a_backend_is_one_call(monkeypatch):
    monkeypatch.setattr(dispatch, "_BACKENDS", dict(dispatch._BACKENDS))
    register_backend(_Doubling(), before="torch")
    assert backends() == ["cpp", "doubling", "torch", "reference"]
    q, k, v = qkv()
    plain = fastattn.attention(q, k, v, backend="torch")
    torch.testing.assert_close(fastattn.attention(q, k, v), 2 * plain)  # auto prefers it where it can
    assert _Doubling.calls == 1
    torch.testing.assert_close(fastattn.attention(q.float(), k.float(), v.float()), plain.float())  # auto: skips it
    with pytest.raises(ValueError, match="doubling: float64 only; .*torch: would take"):
        fastattn.attention(q.float(), k.float(), v.float(), backend="doubling")
    with pytest.raises(ValueError, match="no kernel for this method"):
        fastattn.attention(q, k, v, "flash", backend="doubling")
    with pytest.raises(ValueError, match="already registered"):
        register_backend(_Doubling())
