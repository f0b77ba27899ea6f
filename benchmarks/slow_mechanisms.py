"""Why the slowest sub-quadratic mechanisms are slower than SDPA on CPU: each timed against SDPA in one
process (interleaved, medians), then profiled (torch.profiler: the operators taking the most self time).
Forward+backward at n=4096 for bp_transformer / fastmax / sac; one decoding step after n=1024 cached
tokens for the sparse mechanisms that keep every key (axial, interlaced, jukebox, multiscale,
sparse_transformer). B=1, H=8, E=64, fp32, CPU.

    python benchmarks/slow_mechanisms.py [--n 4096] [--decode-n 1024[,8192]] [--repeats 3] [--only fastmax,...]

Writes benchmarks/results/slow_mechanisms.json (times, ratios, each case's top operators). With
``--only``, the rows of the cases run replace the same cases' rows in an existing file (each row keeps
the command and machine load of the run that made it) and the other rows stay.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, _ROOT)  # this checkout, not an installed fastattn

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from fastattn.bench.measure import Case, build  # noqa: E402

FWDBWD = ["bp_transformer", "fastmax", "sac"]
DECODE = ["axial", "interlaced", "jukebox", "multiscale", "sparse_transformer"]


def _timed(fns: dict, repeats: int, calls: dict) -> dict[str, float]:
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats):
        for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            prep = getattr(fns[k], "prepare", None)
            if prep is not None:
                prep()
            t0 = time.perf_counter()
            fns[k]()
            times[k].append((time.perf_counter() - t0) / calls[k])
    return {k: statistics.median(t) for k, t in times.items()}


def _top_ops(fn, k: int = 6) -> list[tuple[str, float]]:
    prep = getattr(fn, "prepare", None)
    if prep is not None:
        prep()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:k]
    return [(e.key, round(100 * e.self_cpu_time_total / total, 1), e.count) for e in top]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--decode-n", default="1024", help="cached tokens of the decode cases, comma-separated")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated ids (default: all)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "slow_mechanisms.json"))
    a = ap.parse_args()
    only = set(filter(None, a.only.split(",")))
    rows = []
    command = " ".join(["python", "benchmarks/slow_mechanisms.py", *sys.argv[1:]])
    decode_ns = [int(x) for x in str(a.decode_n).split(",") if x]
    cases_run = [(m, "fwdbwd", a.n) for m in FWDBWD] + [(m, "decode", n) for m in DECODE for n in decode_ns]
    for impl, mode, n in cases_run:
        if only and impl not in only:
            continue
        cases = {impl: Case(impl, n, mode=mode, causal=mode == "decode", threads=a.threads),
                 "sdpa": Case("sdpa", n, mode=mode, causal=mode == "decode", threads=a.threads)}
        try:
            fns = {k: build(c)[0] for k, c in cases.items()}
        except Exception as e:  # noqa: BLE001 -- reported, the others go on
            print(f"{impl}: cannot build ({type(e).__name__}: {e})")
            continue
        calls = {k: getattr(f, "calls", 1) for k, f in fns.items()}
        med = _timed(fns, a.repeats, calls)
        ops = _top_ops(fns[impl])
        ratio = med["sdpa"] / med[impl]
        what = "fwd+bwd" if mode == "fwdbwd" else "decode step"
        print(f"{impl:20s} {what:11s} n={n}: {med[impl] * 1e3:9.2f} ms  sdpa {med['sdpa'] * 1e3:9.2f} ms  "
              f"speed vs sdpa {ratio:.2f}x")
        for name, share, count in ops:
            print(f"    {share:5.1f}%  {name} (x{count})")
        rows.append({"impl": impl, "mode": mode, "n": n, "median_s": med, "speed_vs_sdpa": ratio, "top_ops": ops})
    machine = {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
               "threads": a.threads, "load_avg": os.getloadavg()}
    result = {"command": command, "machine": machine, "rows": rows}
    if only and os.path.exists(a.out):  # update these cases' rows, keep the others
        with open(a.out) as f:
            old = json.load(f)
        for r in rows:
            r["command"], r["machine"] = command, machine
        done = {(r["impl"], r["mode"], r["n"]) for r in rows}
        kept = [r for r in old.get("rows", []) if (r["impl"], r["mode"], r["n"]) not in done]
        result = {**old, "rows": kept + rows}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
