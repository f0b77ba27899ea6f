"""Shared test fixtures: inputs, mechanism construction, comparison helpers."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import fastattn
from fastattn.core.base import Mechanism
from fastattn.registry import MethodSpec

B, H, HKV, L, E, EV = 2, 4, 2, 61, 16, 12  # awkward sizes on purpose: GQA, odd length, Ev != E


def sequence_specs() -> list[MethodSpec]:
    """Sequence-level mechanisms (per-head q, k, v); layer-level ones have their own contract suite."""
    return [s for s in fastattn.methods() if s.kind == "sequence" and s.level == "sequence"]


def layer_specs() -> list[MethodSpec]:
    """Layer-level mechanisms (they see the layer input): ``tests/kinds/test_layer_contract.py``."""
    return [s for s in fastattn.methods() if s.kind == "sequence" and s.level == "layer"]


def ids(specs: list[MethodSpec]) -> list[str]:
    return [s.name for s in specs]


def make_mech(spec: MethodSpec, h: int = H, hkv: int = HKV, e: int = E, seed: int = 0, **options) -> Mechanism:
    opts = {**spec.cls.test_options, **options}
    kwargs = {"generator": torch.Generator().manual_seed(seed)} if spec.randomized else {}
    mech = spec.cls(spec.make_options(**opts), head_dim=e, num_heads=h, num_kv_heads=hkv, **kwargs)
    return mech.eval()


def qkv(b: int = B, h: int = H, hkv: int = HKV, lq: int = L, lk: int | None = None, e: int = E, ev: int = EV,
        dtype=torch.float64, seed: int = 0, requires_grad: bool = False):
    g = torch.Generator().manual_seed(seed)
    lk = lq if lk is None else lk
    q = torch.randn(b, h, lq, e, generator=g, dtype=dtype)
    k = torch.randn(b, hkv, lk, e, generator=g, dtype=dtype)
    v = torch.randn(b, hkv, lk, ev, generator=g, dtype=dtype)
    if requires_grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v


def padding_mask(b: int = B, lk: int = L, valid: tuple[int, ...] = (L, 40)) -> torch.Tensor:
    m = torch.zeros(b, lk, dtype=torch.bool)
    for i, n in enumerate(valid[:b]):
        m[i, n:] = True
    return m


def grads(out: torch.Tensor, inputs, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out.shape, generator=g, dtype=out.dtype)
    return torch.autograd.grad((out * w).sum(), inputs, allow_unused=True)


def half_err(spec: MethodSpec, a: torch.Tensor, b: torch.Tensor) -> float:
    """The error of a half-precision output ``a`` against ``b``: :func:`rel_err`, or for mechanisms whose
    selection is discrete (``discontinuous = True``: hash buckets, clusters) the median over rows of the
    rows' relative errors -- rounding the inputs moves a few tokens to another bucket, and those rows
    change by O(1) by definition, while every other row must stay close."""
    if not getattr(spec.cls, "discontinuous", False):
        return rel_err(a, b)
    a2, b2 = a.double().flatten(0, -2), b.double().flatten(0, -2)
    rows = (a2 - b2).norm(dim=-1) / b2.norm(dim=-1).clamp_min(1e-30)
    return rows[b2.norm(dim=-1) > 0].median().item()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def through_bytes(state: dict) -> dict:
    """``state`` saved with ``torch.save`` and loaded back (a save/load round trip in memory)."""
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operation returns (forward and backward) and which ops ran."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes, self.ops = 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(func.__name__)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.bytes = max(self.bytes, t.numel() * t.element_size())
        return out
