"""Kernel-family benchmark: fastattn's linear / performer against SDPA and the peer packages, side by
side in one run on identical inputs (CPU, B=1, H=8, E=64, fp32, 2 threads by default).

    python benchmarks/kernel.py [--quick] [--out benchmarks/results/kernel.json]

Prints a markdown table of median times with the speed-up over each baseline and the issue's target,
then the peak-memory growth of forward+backward from n=16384 to n=65536, and writes everything as JSON.
Peers that are not installed (``pip install .[peers]``; see the README for pytorch-fast-transformers)
are reported as unavailable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

from fastattn.bench.measure import Case, peak_memory_mb, time_case
from fastattn.bench.peers import get_peer

# (label, ours, baseline, target speed-up ours vs baseline)
COMPARISONS = [
    ("causal linear fwd+bwd", Case("linear", 16384, causal=True, mode="fwdbwd"),
     Case("peer:fast_transformers.causal_linear", 16384, causal=True, mode="fwdbwd"), 4.0),
    ("causal linear fwd+bwd", Case("linear", 16384, causal=True, mode="fwdbwd"),
     Case("sdpa", 16384, causal=True, mode="fwdbwd"), 30.0),
    ("linear fwd", Case("linear", 16384), Case("peer:fast_transformers.linear", 16384), 3.0),
    ("causal performer-256 fwd+bwd", Case("performer", 4096, causal=True, mode="fwdbwd", options={"num_features": 256}),
     Case("peer:performer_pytorch.causal", 4096, causal=True, mode="fwdbwd", options={"num_features": 256}), 20.0),
    ("performer-256 fwd+bwd", Case("performer", 4096, mode="fwdbwd", options={"num_features": 256}),
     Case("peer:performer_pytorch", 4096, mode="fwdbwd", options={"num_features": 256}), 1.5),
]
MEMORY = [  # (label, case at the small n; the large n is 4x; target ratio)
    ("causal linear fwd+bwd", Case("linear", 16384, causal=True, mode="fwdbwd"), 4.5),
    ("causal performer-256 fwd+bwd", Case("performer", 16384, causal=True, mode="fwdbwd", options={"num_features": 256}), 4.5),
]


def _available(case: Case) -> bool:
    return not case.impl.startswith("peer:") or get_peer(case.impl[5:]).available()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="lengths / 4, one repeat (a smoke run)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--out", default=os.path.join("benchmarks", "results", "kernel.json"))
    args = ap.parse_args(argv)
    div = 4 if args.quick else 1
    repeats = 1 if args.quick else args.repeats
    timed: dict[str, dict] = {}

    def timing(case: Case) -> dict | None:
        case = Case(**{**asdict(case), "n": case.n // div, "threads": args.threads})
        key = case.to_json()
        if key not in timed:
            if not _available(case):
                timed[key] = None
            else:
                print(f"  timing {case.impl} n={case.n} causal={case.causal} {case.mode} ...", file=sys.stderr, flush=True)
                timed[key] = {"case": asdict(case), **time_case(case, repeats=repeats, budget_s=120)}
        return timed[key]

    rows = []
    for label, ours, base, target in COMPARISONS:
        a, b = timing(ours), timing(base)
        speedup = b["median_s"] / a["median_s"] if a and b else None
        rows.append({"comparison": label, "n": ours.n // div, "ours": ours.impl, "baseline": base.impl,
                     "ours_s": a["median_s"] if a else None, "baseline_s": b["median_s"] if b else None,
                     "speedup": speedup, "target": target, "met": None if speedup is None else speedup >= target})
    print("| comparison | n | fastattn | s | baseline | s | speed-up | target | met |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        fmt = lambda x, p=3: "n/a" if x is None else f"{x:.{p}f}"  # noqa: E731
        print(f"| {r['comparison']} | {r['n']} | {r['ours']} | {fmt(r['ours_s'])} | {r['baseline']} | "
              f"{fmt(r['baseline_s'])} | {fmt(r['speedup'], 1)}x | >= {r['target']}x | "
              f"{'n/a (peer missing)' if r['met'] is None else ('yes' if r['met'] else 'NO')} |")

    mem_rows = []
    if not args.no_memory:
        print("\n| peak memory fwd+bwd | n | MiB | 4n | MiB | ratio | target | met |")
        print("|---|---|---|---|---|---|---|---|")
        for label, case, target in MEMORY:
            small = Case(**{**asdict(case), "n": case.n // div, "threads": args.threads})
            large = Case(**{**asdict(small), "n": 4 * small.n})
            print(f"  memory {case.impl} n={small.n},{large.n} ...", file=sys.stderr, flush=True)
            m1, m2 = peak_memory_mb(small), peak_memory_mb(large)
            ratio = m2 / m1 if m1 > 0 else float("inf")
            mem_rows.append({"what": label, "n": small.n, "mb": m1, "n4": large.n, "mb4": m2, "ratio": ratio,
                             "target": target, "met": ratio <= target})
            print(f"| {label} | {small.n} | {m1:.0f} | {large.n} | {m2:.0f} | {ratio:.2f} | <= {target} | "
                  f"{'yes' if ratio <= target else 'NO'} |")

    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"speed": rows, "memory": mem_rows, "timings": [t for t in timed.values() if t]}, f, indent=1)
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
