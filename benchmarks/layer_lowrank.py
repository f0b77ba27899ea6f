"""Layer-level low-rank mechanisms (compressive, luna) beside the softmax layer: forward+backward time
(median) and peak memory, as ``fastattn bench`` does not time layer-level ids.

    python benchmarks/layer_lowrank.py [--lengths 16384,65536] [--repeats 3] [--out benchmarks/results]

B=1, D=512, H=8 (E=64), float32, CPU, causal, training mode (compressive then also computes its reconstruction
loss; it is causal-only; the softmax layer runs SDPA). Each
case runs in its own subprocess so that its peak RSS (``ru_maxrss`` minus the baseline after building the
inputs) is its own. Writes ``layer_lowrank.json``; cases predicted over ``--case-budget`` seconds are
skipped from the previous length's time (quadratic for softmax, linear otherwise).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import fastattn

METHODS = {"softmax": {}, "compressive": {}, "luna": {}}


def _case(method: str, n: int, repeats: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    layer = fastattn.MultiheadAttention(512, 8, method, batch_first=True, **METHODS[method])
    x = torch.randn(1, n, 512, requires_grad=True)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        out, _ = layer(x, is_causal=True)
        out.sum().backward()
        times.append(time.perf_counter() - t0)
        x.grad = None
        layer.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    return {"method": method, "n": n, "median_s": statistics.median(times[1:]), "peak_mb": peak}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="16384,65536")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--case-budget", type=float, default=120.0)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(_case(args.one[0], int(args.one[1]), args.repeats, args.threads)))
        return
    rows, last = [], {}
    for n in [int(x) for x in args.lengths.split(",")]:
        for method in METHODS:
            if method in last:
                m0, t0 = last[method]
                pred = t0 * (n / m0) ** (2 if method == "softmax" else 1)
                if pred > args.case_budget:
                    rows.append({"method": method, "n": n, "skipped": f"predicted {pred:.0f} s > {args.case_budget:g} s"})
                    continue
            cmd = [sys.executable, __file__, "--one", method, str(n), "--repeats", str(args.repeats),
                   "--threads", str(args.threads)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode:
                rows.append({"method": method, "n": n, "error": res.stderr[-400:]})
                continue
            row = json.loads(res.stdout.strip().splitlines()[-1])
            rows.append(row)
            last[method] = (n, row["median_s"])
            print(row, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "layer_lowrank.json").write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
