"""``lightning`` (decayed, unnormalised, with SRMSNorm) against ``linear`` (elu+1 features, normalised),
causal forward+backward, side by side: the two cases interleaved in one process (so machine load hits both
alike), medians. The issue's target: lightning at most 1.5x linear at n=16384 (B=1, H=8, E=64, CPU, fp32).

    python benchmarks/lightning.py [--n 16384] [--repeats 7] [--threads 1] [--out benchmarks/results/lightning.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, _ROOT)  # this checkout, not an installed fastattn

from fastattn.bench.measure import Case, build, interleaved_times

TARGET = 1.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "lightning.json"))
    a = ap.parse_args()
    cases = {name: Case(name, a.n, causal=True, mode="fwdbwd", threads=a.threads) for name in ("linear", "lightning")}
    fns = {name: build(c)[0] for name, c in cases.items()}
    times = interleaved_times(fns, a.repeats)  # warm-up, then interleaved runs in alternating order
    med = {name: statistics.median(t) for name, t in times.items()}
    ratio = med["lightning"] / med["linear"]
    for name in fns:
        print(f"{name:10s} causal fwd+bwd n={a.n}: median {med[name] * 1e3:8.1f} ms  (runs: "
              + ", ".join(f"{t * 1e3:.0f}" for t in times[name]) + ")")
    print(f"lightning / linear = {ratio:.2f} (target <= {TARGET}): {'met' if ratio <= TARGET else 'NOT met'}")
    result = {
        "cases": {name: json.loads(c.to_json()) for name, c in cases.items()},
        "median_s": med, "times_s": times, "ratio": ratio, "target": TARGET, "met": ratio <= TARGET,
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "load_avg": os.getloadavg()},
    }
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
