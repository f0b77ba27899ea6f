"""Peak memory (and time) of forward+backward for the exact family against a naive implementation
that materialises the n x n matrix, side by side in one run, each case in a fresh subprocess.

    .venv/bin/python benchmarks/exact_memory.py [--lengths 4096,16384] [--heads 2] [--out bench-out]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from fastattn.bench.measure import Case, peak_memory_mb, time_case

IMPLS = ["naive", "sdpa", "softmax", "memory_efficient", "flash"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lengths", default="4096,16384")
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args()
    rows = []
    for n in map(int, args.lengths.split(",")):
        for impl in IMPLS:
            case = Case(impl, n=n, b=1, h=args.heads, e=64, causal=args.causal, mode="fwdbwd")
            mem = peak_memory_mb(case, timeout_s=1800)
            t = time_case(case, warmup=0, repeats=args.repeats, budget_s=120)["median_s"]
            rows.append({"impl": impl, "n": n, "peak_mb": mem, "seconds": t})
            print(f"n={n:>6} {impl:<17} peak {mem:9.1f} MiB  time {t:7.2f} s", flush=True)
    naive = {r["n"]: r["peak_mb"] for r in rows if r["impl"] == "naive"}
    lines = [
        f"Forward+backward, B=1, H={args.heads}, E=64, fp32, causal={args.causal}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {platform.machine()}, {time.strftime('%Y-%m-%d')}",
        "",
        "| n | implementation | peak MiB | vs naive | time s |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['n']} | {r['impl']} | {r['peak_mb']:.0f} | {r['peak_mb'] / naive[r['n']]:.3f} | {r['seconds']:.2f} |")
    table = "\n".join(lines)
    print("\n" + table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "exact_memory.json").write_text(json.dumps({"config": vars(args), "rows": rows}, indent=1))
    (out / "exact_memory.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
