"""Measurement primitives shared by every benchmark: cases, timing medians, isolated peak memory.

A *case* is plain data (a dict), so it can be sent to a fresh subprocess for an isolated peak-memory
reading. ``impl`` names what runs:

* a registry id (``"flash"``, ``"linear"``, ...) -- fastattn's efficient path;
* ``"sdpa"`` -- ``torch.nn.functional.scaled_dot_product_attention`` (the baseline);
* ``"naive"`` -- the textbook formula that materialises the n x n matrix;
* ``"peer:<name>"`` -- an adapter from :mod:`fastattn.bench.peers` (an optional peer package);
* a layer-level registry id (``"moh"``, ``"mega"``, ...) -- the whole ``fastattn.MultiheadAttention`` layer
  of width ``D = h * e`` on an input ``x (b, n, D)`` (projections included; a layer with a fixed number of
  heads, mega, gets that number), timed beside ``"mha"``: the standard ``MultiheadAttention`` layer with
  the softmax core, same width and heads (the baseline of layer rows).

``mode`` is ``"fwd"`` (forward), ``"fwdbwd"`` (forward and backward) or ``"decode"``: the time of one
decoding step, measured as a loop of ``decode_steps`` consecutive steps ending at token ``n`` (the last
step attends to ``n`` keys), divided by the number of steps. The loop goes through the decoding state
as generation does: ``Mechanism.step`` feeding each step the state the previous one returned (for
softmax-family mechanisms a :class:`~fastattn.core.base.KVCache` that appends in place into spare
capacity), and for the ``sdpa`` / ``naive`` baselines a preallocated key/value buffer written in place.
Building the prefix's state (and the one copy of it into a buffer with spare capacity that the first
step of a stream makes) happens before the timed loop, in the function's ``prepare``.

Peak memory on CPU is the process's peak resident set (``VmHWM``, reset before the call) minus its
resident set just before the measured call, read in a fresh ``python -m fastattn.bench.measure``
subprocess: one per case (:func:`peak_memory_mb`) or one per batch of cases (:func:`peak_memory_batch`,
with glibc told to return freed blocks at once so that earlier cases do not hide later ones).
On CUDA it is the allocator's peak counter, reset before each case.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

__all__ = [
    "Case", "build", "interleaved_times", "is_layer", "make_layer", "make_mechanism", "time_case", "peak_memory_mb",
    "peak_memory_batch", "rss_mb", "cpu_peak_mb", "cuda_peak_mb", "causal_only",
]


@dataclass
class Case:
    impl: str
    n: int
    b: int = 1
    h: int = 8
    e: int = 64
    causal: bool = False
    mode: str = "fwd"  # "fwd" | "fwdbwd" | "decode"
    dtype: str = "float32"
    device: str = "cpu"
    threads: int = 2
    options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    decode_steps: int = 16  # mode "decode": steps timed in one loop (the reported time is per step)
    backend: str = "auto"  # registry-id cases: the backend that computes them ("torch", "cpp", ...)

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def rss_mb() -> float:
    """Current resident set size in MiB (Linux)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _naive(q, k, v, causal: bool, scale: float):
    s = (q @ k.transpose(-1, -2)) * scale
    if causal:
        n = q.shape[2]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def is_layer(impl: str) -> bool:
    """True for the cases that time a whole ``MultiheadAttention`` layer: ``"mha"`` and layer-level ids."""
    if impl == "mha":
        return True
    if impl in ("sdpa", "naive") or impl.startswith("peer:"):
        return False
    from ..registry import get_method

    return get_method(impl).level == "layer"


def make_layer(case: Case):
    """The ``MultiheadAttention`` layer of a layer case (``"mha"``: the softmax layer) and its width."""
    from ..layers import MultiheadAttention
    from ..registry import get_method

    method = "softmax" if case.impl == "mha" else case.impl
    spec = get_method(method)
    heads = getattr(spec.cls, "fixed_heads", None) or case.h
    torch.manual_seed(case.seed)
    kwargs = {"generator": torch.Generator().manual_seed(case.seed)} if spec.randomized else {}
    width = case.h * case.e
    layer = MultiheadAttention(width, heads, method, batch_first=True, **case.options, **kwargs)
    return layer.to(case.device, getattr(torch, case.dtype)).eval(), width


_CAUSAL_ONLY: dict[tuple[str, str], bool] = {}


def causal_only(impl: str, options: dict | None = None) -> bool:
    """True for a layer-level id that, with these options, has only a causal form (``requires_causal``:
    compressive, intra, gated rfa): the bench skips its non-causal cases and bidirectional tasks."""
    from ..layers import MultiheadAttention
    from ..registry import get_method

    if impl in ("sdpa", "naive", "mha") or impl.startswith("peer:"):
        return False
    key = (impl, repr(sorted((options or {}).items())))
    if key not in _CAUSAL_ONLY:
        spec = get_method(impl)
        if spec.level != "layer":
            _CAUSAL_ONLY[key] = False
        else:  # a tiny instance: the property may depend on the options
            heads = getattr(spec.cls, "fixed_heads", None) or 2
            kw = {"generator": torch.Generator().manual_seed(0)} if spec.randomized else {}
            layer = MultiheadAttention(8 * heads, heads, impl, batch_first=True, **(options or {}), **kw)
            _CAUSAL_ONLY[key] = bool(layer.mechanism.requires_causal)
    return _CAUSAL_ONLY[key]


def _build_layer(case: Case) -> tuple[Callable[[], Any], tuple[torch.Tensor, ...]]:
    """A layer case: forward (and backward into the input and every parameter), or a loop of decoding
    steps through ``layer.step`` as :func:`_build_decode` does for mechanisms."""
    layer, width = make_layer(case)
    dtype = getattr(torch, case.dtype)
    g = torch.Generator(device="cpu").manual_seed(case.seed)
    x = torch.randn(case.b, case.n, width, generator=g).to(case.device, dtype)
    if case.mode == "decode":
        s = max(1, min(case.decode_steps, (case.n - 1) // 2))
        first = case.n - s - 1
        ctx: dict[str, Any] = {}

        def prepare() -> None:
            with torch.no_grad():
                _, state = layer.step(x[:, :first], None)
                ctx["state"] = layer.step(x[:, first:first + 1], state)[1]
            ctx["ready"] = True

        def run() -> Any:
            if not ctx.pop("ready", False):
                prepare()
                ctx.pop("ready")
            state, out = ctx.pop("state"), None
            with torch.no_grad():
                for t in range(first + 1, case.n):
                    out, state = layer.step(x[:, t:t + 1], state)
            return out

        run.prepare = prepare  # type: ignore[attr-defined]
        run.calls = s  # type: ignore[attr-defined]
        return run, (x,)
    if case.mode == "fwd":
        def fwd_only() -> Any:
            with torch.no_grad():
                return layer(x, is_causal=case.causal)[0]
        return fwd_only, (x,)
    x.requires_grad_(True)
    params = [p for p in layer.parameters() if p.requires_grad]

    def fwd_bwd() -> None:
        out = layer(x, is_causal=case.causal)[0]
        out.backward(torch.ones_like(out))
        for t in (x, *params):
            t.grad = None

    return fwd_bwd, (x,)


def make_mechanism(case: Case):
    """The fastattn mechanism module of a registry-id case: its options, default initialisation and, for
    randomised mechanisms, a generator seeded with ``case.seed`` (peer adapters that must share random
    features or projections build the same module and copy them)."""
    from ..registry import get_method

    spec = get_method(case.impl)
    kwargs = {"generator": torch.Generator().manual_seed(case.seed)} if spec.randomized else {}
    mech = spec.cls(spec.make_options(**case.options), head_dim=case.e, num_heads=case.h, **kwargs)
    return mech.to(case.device, getattr(torch, case.dtype)).eval()


def _build_decode(case: Case) -> tuple[Callable[[], Any], tuple[torch.Tensor, ...]]:
    """A loop of ``s`` decoding steps ending at token ``n`` (see the module docstring). The returned
    function has ``prepare()`` (untimed: the state before the loop) and ``calls`` (= ``s``, so a
    timing divides by it); called without ``prepare`` it prepares itself."""
    if case.n < 3:
        raise ValueError("decode cases need n >= 3 (a prefix, one untimed step and the timed steps)")
    s = max(1, min(case.decode_steps, (case.n - 1) // 2))
    dtype = getattr(torch, case.dtype)
    g = torch.Generator(device="cpu").manual_seed(case.seed)
    q, k, v = (torch.randn(case.b, case.h, case.n, case.e, generator=g).to(case.device, dtype) for _ in range(3))
    scale = case.e ** -0.5
    first = case.n - s - 1  # token index of the untimed step that opens the stream; the loop is first+1..n-1
    ctx: dict[str, Any] = {}
    if case.impl in ("sdpa", "naive"):
        kbuf, vbuf = torch.empty_like(k), torch.empty_like(v)
        kbuf[:, :, :first], vbuf[:, :, :first] = k[:, :, :first], v[:, :, :first]

        def one(t: int) -> torch.Tensor:
            kbuf[:, :, t:t + 1], vbuf[:, :, t:t + 1] = k[:, :, t:t + 1], v[:, :, t:t + 1]
            kk, vv, qq = kbuf[:, :, :t + 1], vbuf[:, :, :t + 1], q[:, :, t:t + 1]
            if case.impl == "naive":
                return _naive(qq, kk, vv, False, scale)
            return torch.nn.functional.scaled_dot_product_attention(qq, kk, vv)

        def prepare() -> None:
            with torch.no_grad():
                one(first)
            ctx["ready"] = True

        def loop() -> Any:
            out = None
            for t in range(first + 1, case.n):
                out = one(t)
            return out
    elif case.impl.startswith("peer:"):
        raise ValueError("peer adapters are timed on forward passes only")
    else:
        mech = make_mechanism(case)
        if not mech.spec.decoding:
            raise ValueError(f"method {case.impl!r} does not support incremental decoding")
        from ..core.dispatch import Call, choose_backend

        chosen = choose_backend(case.backend, mech.spec, Call(device=q.device, dtype=q.dtype, decoding=True))
        with torch.no_grad(), chosen.context():
            _, prefix = mech.step(q[:, :, :first], k[:, :, :first], v[:, :, :first], None, scale)

        def prepare() -> None:
            with torch.no_grad(), chosen.context():
                sl = slice(first, first + 1)
                ctx["state"] = mech.step(q[:, :, sl], k[:, :, sl], v[:, :, sl], prefix, scale)[1]
            ctx["ready"] = True

        def loop() -> Any:
            state, out = ctx.pop("state"), None
            with chosen.context():
                for t in range(first + 1, case.n):
                    sl = slice(t, t + 1)
                    out, state = mech.step(q[:, :, sl], k[:, :, sl], v[:, :, sl], state, scale)
            return out

    def run() -> Any:
        if not ctx.pop("ready", False):
            prepare()
            ctx.pop("ready")
        with torch.no_grad():
            return loop()

    run.prepare = prepare  # type: ignore[attr-defined]
    run.calls = s  # type: ignore[attr-defined]
    return run, (q, k, v)


def build(case: Case) -> tuple[Callable[[], Any], tuple[torch.Tensor, ...]]:
    """Inputs and a zero-argument function running the case once (forward, or forward+backward)."""
    torch.set_num_threads(case.threads)
    if case.mode not in ("fwd", "fwdbwd", "decode"):
        raise ValueError(f"unknown mode {case.mode!r}; use fwd, fwdbwd or decode")
    if is_layer(case.impl):
        return _build_layer(case)
    if case.mode == "decode":
        return _build_decode(case)
    dtype = getattr(torch, case.dtype)
    g = torch.Generator(device="cpu").manual_seed(case.seed)
    grad = case.mode == "fwdbwd"
    shape = (case.b, case.h, case.n, case.e)
    q, k, v = (torch.randn(shape, generator=g).to(case.device, dtype).requires_grad_(grad) for _ in range(3))
    scale = case.e ** -0.5

    if case.impl == "naive":
        def fwd():
            return _naive(q, k, v, case.causal, scale)
    elif case.impl == "sdpa":
        def fwd():
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=case.causal)
    elif case.impl.startswith("peer:"):
        from .peers import get_peer

        fwd = get_peer(case.impl[5:]).build(q, k, v, case)
    else:
        mech = make_mechanism(case)

        def fwd():
            return mech.run(q, k, v, is_causal=case.causal, backend=case.backend)

    if not grad:
        def run():
            with torch.no_grad():
                return fwd()
        return run, (q, k, v)

    def run_bwd():
        out = fwd()
        out.backward(torch.ones_like(out))
        for t in (q, k, v):
            t.grad = None
        return None

    return run_bwd, (q, k, v)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_case(
    case: Case, *, warmup: int = 1, repeats: int = 5, budget_s: float = 60.0, fn: Callable[[], Any] | None = None
) -> dict[str, Any]:
    """Median wall time of ``repeats`` runs after ``warmup`` (fewer repeats if over ``budget_s``; at
    least one timed run always happens). ``fn``: the case already built by :func:`build`. Where ``fn``
    has ``prepare`` it is called, untimed, before every run; where it has ``calls`` (a loop of that
    many decoding steps), each time is divided by it."""
    if fn is None:
        fn, _ = build(case)
    prepare = getattr(fn, "prepare", None)
    calls = getattr(fn, "calls", 1)
    start = time.perf_counter()
    for _ in range(warmup):
        if prepare is not None:
            prepare()
        fn()
        if time.perf_counter() - start > budget_s:
            break
    _sync(case.device)
    times: list[float] = []
    for _ in range(repeats):
        if prepare is not None:
            prepare()
            _sync(case.device)
        t0 = time.perf_counter()
        fn()
        _sync(case.device)
        times.append((time.perf_counter() - t0) / calls)
        if time.perf_counter() - start > budget_s:
            break
    return {"median_s": statistics.median(times), "times_s": times}


def interleaved_times(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Wall times (s) of ``repeats`` runs of every function after one warm-up run each, the functions
    interleaved and their order alternated from one repeat to the next, so that load on a shared machine
    hits them alike (the side-by-side comparisons of ``benchmarks/``)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def cuda_peak_mb(fn: Callable[[], Any]) -> float:
    """Peak CUDA memory (MiB) allocated by one call of ``fn`` above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _measure_here(case: Case) -> float:
    fn, _ = build(case)
    if case.device.startswith("cuda"):
        return cuda_peak_mb(fn)
    # Warm up on a small copy of the case first: the first call of a kernel loads libraries and
    # thread pools whose memory is not the mechanism's.
    small, _ = build(Case(**{**asdict(case), "n": min(case.n, 256)}))
    small()
    del small
    return cpu_peak_mb(fn)


def cpu_peak_mb(fn: Callable[[], Any]) -> float:
    """Peak resident memory (MiB) of one call of ``fn`` above the resident memory before it (the kernel's
    peak-RSS counter, reset first; without that, only meaningful in a fresh process)."""
    gc.collect()
    reset = _reset_peak_rss()
    base = rss_mb()
    fn()
    peak = _peak_rss_mb() if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return max(peak - base, 0.0)


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure_in_process(case: Case) -> float:
    """Peak extra memory (MiB) of one run of ``case`` in this process: exact on CUDA (the allocator's
    peak counter); on CPU only meaningful in a fresh process (see :func:`peak_memory_batch`)."""
    return _measure_here(case)


def peak_memory_batch(cases: list[Case], timeout_s: float = 600.0) -> list[float | str]:
    """Peak extra memory (MiB) of each case, all measured in ONE fresh subprocess, in order.

    glibc is told (``MALLOC_MMAP_THRESHOLD_``) to serve large blocks with ``mmap`` so that they go back
    to the system when freed and an earlier case's memory cannot be reused silently by a later one.
    An entry is a string (the error) where that case failed; a timeout fails the cases not yet done.
    """
    if not cases:
        return []
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    payload = json.dumps([asdict(c) for c in cases])
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "fastattn.bench.measure", "--batch"], input=payload,
            capture_output=True, text=True, timeout=timeout_s, env=env,
        )
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err, rc = f"timed out after {timeout_s:.0f} s", -1
    results: list[float | str] = []
    for line in out.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            results.append(row["peak_mb"] if "peak_mb" in row else row["error"])
    reason = err.strip().splitlines()[-1] if err.strip() else f"exit status {rc}"
    while len(results) < len(cases):
        results.append(f"measurement process failed: {reason}")
    return results


def peak_memory_mb(case: Case, timeout_s: float = 600.0) -> float:
    """Peak extra memory (MiB) of one run of ``case``, measured in a fresh subprocess."""
    proc = subprocess.run(
        [sys.executable, "-m", "fastattn.bench.measure", case.to_json()],
        capture_output=True, text=True, timeout=timeout_s,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory measurement of {case.impl} n={case.n} failed:\n{proc.stderr[-2000:]}")
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["peak_mb"])


def _main() -> None:
    if sys.argv[1:] == ["--batch"]:
        for row in json.loads(sys.stdin.read()):
            try:
                line = {"peak_mb": _measure_here(Case(**row))}
            except Exception as exc:  # recorded, the next case still runs
                line = {"error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(line), flush=True)
            gc.collect()
        return
    c = Case(**json.loads(sys.argv[1]))
    print(json.dumps({"peak_mb": _measure_here(c)}))


if __name__ == "__main__":
    _main()
