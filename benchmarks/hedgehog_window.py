"""Hedgehog with a softmax window (LoLCATs, ``window=64``) against plain hedgehog and SDPA: causal
forward+backward time as the length grows 4x (CPU, B=1, H=8, E=64, fp32), side by side in one run.

    python benchmarks/hedgehog_window.py [--quick] [--out benchmarks/results/hedgehog_window.json]

The hybrid costs O(n w d + n d^2): its time should grow about 4x from n to 4n, like plain hedgehog's,
while SDPA's grows about 16x.
"""

from __future__ import annotations

import argparse
import json
import os

from fastattn.bench.measure import Case, time_case

IMPLS = [("hedgehog", {}), ("hedgehog", {"window": 64}), ("sdpa", {})]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="n = 512 and 2048, one repeat (a smoke run)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join("benchmarks", "results", "hedgehog_window.json"))
    args = ap.parse_args(argv)
    lengths = (512, 2048) if args.quick else (2048, 8192)
    repeats = 1 if args.quick else args.repeats
    rows = []
    print("| impl | options | " + " | ".join(f"n={n} (ms)" for n in lengths) + " | growth |")
    print("|---|---|" + "---|" * len(lengths) + "---|")
    for impl, options in IMPLS:
        ms = []
        for n in lengths:
            case = Case(impl, n, causal=True, mode="fwdbwd", threads=args.threads, options=options)
            ms.append(time_case(case, repeats=repeats)["median_s"] * 1e3)
        growth = ms[-1] / ms[0]
        rows.append({"impl": impl, "options": options, "lengths": list(lengths), "median_ms": ms, "growth": growth})
        print(f"| {impl} | {options or '-'} | " + " | ".join(f"{t:.1f}" for t in ms) + f" | {growth:.1f}x |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"threads": args.threads, "repeats": repeats, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
