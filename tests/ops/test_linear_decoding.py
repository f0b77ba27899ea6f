"""Decoding on the tiled kernels: prefill and steps carry a typed :class:`LinearState` (``length``,
``select`` for beam search, ``to``), beams picked by ``select`` continue like the rows decoded alone, and
gated rfa stays finite where its gates saturate (log-gates from ``logsigmoid``)."""

from __future__ import annotations

import pytest
import torch
from helpers import make_mech, qkv

import fastattn
from fastattn.core.masks import Mask
from fastattn.mechanisms.kernel.base import KernelMechanism
from fastattn.ops.linear import tiled
from fastattn.ops.linear.state import LinearState


def _decoding_kernel_specs():
    return [s for s in fastattn.methods() if issubclass(s.cls, KernelMechanism) and s.decoding]


@pytest.mark.parametrize("spec", _decoding_kernel_specs(), ids=lambda s: s.name)
def test_step_state_is_typed_and_selectable(spec):
    mech = make_mech(spec).double()
    q, k, v = qkv(b=3, lq=19)
    _, st = mech.step(q[:, :, :11], k[:, :, :11], v[:, :, :11], None, 16 ** -0.5)
    assert isinstance(st, LinearState) and st.length == 11
    beams = torch.tensor([2, 0, 2])
    picked = st.select(beams)
    o2, st2 = mech.step(q[beams, :, 11:], k[beams, :, 11:], v[beams, :, 11:], picked, 16 ** -0.5)
    assert st2.length == 19
    full = mech.run(q, k, v, is_causal=True)
    torch.testing.assert_close(o2, full[beams, :, 11:])
    alone, _ = mech.step(q[2:3, :, 11:], k[2:3, :, 11:], v[2:3, :, 11:], st.select(2).to("cpu"), 16 ** -0.5)
    torch.testing.assert_close(alone, o2[:1])


def test_prefill_runs_the_tiled_kernels_and_one_token_steps_the_recurrence(monkeypatch):
    calls = []
    real, real_one = tiled._forward, tiled._one_token

    def counted(*args):
        calls.append(args[7])  # causal
        return real(*args)

    def counted_one(*args):
        calls.append("one")
        return real_one(*args)

    monkeypatch.setattr(tiled, "_forward", counted)
    monkeypatch.setattr(tiled, "_one_token", counted_one)
    mech = make_mech(fastattn.get_method("lightning")).double()
    q, k, v = qkv(lq=9)
    _, st = mech.step(q[:, :, :8], k[:, :, :8], v[:, :, :8], None, 0.25)
    mech.step(q[:, :, 8:], k[:, :, 8:], v[:, :, 8:], st, 0.25)
    rfa = make_mech(fastattn.get_method("rfa"), gate=True).double()
    logits = torch.randn(q.shape[0], q.shape[1], 9, dtype=torch.float64)
    _, st = rfa.step_gated(q[:, :, :8], k[:, :, :8], v[:, :, :8], logits[..., :8], None)
    rfa.step_gated(q[:, :, 8:], k[:, :, 8:], v[:, :, 8:], logits[..., 8:], st)
    assert calls == [True, "one"] * 2


@pytest.mark.parametrize("bias", [-200.0, 200.0])
def test_gated_rfa_saturated_gates_are_finite(bias):
    """``sigmoid(-200)`` underflows to 0 in float32: the gate (or 1 - gate) is exactly 0. Values and
    gradients stay finite and equal the reference."""
    mech = make_mech(fastattn.get_method("rfa"), h=2, hkv=2, gate=True)
    q, k, v = qkv(h=2, hkv=2, dtype=torch.float32, requires_grad=True)
    w = torch.randn(2, q.shape[-1])  # logits w . x_t + b with a saturating bias b
    b = torch.full((2,), bias, requires_grad=True)
    logits = torch.einsum("hd,bhld->bhl", w.requires_grad_(True), k.detach()) + b[:, None]
    out = mech.run_gated(q, k, v, logits)
    ref = mech.run_gated(q, k, v, logits, reference=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v, w, b))
    assert all(torch.isfinite(g).all() for g in grads)
    st = mech.step_gated(q, k, v, logits, None)[1]
    assert torch.isfinite(st.kv).all() and torch.isfinite(st.z).all()


def test_per_head_decay_gradient_reaches_lambda():
    """The per-head decay is a fixed buffer in lightning / transnormer, but the op differentiates it."""
    from fastattn.ops.linear.engine import dense_kernel_attention, linear_attention

    g = torch.Generator().manual_seed(0)
    fq, fk = (torch.randn(1, 2, 40, 4, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(1, 2, 40, 3, generator=g, dtype=torch.float64)
    lam = torch.tensor([0.7, 0.95], dtype=torch.float64, requires_grad=True)
    mask = Mask(40, 40, causal=True)
    out = linear_attention(fq, fk, v, mask, decay=lam, normalize=False, chunk=8)
    ref = dense_kernel_attention(fq, fk, v, mask, decay=lam, normalize=False)
    go = torch.randn_like(out)
    (d_out,), (d_ref,) = torch.autograd.grad(out, lam, go), torch.autograd.grad(ref, lam, go)
    torch.testing.assert_close(d_out, d_ref)
    assert d_out.abs().min() > 0
