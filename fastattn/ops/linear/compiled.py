"""The compiled CPU backend of linear attention (``backend="cpp"``): C++ kernels built on first use.

``linear_cpu.cpp`` (next to this file) holds the kernels: the causal recurrence as one pass per token
over an L1-resident state, one parallel region over the (batch, key/value head) rows per sweep, with
state in and out, per-head decay and per-token gates, grouped-query heads, forward and a hand-written
backward; non-causal calls sum the state and read it out a block of tokens at a time (each state
element loaded once per block). A known feature map (elu + 1, :data:`FUSED_FEATURES`) is applied inside
the kernels, forward and backward, so no feature tensor is allocated. They are registered as the ``torch.library`` custom ops ``fastattn::linear_attention_cpp`` / ``fastattn::linear_attention_cpp_backward`` (the
tiled ops' schema and shapes plus the fused feature map's number, so ``torch.compile`` keeps one graph around them).

The same extension holds the block-sparse engine's kernels (``../sparse/sparse_cpu.cpp``, called by
:mod:`fastattn.ops.sparse.compiled`): this module is the one build helper and the one ``use()`` switch of
the compiled backend.

The extension is compiled by :func:`torch.utils.cpp_extension.load` the first time it is needed (about
half a minute; ``-O3 -march=native``, OpenMP) and cached in torch's extension directory
(``TORCH_EXTENSIONS_DIR``), keyed by the source, the flags and the CPU model, so later processes only
load it. Nothing is compiled at install time: without a C++ compiler or ninja, or if the build fails,
the backend reports why (:func:`status`, ``fastattn.backends()``) and ``backend="auto"`` uses the
PyTorch kernels. ``FASTATTN_CPP=0`` disables it; under ``backend="auto"`` it is opt-in
(``FASTATTN_CPP=1``), so a first call never blocks on a compiler unless asked; ``backend="cpp"`` builds
it when needed.

:func:`use` is the switch the backend sets around a mechanism's forward or decoding step (process-wide,
not per thread);
:func:`linear_attention` is the kernel call the engine makes while it is on.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from .tiled import FeatureMap, fake_backward, fake_forward, log_gate_grad, tiled_linear_attention

__all__ = ["active", "build", "linear_attention", "status", "use"]

_SOURCE = Path(__file__).with_name("linear_cpu.cpp")
# every source of the one extension: the linear kernels (which hold the Python module) and the
# block-sparse engine's kernels (fastattn/ops/sparse/compiled.py)
_SOURCES = (_SOURCE, Path(__file__).parent.parent / "sparse" / "sparse_cpu.cpp")
_HEADERS = (Path(__file__).parent.parent / "simd.h",)  # included by the sources: part of the cache key
_FLAGS = ["-O3", "-march=native", "-fopenmp"]
_LOCK = threading.Lock()
_MODULE = None
_FAILED: str | None = None
_ON = [0]  # depth of nested use() blocks (a plain global: torch.compile traces it, not a ContextVar)


def _env() -> str:
    return os.environ.get("FASTATTN_CPP", "").strip()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _name() -> str:
    h = hashlib.sha1()
    for src in _SOURCES + _HEADERS:
        h.update(src.read_bytes())
    h.update(" ".join(_FLAGS).encode())
    h.update(_cpu_model().encode())
    h.update(torch.__version__.encode())
    return f"fastattn_linear_cpu_{h.hexdigest()[:12]}"


def _missing_tool() -> str | None:
    if _env() == "0":
        return "disabled by FASTATTN_CPP=0"
    for src in _SOURCES + _HEADERS:
        if not src.exists():
            return f"kernel source {src.name} is missing from the installation"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None and shutil.which("g++") is None:
        return f"no C++ compiler found ({cxx!r} not on PATH)"
    try:
        from torch.utils.cpp_extension import verify_ninja_availability
        verify_ninja_availability()
    except Exception:  # noqa: BLE001 -- any failure means: cannot build
        return "ninja is not installed (pip install ninja)"
    return None


def build() -> str | None:
    """Build (or load from the cache) the extension; ``None`` when it is ready, else why not. A failed
    build is not retried in this process."""
    global _MODULE, _FAILED
    if _MODULE is not None:
        return None
    if _FAILED is not None:
        return _FAILED
    why = _missing_tool()
    if why is not None:
        return why
    with _LOCK:
        if _MODULE is None and _FAILED is None:
            try:
                from torch.utils.cpp_extension import load
                _MODULE = load(name=_name(), sources=[str(src) for src in _SOURCES], extra_cflags=_FLAGS,
                               extra_ldflags=["-fopenmp"], verbose=False)
            except Exception as e:  # noqa: BLE001 -- the reason is reported, the PyTorch path stays
                lines = [ln for ln in str(e).splitlines() if ln.strip()]
                _FAILED = "the C++ build failed: " + (lines[-1] if lines else type(e).__name__)
    return _FAILED


def status(build_now: bool = False) -> str | None:
    """``None`` when the compiled kernels are ready (loaded in this process); otherwise why not -- a
    missing tool, a failed build, or that they are not loaded yet (``build_now`` builds them first)."""
    if _MODULE is not None:
        return None
    if build_now:
        return build()
    why = _FAILED or _missing_tool()
    return why or ("not loaded yet: the first call with backend='cpp' loads it from the cache or builds it "
                   "(about half a minute)")


def auto_enabled() -> bool:
    """Whether ``backend="auto"`` may pick the compiled backend (``FASTATTN_CPP=1``)."""
    return _env() == "1"


def active() -> bool:
    """Whether the linear-attention op should run on the compiled kernels now (inside :func:`use`)."""
    return _ON[0] > 0


@contextlib.contextmanager
def use() -> Iterator[None]:
    """Run the linear-attention op on the compiled kernels inside the block (builds them if needed)."""
    why = build()
    if why is not None:
        raise RuntimeError(f"the compiled backend is unavailable: {why}")
    _ON[0] += 1
    try:
        yield
    finally:
        _ON[0] -= 1


_FWD = ("(Tensor q, Tensor k, Tensor v, Tensor? log_g, Tensor? s0, Tensor? z0, bool causal, bool normalize, "
        "int feature=0) -> (Tensor, Tensor, Tensor, Tensor)")
_BWD = ("(Tensor q, Tensor k, Tensor v, Tensor? log_g, Tensor? s0, Tensor? z0, Tensor out, Tensor den, "
        "Tensor s_n, Tensor z_n, Tensor? dout, Tensor? dden, Tensor? dsn, Tensor? dzn, bool causal, "
        "bool normalize, int feature=0) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")

# Feature maps the kernels apply themselves (a FeatureMap carrying ``fused = name``): the op then takes the
# raw q, k and no feature tensor is materialised (forward or backward).
FUSED_FEATURES = {"elu_plus_one": 1}


def _module():
    if _MODULE is None and build() is not None:
        raise RuntimeError(f"the compiled backend is unavailable: {_FAILED or _missing_tool()}")
    return _MODULE


@torch.library.custom_op("fastattn::linear_attention_cpp", mutates_args=(), schema=_FWD)
def _op(q, k, v, log_g, s0, z0, causal, normalize, feature=0):
    out, den, s_n, z_n = _module().forward(q, k, v, log_g, s0, z0, causal, normalize, feature)
    return out, den, s_n, z_n


@_op.register_fake
def _fake(q, k, v, log_g, s0, z0, causal, normalize, feature=0):
    return fake_forward(q, k, v, log_g, s0, z0, causal, normalize)


@torch.library.custom_op("fastattn::linear_attention_cpp_backward", mutates_args=(), schema=_BWD)
def _op_backward(q, k, v, log_g, s0, z0, out, den, s_n, z_n, dout, dden, dsn, dzn, causal, normalize, feature=0):
    if dout is None:
        dout = torch.zeros_like(out)
    if not normalize:
        dden = dzn = None
    dq, dk, dv, ds0, dz0, dcum = _module().backward(q, k, v, log_g, s0, z0, out, den, s_n, z_n, dout, dden, dsn,
                                                    dzn, causal, normalize, feature)
    if log_g is None or not causal:
        return dq, dk, dv, v.new_empty(0), ds0, dz0
    return dq, dk, dv, log_gate_grad(dcum, log_g, s_n, z_n if normalize else None, dsn, dzn), ds0, dz0


@_op_backward.register_fake
def _fake_backward(q, k, v, log_g, s0, z0, out, den, s_n, z_n, dout, dden, dsn, dzn, causal, normalize, feature=0):
    return fake_backward(q, k, v, log_g, s0, z0, out, den, s_n, z_n, dout, dden, dsn, dzn, causal, normalize)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, log_g, s0, z0, causal, normalize, *feature = inputs
    ctx.save_for_backward(q, k, v, log_g, s0, z0, *output)
    ctx.args = (causal, normalize, *feature)
    ctx.has = (log_g is not None and causal, s0 is not None, z0 is not None and normalize)


def _backward(ctx, dout, dden, dsn, dzn):
    dq, dk, dv, dlog_g, ds0, dz0 = torch.ops.fastattn.linear_attention_cpp_backward(
        *ctx.saved_tensors, dout, dden, dsn, dzn, *ctx.args)
    return (dq, dk, dv, *(g if h else None for g, h in zip((dlog_g, ds0, dz0), ctx.has)), None, None,
            *(None,) * (len(ctx.args) - 2))


_op.register_autograd(_backward, setup_context=_setup_context)


def linear_attention(
    q: Tensor, k: Tensor, v: Tensor, *, phi: FeatureMap | None = None, log_g: Tensor | None = None,
    s0: Tensor | None = None, z0: Tensor | None = None, causal: bool = True, normalize: bool = True,
    chunk: int = 64,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    """:func:`~fastattn.ops.linear.tiled.tiled_linear_attention` on the compiled kernels (same arguments
    and results; ``chunk`` is unused: the causal kernel is a per-token recurrence, the non-causal one
    sums the state over blocks of tokens). A ``phi`` with ``phi.fused`` in :data:`FUSED_FEATURES` is
    applied inside the kernels (forward and backward), so no feature tensor is allocated; another
    ``phi`` is applied first (the features exist in full) for causal calls, while non-causal calls with
    such a ``phi`` run on :func:`tiled_linear_attention` (two matrix products with the feature map
    applied tile by tile; materialised features measured 2x slower,
    ``benchmarks/results/cpp_1thread_cputime.json``). One-token steps run there too (a handful of ops)."""
    feature = FUSED_FEATURES.get(getattr(phi, "fused", None), 0)
    if (causal and q.shape[2] == 1) or (not causal and phi is not None and not feature):
        return tiled_linear_attention(q, k, v, phi=phi, log_g=log_g, s0=s0, z0=z0, causal=causal,
                                      normalize=normalize, chunk=chunk)
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"the causal kernel needs equal query and key lengths, got {q.shape[2]} and {k.shape[2]}")
    if not causal and log_g is not None:
        raise ValueError("gates (decay) need the causal form")
    if phi is not None and not feature:
        q, k = phi(q, True), phi(k, False)
    out, den, s_n, z_n = _op(q, k, v, log_g, s0, z0, causal, normalize, feature)
    return out, (den if normalize else None), s_n, (z_n if normalize else None)
