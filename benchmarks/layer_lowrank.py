"""Layer-level low-rank mechanisms (compressive, luna) beside the softmax layer: forward+backward time
(median) at one length and peak-memory growth between two lengths, as ``fastattn bench`` does not time
layer-level ids.

    python benchmarks/layer_lowrank.py [--time-length 16384] [--memory-lengths 16384,65536] [--repeats 3]
        [--threads 1] [--out benchmarks/results] [--note TEXT]

B=1, D=512, H=8 (E=64), float32, CPU, training mode (compressive then also computes its reconstruction
loss). Cases: the causal layers (softmax = ``MultiheadAttention`` with the SDPA core, compressive -- it is
causal-only --, luna's causal formula) and the non-causal ones (softmax, luna's pack/unpack).

* Time: every case at ``--time-length`` in its own subprocess, one after the other in this one run; the
  median of ``--repeats`` forward+backward calls after a warm-up. Ratios ``x SDPA`` are against the softmax
  layer of the same causality in the same run.
* Memory: every case at every ``--memory-lengths`` in a fresh subprocess running one forward+backward;
  peak RSS (``ru_maxrss``) minus the RSS after building the layer and the input, so the figure is the
  call's own. A case predicted (from its time at the first length: quadratic for softmax, linear
  otherwise) over ``--case-budget`` seconds is skipped with that reason.

Writes ``layer_lowrank.json`` and ``layer_lowrank.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import fastattn
from fastattn.bench.runner import machine_info

# name -> (method, causal)
CASES = {
    "softmax causal": ("softmax", True),
    "compressive causal": ("compressive", True),
    "luna causal": ("luna", True),
    "softmax": ("softmax", False),
    "luna": ("luna", False),
}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _case(name: str, n: int, repeats: int, threads: int) -> dict:
    """``repeats`` = 0: one forward+backward, no warm-up (a memory run)."""
    method, causal = CASES[name]
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    layer = fastattn.MultiheadAttention(512, 8, method, batch_first=True).train()
    x = torch.randn(1, n, 512, requires_grad=True)
    base = _rss_mb()
    times = []
    for _ in range(repeats + 1 if repeats else 1):
        t0 = time.perf_counter()
        out, _ = layer(x, is_causal=causal)
        loss = out.sum() + layer.aux_loss if layer.aux_loss is not None else out.sum()
        loss.backward()
        times.append(time.perf_counter() - t0)
        x.grad = None
        layer.zero_grad(set_to_none=True)
    row = {"case": name, "method": method, "causal": causal, "n": n, "peak_mb": _rss_mb() - base}
    if repeats:
        row["median_s"] = statistics.median(times[1:])
        row["times_s"] = times[1:]
    else:
        row["one_call_s"] = times[0]
    return row


def _run(name: str, n: int, repeats: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--one", name, str(n), "--repeats", str(repeats), "--threads", str(threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode:
        return {"case": name, "n": n, "error": res.stderr[-400:]}
    row = json.loads(res.stdout.strip().splitlines()[-1])
    print(row, flush=True)
    return row


def _markdown(result: dict) -> str:
    tn, (m0, m1) = result["time_length"], result["memory_lengths"]
    timed = {r["case"]: r for r in result["time_rows"]}
    mem = {(r["case"], r["n"]): r for r in result["memory_rows"]}
    lines = [
        "# Layer-level low-rank mechanisms beside the softmax (SDPA) layer, CPU",
        "",
        f"Command: `{result['command']}`  ",
        (f"Machine: {result['machine']['processor']}, {result['machine']['cpu_count']} cores, torch "
         f"{result['torch']}, {result['threads']} torch thread(s); {result['date']}.  "),
        f"Note: {result['note']}",
        "",
        (f"B=1, D=512, H=8 (E=64), float32, training mode (compressive's reconstruction loss included), default "
         f"options. Time: median of {result['repeats']} forward+backward calls after a warm-up at n={tn}, every case "
         f"in its own subprocess, one after the other in this run; `x SDPA` = the softmax layer's time of the same "
         f"causality / this time (above 1: faster). Memory: one forward+backward in a fresh subprocess per case and "
         f"length, peak RSS minus the RSS after building the layer and input."),
        "",
        f"| case | fwd+bwd n={tn} (s) | x SDPA | peak MiB n={m0} | peak MiB n={m1} | growth |",
        "|---|---|---|---|---|---|",
    ]
    for name, (method, causal) in CASES.items():
        t = timed.get(name, {})
        ref = timed.get("softmax causal" if causal else "softmax", {})
        ts = f"{t['median_s']:.2f}" if "median_s" in t else t.get("skipped", t.get("error", "-"))[:60]
        ratio = f"{ref['median_s'] / t['median_s']:.2f}x" if "median_s" in t and "median_s" in ref else "-"
        a, b = mem.get((name, m0), {}), mem.get((name, m1), {})
        fa = f"{a['peak_mb']:.0f}" if "peak_mb" in a else a.get("skipped", a.get("error", "-"))[:60]
        fb = f"{b['peak_mb']:.0f}" if "peak_mb" in b else b.get("skipped", b.get("error", "-"))[:60]
        growth = f"{b['peak_mb'] / a['peak_mb']:.2f}x" if "peak_mb" in a and "peak_mb" in b else "-"
        lines.append(f"| {name} | {ts} | {ratio} | {fa} | {fb} | {growth} |")
    one = [f"{r['case']} n={r['n']}: {r['one_call_s']:.1f} s" for r in result["memory_rows"] if "one_call_s" in r]
    lines += ["", "One-call times of the memory runs (no warm-up; not for comparison): " + "; ".join(one) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--time-length", type=int, default=16384)
    ap.add_argument("--memory-lengths", default="16384,65536")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--case-budget", type=float, default=300.0)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--note", default="")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(_case(args.one[0], int(args.one[1]), args.repeats, args.threads)))
        return
    cases = args.cases.split(",")
    started = time.perf_counter()
    time_rows = [_run(name, args.time_length, args.repeats, args.threads) for name in cases]
    lengths = [int(v) for v in args.memory_lengths.split(",")]
    memory_rows, last = [], {}
    for n in lengths:
        for name in cases:
            if name in last:
                m0, t0 = last[name]
                pred = t0 * (n / m0) ** (2 if CASES[name][0] == "softmax" else 1)
                if pred > args.case_budget:
                    memory_rows.append({"case": name, "n": n,
                                        "skipped": f"predicted {pred:.0f} s > {args.case_budget:g} s"})
                    continue
            row = _run(name, n, 0, args.threads)
            memory_rows.append(row)
            if "one_call_s" in row:
                last[name] = (n, row["one_call_s"])
    result = {
        "command": "python " + " ".join([os.path.relpath(__file__), *sys.argv[1:]]),
        "note": args.note,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info("cpu"), "torch": torch.__version__, "python": platform.python_version(),
        "threads": args.threads, "repeats": args.repeats, "time_length": args.time_length,
        "memory_lengths": lengths, "total_s": time.perf_counter() - started,
        "time_rows": time_rows, "memory_rows": memory_rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "layer_lowrank.json").write_text(json.dumps(result, indent=1))
    (out / "layer_lowrank.md").write_text(_markdown(result))


if __name__ == "__main__":
    main()
