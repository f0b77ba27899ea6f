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


def layer_form_specs() -> list[MethodSpec]:
    """Sequence-level mechanisms whose ``MultiheadAttention`` layer is their own (``layer_form``: a gate
    from the layer input, two attention stages): they run ``tests/kinds/test_layer_contract.py`` too."""
    return [s for s in fastattn.methods() if s.kind == "sequence" and s.level == "sequence"
            and getattr(s.cls, "layer_form", None) is not None]


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


def alignment(method: str, query_dim: int, key_dim: int, *, seed: int = 0, init_scale: float = 0.7,
              value_dim: int | None = None, **options) -> fastattn.AlignmentAttention:
    """A float64 ``AlignmentAttention`` whose parameters are ``init_scale * randn`` from ``seed``."""
    a = fastattn.AlignmentAttention(query_dim, key_dim, method, value_dim=value_dim, dtype=torch.float64, **options)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in a.parameters():
            p.copy_(init_scale * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return a


def tokens(b: int, n: int, d: int, seed: int = 1, dtype=torch.float64) -> torch.Tensor:
    """A seeded ``(B, n, D)`` layer input (float64 by default)."""
    return torch.randn(b, n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def grads(out: torch.Tensor, inputs, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out.shape, generator=g, dtype=out.dtype)
    return torch.autograd.grad((out * w).sum(), inputs, allow_unused=True)


def half_err(spec: MethodSpec, a: torch.Tensor, b: torch.Tensor) -> float:
    """The error of a half-precision output ``a`` against ``b``: :func:`rel_err`, or for mechanisms whose
    selection is discrete (``discontinuous = True``: hash buckets, clusters) the median over rows of the
    rows' relative errors -- rounding the inputs moves a few tokens to another bucket, and those rows
    change by O(1) by definition, while every other row must stay close."""
    if not spec.cls.discontinuous:
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


def torch_mha(embed_dim: int, num_heads: int, *, seed: int = 0) -> torch.nn.MultiheadAttention:
    """torch's float64 MultiheadAttention in eval mode with random (non-zero) biases."""
    torch.manual_seed(seed)
    mha = torch.nn.MultiheadAttention(embed_dim, num_heads, batch_first=True, dtype=torch.float64).eval()
    with torch.no_grad():
        mha.out_proj.bias.normal_()
        mha.in_proj_bias.normal_()
    return mha


@torch.no_grad()
def load_torch_mha(mechanism, mha: torch.nn.MultiheadAttention, *, out_scale: float = 1.0) -> None:
    """Copy torch's projections into a layer mechanism's ``q_proj, k_proj, v_proj, out_proj`` (the output
    weight times ``out_scale``)."""
    d = mha.embed_dim
    for i, lin in enumerate((mechanism.q_proj, mechanism.k_proj, mechanism.v_proj)):
        lin.weight.copy_(mha.in_proj_weight[i * d:(i + 1) * d])
        lin.bias.copy_(mha.in_proj_bias[i * d:(i + 1) * d])
    mechanism.out_proj.weight.copy_(mha.out_proj.weight * out_scale)
    mechanism.out_proj.bias.copy_(mha.out_proj.bias)


def largest_saved_tensor(fn, *args) -> int:
    """The element count of the largest tensor autograd saves for backward while running ``fn(*args)``
    (memory tests: an efficient path must save no ``n x n`` tensor)."""
    sizes = [0]

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return max(sizes)


def feature_map(b: int = 2, channels: int = 8, h: int = 5, w: int = 7, seed: int = 0, dtype=torch.float64,
                requires_grad: bool = False) -> torch.Tensor:
    """A random ``(B, C, H, W)`` image for the vision tests."""
    x = torch.randn(b, channels, h, w, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return x.requires_grad_(requires_grad)


def pixel_mask(b: int = 2, h: int = 5, w: int = 7) -> torch.Tensor:
    """Image 0 unpadded; image 1 padded to its top-left ``(h - 2) x (w - 3)`` region (True = padding)."""
    m = torch.zeros(b, h, w, dtype=torch.bool)
    m[1, h - 2:, :] = True
    m[1, :, w - 3:] = True
    return m


def randomized(m: torch.nn.Module, seed: int = 0, std: float = 0.4) -> torch.nn.Module:
    """``m`` in eval mode with every parameter drawn at random (zero-initialised gates and output
    convolutions would make a block the identity and its tests trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(std * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return m.eval()


def assert_fast_equals_reference(mech: Mechanism, causal=(False, True), lqs=(1, L), rtol=1e-9, atol=1e-11) -> None:
    """``mech``'s efficient path equals its reference (float64), values and gradients, with and without
    padding, causal or not, for each query length (``Lk = L``)."""
    for is_causal in causal:
        for kpm in (None, padding_mask()):
            for lq in lqs:
                q, k, v = qkv(lq=lq, lk=L, requires_grad=True)
                fast = mech.run(q, k, v, is_causal=is_causal, key_padding_mask=kpm)
                ref = mech.run(q, k, v, is_causal=is_causal, key_padding_mask=kpm, reference=True)
                torch.testing.assert_close(fast, ref, rtol=rtol, atol=atol)
                for a, b in zip(grads(fast, (q, k, v)), grads(ref, (q, k, v))):
                    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def decode_in_chunks(mech: Mechanism, q, k, v, sizes):
    """``mech.step`` over consecutive chunks of ``sizes`` tokens: the concatenated outputs and the last state."""
    outs, state, t = [], None, 0
    for size in sizes:
        o, state = mech.step(q[:, :, t:t + size], k[:, :, t:t + size], v[:, :, t:t + size], state, E ** -0.5)
        outs.append(o)
        t += size
    return torch.cat(outs, dim=2), state


def onmt_global_attention():
    """``onmt.modules.global_attention`` of OpenNMT-py (3.5.1, installed ``--no-deps``), or a skip when it
    is absent. The package's ``__init__`` imports its whole toolkit (pyonmttok, ctranslate2, ...), which
    a cross-check of one module does not need: the module and the two it imports are loaded from their
    files under temporary stand-ins for the parent packages, which are removed again."""
    import importlib.util
    import sys
    import types
    import warnings
    from pathlib import Path

    import pytest

    found = importlib.util.find_spec("onmt")
    if found is None or found.origin is None:
        pytest.skip("OpenNMT-py (onmt) is not installed")
    root = Path(found.origin).parent
    names = ("onmt", "onmt.modules", "onmt.utils", "onmt.modules.sparse_activations", "onmt.utils.misc",
             "onmt.modules.global_attention")
    saved = {n: sys.modules.get(n) for n in names}
    try:
        for pkg, path in (("onmt", root), ("onmt.modules", root / "modules"), ("onmt.utils", root / "utils")):
            stub = types.ModuleType(pkg)
            stub.__path__ = [str(path)]
            sys.modules[pkg] = stub
        module = None
        for name in names[3:]:
            spec = importlib.util.spec_from_file_location(name, root / (name.split(".", 1)[1].replace(".", "/") + ".py"))
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            with warnings.catch_warnings():  # its torch.cuda.amp decorators are deprecated: not ours
                warnings.simplefilter("ignore", FutureWarning)
                spec.loader.exec_module(module)
        return module
    except ImportError as e:
        pytest.skip(f"cannot load onmt.modules.global_attention: {e}")
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m
