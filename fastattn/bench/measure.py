"""Measurement primitives shared by every benchmark: cases, timing medians, isolated peak memory.

A *case* is plain data (a dict), so it can be sent to a fresh subprocess for an isolated peak-memory
reading. ``impl`` names what runs:

* a registry id (``"flash"``, ``"linear"``, ...) -- fastattn's efficient path;
* ``"sdpa"`` -- ``torch.nn.functional.scaled_dot_product_attention`` (the baseline);
* ``"naive"`` -- the textbook formula that materialises the n x n matrix;
* ``"peer:<name>"`` -- an adapter from :mod:`fastattn.bench.peers` (an optional peer package).

Peak memory on CPU is the process's peak resident set (``ru_maxrss``) minus its resident set just
before the measured call, read in a fresh ``python -m fastattn.bench.measure`` subprocess per case;
on CUDA it is the allocator's peak counter.
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

__all__ = ["Case", "build", "time_case", "peak_memory_mb", "rss_mb"]


@dataclass
class Case:
    impl: str
    n: int
    b: int = 1
    h: int = 8
    e: int = 64
    causal: bool = False
    mode: str = "fwd"  # "fwd" | "fwdbwd"
    dtype: str = "float32"
    device: str = "cpu"
    threads: int = 2
    options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

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


def build(case: Case) -> tuple[Callable[[], Any], tuple[torch.Tensor, ...]]:
    """Inputs and a zero-argument function running the case once (forward, or forward+backward)."""
    torch.set_num_threads(case.threads)
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
        from ..registry import get_method

        spec = get_method(case.impl)
        kwargs = {"generator": torch.Generator().manual_seed(case.seed)} if spec.randomized else {}
        mech = spec.cls(spec.make_options(**case.options), head_dim=case.e, num_heads=case.h, **kwargs)
        mech = mech.to(case.device)

        def fwd():
            return mech.run(q, k, v, is_causal=case.causal)

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


def time_case(case: Case, *, warmup: int = 1, repeats: int = 5, budget_s: float = 60.0) -> dict[str, Any]:
    """Median wall time of ``repeats`` runs after ``warmup`` (fewer repeats if over ``budget_s``)."""
    fn, _ = build(case)
    start = time.perf_counter()
    for _ in range(warmup):
        fn()
    _sync(case.device)
    times: list[float] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(case.device)
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    return {"median_s": statistics.median(times), "times_s": times}


def _measure_here(case: Case) -> float:
    fn, _ = build(case)
    if case.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    # Warm up on a small copy of the case first: the first call of a kernel loads libraries and
    # thread pools whose memory is not the mechanism's.
    small, _ = build(Case(**{**asdict(case), "n": min(case.n, 256)}))
    small()
    del small
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


def peak_memory_mb(case: Case, timeout_s: float = 600.0) -> float:
    """Peak extra memory (MiB) of one run of ``case``, measured in a fresh subprocess."""
    proc = subprocess.run(
        [sys.executable, "-m", "fastattn.bench.measure", case.to_json()],
        capture_output=True, text=True, timeout=timeout_s,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory measurement of {case.impl} n={case.n} failed:\n{proc.stderr[-2000:]}")
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["peak_mb"])


if __name__ == "__main__":
    c = Case(**json.loads(sys.argv[1]))
    print(json.dumps({"peak_mb": _measure_here(c)}))
