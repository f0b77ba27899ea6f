"""Sparse family benchmark: speed and peak memory of the block-sparse engine against its peers.

Side by side on identical inputs (CPU, B=1, H=8, E=64, fp32, 2 threads by default):

* ``local`` (window 256) forward+backward at n = 16384 and 65536 against lucidrains' ``local-attention``
  (``peer:local_attention``, same window, same output) -- time, peak memory and the memory growth
  ``memory(65536) / memory(16384)`` (linear would be 4);
* ``longformer`` and ``bigbird`` forward+backward at n = 16384 against SDPA given the same pattern as a
  dense boolean mask (``peer:masked_sdpa``);
* ``sac`` (16 learned edges per node) at n = 4096 and 16384 beside dense SDPA (its growth in memory).

Usage: ``python benchmarks/sparse.py [--quick] [--json out.json] [--mode fwdbwd|fwd] [--only TITLE]``.
Prints a markdown table to stdout and writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch

from fastattn.bench.measure import Case, peak_memory_mb, time_case
from fastattn.bench.peers import get_peer

LONGFORMER = {"window": 256, "global_tokens": (0, 1, 2, 3, 4, 5, 6, 7)}
BIGBIRD = {"block": 64, "window_blocks": 3, "global_blocks": 2, "random_blocks": 3}


def cases(quick: bool, mode: str) -> list[tuple[str, list[Case]]]:
    """Groups of cases compared with each other (the first of each group is fastattn's)."""
    big = 4096 if quick else 65536
    mid = 2048 if quick else 16384
    groups = []
    for n in (mid, big):
        groups.append((f"local w=256 n={n}", [
            Case("local", n, mode=mode, options={"window": 256}),
            Case("peer:local_attention", n, mode=mode, options={"window": 256}),
        ]))
    groups.append((f"longformer w=256 g=8 n={mid}", [
        Case("longformer", mid, mode=mode, options=LONGFORMER),
        Case("peer:masked_sdpa", mid, mode=mode, options={"method": "longformer", **LONGFORMER}),
    ]))
    groups.append((f"bigbird b=64 w=3 g=2 r=3 n={mid}", [
        Case("bigbird", mid, mode=mode, options=BIGBIRD),
        Case("peer:masked_sdpa", mid, mode=mode, options={"method": "bigbird", **BIGBIRD}),
    ]))
    for n in (mid // 4, mid):
        groups.append((f"sac K=16 n={n}", [
            Case("sac", n, mode=mode, options={"edges": 16}),
            Case("sdpa", n, mode=mode),
        ]))
    return groups


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    ap.add_argument("--mode", default="fwdbwd", choices=["fwd", "fwdbwd"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default="sparse_bench.json")
    ap.add_argument("--only", default="", help="run only the comparisons whose title contains this")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    rows = []
    for title, group in cases(args.quick, args.mode):
        if args.only not in title:
            continue
        for c in group:
            if c.impl.startswith("peer:") and not get_peer(c.impl[5:]).available():
                rows.append({"group": title, "impl": c.impl, "n": c.n, "error": "not installed"})
                print(f"[skip] {title}: {c.impl} not installed", file=sys.stderr)
                continue
            print(f"[run] {title}: {c.impl}", file=sys.stderr, flush=True)
            try:
                t = time_case(c, warmup=1, repeats=args.repeats, budget_s=120)
                mem = peak_memory_mb(c, timeout_s=900)
                rows.append({"group": title, "impl": c.impl, "n": c.n, "mode": c.mode,
                             "median_s": t["median_s"], "times_s": t["times_s"], "peak_mb": mem})
            except Exception as exc:  # an out-of-memory peer is a result, not a crash
                rows.append({"group": title, "impl": c.impl, "n": c.n, "error": repr(exc)[:300]})
                print(f"[fail] {title}: {c.impl}: {exc!r}"[:400], file=sys.stderr)
    print(table(rows))
    ratio = memory_ratio(rows)
    if ratio is not None:
        print(f"\n`local` peak memory growth n={ratio[1]} / n={ratio[0]}: {ratio[2]:.2f}x (linear = {ratio[1] / ratio[0]:.0f}x)")
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor(),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv}
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"\nwrote {args.json}", file=sys.stderr)
    return 0


def table(rows: list[dict]) -> str:
    out = ["| comparison | impl | n | time (s) | peak memory (MiB) | time vs fastattn | memory vs fastattn |",
           "|---|---|---|---|---|---|---|"]
    base: dict[str, dict] = {}
    for r in rows:
        if "error" in r:
            out.append(f"| {r['group']} | {r['impl']} | {r['n']} | - | - | {r['error'][:60]} | |")
            continue
        ref = base.setdefault(r["group"], r)
        rt = r["median_s"] / ref["median_s"]
        rm = r["peak_mb"] / max(ref["peak_mb"], 1e-9)
        out.append(f"| {r['group']} | {r['impl']} | {r['n']} | {r['median_s']:.3f} | {r['peak_mb']:.0f} | "
                   f"{rt:.2f}x | {rm:.2f}x |")
    return "\n".join(out)


def memory_ratio(rows: list[dict]) -> tuple[int, int, float] | None:
    local = sorted((r for r in rows if r["impl"] == "local" and "error" not in r), key=lambda r: r["n"])
    if len(local) < 2:
        return None
    return local[0]["n"], local[-1]["n"], local[-1]["peak_mb"] / max(local[0]["peak_mb"], 1e-9)


if __name__ == "__main__":
    raise SystemExit(main())
