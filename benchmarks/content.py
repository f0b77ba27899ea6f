"""Content-based selection family on CPU: forward+backward time beside SDPA in one run, and isolated peak
memory from 16384 to 65536 tokens.

    python benchmarks/content.py [--lengths 4096,16384] [--memory-lengths 16384,65536] [--threads 2]

B=1, H=8, E=64, fp32, non-causal, default options (sinkhorn: max_length=65536); medians of ``--repeats`` runs after a
warm-up, the cases of one length one after the other (SDPA first), so ratios within a length are the
meaningful numbers on a shared machine (use ``--threads 1`` there: OpenMP threads oversubscribed by other
jobs slow the many small ops of these mechanisms far more than SDPA's one kernel). Peak memory: each case in a fresh subprocess
(:func:`fastattn.bench.measure.peak_memory_mb`). Writes ``benchmarks/results/content_cpu.json`` and
``.md`` (``--out`` to change the stem).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch

from fastattn.bench.measure import Case, peak_memory_mb, time_case

TIMED = ("sdpa", "reformer", "routing", "clustered", "sinkhorn", "scram")
MEMORY = ("reformer", "routing", "clustered", "sinkhorn", "scram")
OPTIONS = {"sinkhorn": {"max_length": 65536}}  # the SortNet's width must cover the longest length


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="4096,16384")
    ap.add_argument("--memory-lengths", default="16384,65536")
    ap.add_argument("--methods", default=",".join(TIMED))
    ap.add_argument("--memory-methods", default=",".join(MEMORY))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "content_cpu"))
    a = ap.parse_args()
    methods = a.methods.split(",")
    lengths = [int(x) for x in a.lengths.split(",") if x]
    mem_lengths = [int(x) for x in a.memory_lengths.split(",") if x]
    rows: list[dict] = []
    for n in lengths:
        for m in methods:
            case = Case(m, n, mode="fwdbwd", threads=a.threads, options=OPTIONS.get(m, {}))
            r = time_case(case, warmup=1, repeats=a.repeats, budget_s=600.0)
            rows.append({"method": m, "n": n, "fwdbwd_s": r["median_s"], "times_s": r["times_s"]})
            print(f"time {m} n={n}: {r['median_s']:.3f} s", flush=True)
    mem: list[dict] = []
    for n in mem_lengths:
        for m in a.memory_methods.split(","):
            mb = peak_memory_mb(Case(m, n, mode="fwdbwd", threads=a.threads, options=OPTIONS.get(m, {})),
                                timeout_s=1800)
            mem.append({"method": m, "n": n, "peak_mib": mb})
            print(f"memory {m} n={n}: {mb:.0f} MiB", flush=True)
    meta = {"torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "threads": a.threads,
            "cores": os.cpu_count(), "note": "shared machine: other jobs ran beside this one; the cases of one "
            "length ran one after the other in one run"}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out + ".json").write_text(json.dumps({"meta": meta, "time": rows, "memory": mem}, indent=1))
    lines = ["# Content-based selection on CPU (B=1, H=8, E=64, fp32, forward+backward)", "",
             f"torch {meta['torch']}, {a.threads} threads; {meta['note']}.", "",
             "| method | " + " | ".join(f"n={n}: s (x SDPA)" for n in lengths) + " |",
             "|---|" + "---|" * len(lengths)]
    sdpa = {r["n"]: r["fwdbwd_s"] for r in rows if r["method"] == "sdpa"}
    for m in methods:
        cells = []
        for n in lengths:
            t = next(r["fwdbwd_s"] for r in rows if r["method"] == m and r["n"] == n)
            cells.append(f"{t:.2f} ({t / sdpa[n]:.2f}x)" if n in sdpa else f"{t:.2f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if mem:
        lines += ["", "| method | " + " | ".join(f"peak MiB n={n}" for n in mem_lengths) + " | growth |",
                  "|---|" + "---|" * (len(mem_lengths) + 1)]
        for m in a.memory_methods.split(","):
            vals = [next(r["peak_mib"] for r in mem if r["method"] == m and r["n"] == n) for n in mem_lengths]
            growth = f"{vals[-1] / vals[0]:.2f}x" if len(vals) > 1 and vals[0] > 0 else "-"
            lines.append(f"| {m} | " + " | ".join(f"{v:.0f}" for v in vals) + f" | {growth} |")
    Path(a.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
