"""Linformer at long lengths: its E/F tables are length-tied (``max_length``), so ``fastattn bench`` skips it
beyond the default 512. Here it is built with ``max_length`` = the longest length measured, and timed
(forward+backward, medians of interleaved repeats) beside SDPA at ``--time-length`` in one process, and its
peak memory measured at each of ``--memory-lengths`` in fresh subprocesses (the bench's own measurement).
B=1, H=8, E=64, float32, CPU, non-causal (linformer has no causal form).

    python benchmarks/linformer_long.py [--time-length 16384] [--memory-lengths 16384,65536] [--repeats 3]
        [--threads 1] [--k 256] [--note TEXT]

Writes benchmarks/results/linformer_long.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, _ROOT)  # this checkout, not an installed fastattn

import torch  # noqa: E402

from fastattn.bench.measure import Case, build, interleaved_times, peak_memory_mb  # noqa: E402
from fastattn.bench.runner import machine_info  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--time-length", type=int, default=16384)
    ap.add_argument("--memory-lengths", default="16384,65536")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--k", type=int, default=256)
    ap.add_argument("--note", default="")
    ap.add_argument("--out", default=os.path.join(_ROOT, "benchmarks", "results", "linformer_long.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    mem_lengths = [int(x) for x in args.memory_lengths.split(",")]
    options = {"k": args.k, "max_length": max(mem_lengths + [args.time_length])}
    n = args.time_length
    cases = {"linformer": Case("linformer", n, mode="fwdbwd", threads=args.threads, options=options),
             "sdpa": Case("sdpa", n, mode="fwdbwd", threads=args.threads)}
    fns = {name: build(c)[0] for name, c in cases.items()}
    times = interleaved_times(fns, args.repeats)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"n={n} fwd+bwd: linformer {med['linformer']:.2f} s, SDPA {med['sdpa']:.2f} s "
          f"({med['sdpa'] / med['linformer']:.2f}x)", flush=True)
    peaks = {m: peak_memory_mb(Case("linformer", m, mode="fwdbwd", threads=args.threads, options=options))
             for m in mem_lengths}
    print("peak MiB: " + ", ".join(f"{m}: {p:.0f}" for m, p in peaks.items()), flush=True)
    growth = peaks[mem_lengths[-1]] / peaks[mem_lengths[0]]
    result = {
        "command": "python " + " ".join(sys.argv), "machine": machine_info("cpu"), "note": args.note,
        "case": {"b": 1, "h": 8, "e": 64, "dtype": "float32", "causal": False, "mode": "fwdbwd", "options": options},
        "time_length": n, "times_s": times, "median_s": med, "speed_vs_sdpa": med["sdpa"] / med["linformer"],
        "peak_mb": {str(m): p for m, p in peaks.items()}, "memory_growth": growth,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"memory growth {mem_lengths[0]} -> {mem_lengths[-1]}: {growth:.2f}x; wrote {args.out}")


if __name__ == "__main__":
    main()
