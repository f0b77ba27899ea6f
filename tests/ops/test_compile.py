"""The torch.compile contract, on one mechanism per op (the full list is ``benchmarks/compile_check.py``).

Each case is traced with ``fullgraph=True`` (a graph break is an error) through the public entry point,
forward and backward, and must equal the eager result. The ``aot_eager`` backend traces the forward and the
backward graphs (what can break) without generating code (what only makes the test slow on 2 cores).

Beside the ops: one vision module and one alignment decoding loop (the other façades), and the functional
façade compiled from a cold start (a fresh interpreter) keeping its one graph across calls.

To add an op: append a :class:`Case` to ``CASES`` (one mechanism that runs on it; ``slow=True`` for compiles
over ~15 s on an idle 2-core machine: they stay in the default run).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

import fastattn
from fastattn.core.masks import Mask
from fastattn.ops.softmax.flash import flash_attention
from fastattn.ops.softmax.online import merge_partials
from helpers import qkv


@dataclass(frozen=True)
class Case:
    op: str  # the op the mechanism exercises
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    causal: bool = True
    padding: bool = True
    slow: bool = False


CASES = [
    Case("softmax.flash", "flash", {"block_q": 8, "block_k": 7}),
    Case("chunked", "memory_efficient", {"query_chunk": 8, "key_chunk": 7}),
]


def _params() -> list:
    return [pytest.param(c, id=f"{c.op}:{c.method}", marks=[pytest.mark.slow] if c.slow else []) for c in CASES]


def _check(fn, *inputs, atol=1e-5):
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    diff = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    got, want = compiled(*inputs), fn(*inputs)
    got, want = (got if isinstance(got, tuple) else (got,)), (want if isinstance(want, tuple) else (want,))
    w = [torch.randn(t.shape, generator=torch.Generator().manual_seed(i), dtype=t.dtype) for i, t in enumerate(want)]
    g_got = torch.autograd.grad(sum((t.nan_to_num(neginf=0.0) * wi).sum() for t, wi in zip(got, w)), diff)
    g_want = torch.autograd.grad(sum((t.nan_to_num(neginf=0.0) * wi).sum() for t, wi in zip(want, w)), diff)
    for a, b in zip(got + g_got, want + g_want):
        assert torch.allclose(a, b, atol=atol, equal_nan=False), (a - b).abs().max()


@pytest.mark.parametrize("case", _params())
def test_mechanism_compiles_as_one_graph(case: Case):
    q, k, v = qkv(b=2, h=2, hkv=1, lq=19, dtype=torch.float32, requires_grad=True)
    kpm = torch.zeros(2, 19, dtype=torch.bool)
    if case.padding:
        kpm[1, 13:] = True

    def run(q, k, v, kpm):
        return fastattn.attention(q, k, v, case.method, is_causal=case.causal,
                                  key_padding_mask=kpm if case.padding else None, **case.options)

    _check(run, q, k, v, kpm)


def test_flash_partials_with_absolute_offsets_compile():
    """The ring-attention seam: two key blocks placed by ``k_start`` (with segments), merged by lse."""
    q, k, v = qkv(b=1, h=2, hkv=2, lq=13, dtype=torch.float32, requires_grad=True)
    seg = torch.tensor([[0] * 6 + [1] * 7])

    def run(q, k, v):
        parts = [
            flash_attention(q, k[:, :, a:b], v[:, :, a:b],
                            Mask(13, b - a, causal=True, q_start=0, k_start=a, q_segments=seg, k_segments=seg[:, a:b]),
                            0.25, block_q=8, block_k=4, return_lse=True)
            for a, b in ((0, 5), (5, 13))
        ]
        return merge_partials(parts)

    _check(run, q, k, v)


def _randomised(module: torch.nn.Module) -> torch.nn.Module:
    """Every parameter drawn at random (a zero-initialised gate would make the block the identity)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.4 * torch.randn(p.shape, generator=g))
    return module.eval()


def test_vision_module_with_pixel_mask_compiles_as_one_graph():
    m = _randomised(fastattn.Attention2d(8, "ccnet"))
    x = torch.randn(2, 8, 4, 5, generator=torch.Generator().manual_seed(1), requires_grad=True)
    mask = torch.zeros(2, 4, 5, dtype=torch.bool)
    mask[1, 2:] = True
    mask[1, :, 3:] = True
    _check(m, x, mask)


def test_alignment_decoding_loop_compiles_as_one_graph():
    """Luong's local-p (predicted positions gather a window per step) over padded keys, step by step."""
    a = _randomised(fastattn.AlignmentAttention(6, 5, "luong", align="local-p", window=2, value_dim=3))
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, n, d, generator=g, requires_grad=True) for n, d in ((4, 6), (9, 5), (9, 3)))
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[1, 6:] = True

    def decode(q, k, v, kpm):
        state, out = None, []
        for t in range(q.shape[1]):
            context, weights, state = a.step(q[:, t], k, state, kpm, values=v)
            out += [context, weights]
        return tuple(out)

    _check(decode, q, k, v, kpm)


_COLD = r"""
import sys, torch, fastattn
assert "fastattn.mechanisms.exact.flash" not in sys.modules  # cold: the registry has not imported it
q, k, v = (torch.randn(1, 2, 11, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
f = torch.compile(fastattn.attention, fullgraph=True, backend="eager")
got = f(q, k, v, "flash", is_causal=True, block_q=4)
assert "torch._dynamo" in sys.modules
torch._dynamo.config.error_on_recompile = True  # one graph: the calls below must reuse it
fastattn.attention(q, k, v, "softmax")  # fills the functional module cache in between
again = f(q, k, v, "flash", is_causal=True, block_q=4)
want = fastattn.attention(q, k, v, "flash", is_causal=True, block_q=4)
assert torch.equal(got, want) and torch.equal(again, want), (got - want).abs().max()
print("ok")
"""


def test_cold_functional_call_compiles_as_one_graph():
    """``torch.compile(fastattn.attention, fullgraph=True)`` on a mechanism the registry has not imported yet
    (a fresh interpreter: the registry imports on first use) traces as one graph, and a second call reuses it
    although the functional module cache changed in between."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _COLD], check=False, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_loading_a_mechanism_does_not_import_dynamo():
    """The registry's compile hint costs nothing in programs that never compile (``torch._dynamo`` takes
    about a second to import)."""
    code = "import sys, fastattn; fastattn.get_method('flash'); print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-3000:]
