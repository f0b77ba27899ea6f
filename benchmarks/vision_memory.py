"""Peak memory of forward+backward for every vision mechanism of ``fastattn.Attention2d`` at growing
resolution, beside the non-local block's dense ``HW x HW`` formula (``nonlocal`` computed by its literal
reference), each case in a fresh subprocess (CPU peak resident set size above the process's baseline).

    .venv/bin/python benchmarks/vision_memory.py [--sizes 32,64,128] [--channels 64] [--out bench-out]
        [--cases tensor_lowrank,emanet]   (only these cases; their rows replace theirs in an existing file)

Memory only: no timings (they need a quiet machine).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

CASES = [
    "nonlocal:dense", "nonlocal", "efficient2d", "cbam", "gcnet", "ccnet", "autonl", "tensor_lowrank", "emanet",
    "permutohedral",
]


def _one(case: str, size: int, channels: int) -> float:
    """In this (fresh) process: peak extra MiB of one forward+backward of ``case`` at ``size x size``."""
    import fastattn
    from fastattn.bench.measure import _peak_rss_mb, _reset_peak_rss, rss_mb

    method, _, how = case.partition(":")
    m = fastattn.Attention2d(channels, method)
    run = m.reference if how == "dense" else m

    def step(s: int) -> None:
        x = torch.randn(1, channels, s, s, requires_grad=True)
        run(x).sum().backward()

    step(8)  # libraries and thread pools loaded outside the measurement
    gc.collect()
    if not _reset_peak_rss():
        raise RuntimeError("cannot reset the peak RSS counter (/proc/self/clear_refs)")
    base = rss_mb()
    step(size)
    return max(_peak_rss_mb() - base, 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="32,64,128")
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--cases", help="comma-separated subset of the cases (merged into an existing result file)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: case,size,channels in a fresh process
    args = ap.parse_args()
    if args.one:
        case, size, channels = args.one.split(",")
        print(json.dumps({"peak_mb": _one(case, int(size), int(channels))}))
        return
    torch.set_num_threads(1)
    root = str(Path(__file__).resolve().parent.parent)  # this checkout's fastattn, not an installed one
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    cases = CASES if not args.cases else args.cases.split(",")
    rows = []
    for size in map(int, args.sizes.split(",")):
        for case in cases:
            proc = subprocess.run(
                [sys.executable, __file__, "--one", f"{case},{size},{args.channels}"],
                capture_output=True, text=True, timeout=1800, env=env,
            )
            if proc.returncode != 0:
                rows.append({"case": case, "size": size, "error": proc.stderr[-500:]})
                print(f"{size:>4}x{size:<4} {case:<16} failed: {proc.stderr[-200:]}", flush=True)
                continue
            peak = float(json.loads(proc.stdout.strip().splitlines()[-1])["peak_mb"])
            rows.append({"case": case, "size": size, "peak_mb": peak})
            print(f"{size:>4}x{size:<4} {case:<16} peak {peak:9.1f} MiB", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"channels": args.channels, "batch": 1, "dtype": "float32", "mode": "forward+backward",
            "machine": platform.platform(), "torch": torch.__version__}
    path = out / "vision_memory.json"
    if args.cases and path.exists():  # keep the other cases' rows (memory, unlike time, is not load-dependent)
        old = json.loads(path.read_text())
        if old["meta"]["channels"] == args.channels:
            rows = [r for r in old["rows"] if r["case"] not in cases] + rows
            rows.sort(key=lambda r: (r["size"], CASES.index(r["case"]) if r["case"] in CASES else len(CASES)))
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
