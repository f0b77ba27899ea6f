"""torch.compile over the linear-attention kernels: the custom ops pass ``torch.library.opcheck`` (schema,
fake tensors, autograd registration, AOT dispatch), and one mechanism per op path compiles with
``fullgraph=True`` and agrees with eager, forward and backward. The whole kernel family:
``python benchmarks/compile_check.py --family kernel`` (compiles are slow on 2 cores)."""

from __future__ import annotations

import pytest
import torch
from helpers import make_mech

import fastattn
import fastattn.ops.linear.tiled


def _args(log_g: str | None, state: bool, causal: bool, normalize: bool):
    """4 query heads on 2 key/value heads (native grouped-query attention)."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.rand(*s, generator=g, dtype=torch.float64).requires_grad_()
    q, k, v = r(2, 4, 13, 4), r(2, 2, 13, 4), r(2, 2, 13, 5)
    lg = None if log_g is None else (-r(2, 2, 13 if log_g == "token" else 1)).detach().requires_grad_()
    s0 = r(2, 2, 4, 5) if state else None
    z0 = r(2, 2, 4) if state and normalize else None
    return q, k, v, lg, s0, z0, causal, normalize, 4


@pytest.mark.parametrize("causal,log_g", [(True, None), (True, "head"), (True, "token"), (False, None)])
@pytest.mark.parametrize("state", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_custom_op_opcheck(causal, log_g, state, normalize):
    torch.library.opcheck(torch.ops.fastattn.linear_attention.default, _args(log_g, state, causal, normalize))


@pytest.mark.parametrize("name,causal,options", [
    ("linear", True, {}),  # fused feature map: applied outside the custom op under compile
    ("lightning", True, {}),  # per-head decay
    ("performer", False, {}),  # non-causal kernel
    ("performer", True, {}),  # key log-scales: their running maximum as float64 per-token log-gates
    ("rfa", True, {"gate": True}),  # per-token log-gates (logits from the layer input, learned)
], ids=["linear-causal", "lightning-decay", "performer-noncausal", "performer-causal", "rfa-gated"])
def test_kernel_mechanism_compiles_fullgraph(name, causal, options):
    mech = make_mech(fastattn.get_method(name), h=4, hkv=2, e=16, **options)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 21, 16, generator=g, requires_grad=True)
    k = torch.randn(2, 2, 21, 16, generator=g, requires_grad=True)
    v = torch.randn(2, 2, 21, 8, generator=g, requires_grad=True)

    params = [p for p in mech.parameters()]
    if options.get("gate"):
        logits = torch.randn(2, 4, 21, generator=g, requires_grad=True)
        params.append(logits)

        def fn(q, k, v):
            return mech.run_gated(q, k, v, logits)
    else:
        def fn(q, k, v):
            return mech.run(q, k, v, is_causal=causal)

    ref = fn(q, k, v)
    torch._dynamo.reset()
    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v)
    torch.testing.assert_close(out, ref)
    got = torch.autograd.grad(out.square().sum(), (q, k, v, *params))
    want = torch.autograd.grad(ref.square().sum(), (q, k, v, *params))
    torch.testing.assert_close(got, want)
