"""Mixture-of-heads layers (moh, moa) at 25% and 50% of the heads active per token against the standard
multi-head attention layer (``MultiheadAttention`` with the softmax core, same width and heads), forward
and forward+backward, each with the selected-pairs path (``fastattn/mechanisms/gated/base.py``) and with
it switched off (every head computed, unselected pairs zeroed by their gates); switchhead (2 of 4 value /
output experts per head) beside them, with mha's 8 heads of 64 and in the paper's form of fewer heads of
their own width (option ``head_dim``; 4 x 64 and 2 x 128 at the same embed_dim 512). All cases of one
length and mode interleaved in one process (machine load hits them alike), medians.

    python benchmarks/gated_heads.py [--n 4096] [--repeats 5] [--threads 2] [--out benchmarks/results/gated_heads.json]
    python benchmarks/gated_heads.py --render benchmarks/results/gated_heads.json   # the .md beside it, again
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

import torch

from fastattn.bench.measure import Case, build, interleaved_times
from fastattn.mechanisms.gated import base

H, E = 8, 64
# name -> (impl, options, selected path on); an int instead: the number of heads (embed_dim stays H * E)
CASES = {
    "mha": ("mha", {}, True),
    "moh 25% (1 shared + 1 of 7)": ("moh", {"shared_heads": 1, "active_heads": 1}, True),
    "moh 25%, every head computed": ("moh", {"shared_heads": 1, "active_heads": 1}, False),
    "moh 50% (1 shared + 3 of 7)": ("moh", {"shared_heads": 1, "active_heads": 3}, True),
    "moh 50%, every head computed": ("moh", {"shared_heads": 1, "active_heads": 3}, False),
    "moa 25% (2 of 8)": ("moa", {"active_heads": 2}, True),
    "moa 25%, every head computed": ("moa", {"active_heads": 2}, False),
    "moa 50% (4 of 8)": ("moa", {"active_heads": 4}, True),
    "moa 50%, every head computed": ("moa", {"active_heads": 4}, False),
    "switchhead 8 heads x 64 (mha's heads), 2 of 4 experts": ("switchhead", {"experts": 4, "active_experts": 2}, True),
    # the paper's form: few heads, each of its own width (h * head_dim below embed_dim), same embed_dim
    "switchhead 4 heads x 64, 2 of 4 experts": ("switchhead", {"experts": 4, "active_experts": 2, "head_dim": 64}, 4),
    "switchhead 2 heads x 128, 2 of 4 experts": ("switchhead", {"experts": 4, "active_experts": 2, "head_dim": 128}, 2),
}


def render(path: str) -> None:
    """``<path>.md`` from the JSON ``path``: one table per (mode, causal), times and ratios to ``mha``."""
    with open(path) as f:
        res = json.load(f)
    names = {"fwd": "forward", "fwdbwd": "forward+backward"}
    head = (f"Machine: {res['machine']}; torch {res['torch']}, {res['threads']} threads; shape {res['shape']}; "
            f"medians of {res['repeats']} interleaved runs (`times_ms` in the JSON).")
    lines = [f"# {res['what']}", "", head, ""]
    groups: dict[tuple, list] = {}
    for r in res["rows"]:
        groups.setdefault((r["n"], r["mode"], r["causal"]), []).append(r)
    for (n, mode, causal), rows in groups.items():
        lines += [f"## n={n}, {names.get(mode, mode)}, {'causal' if causal else 'non-causal'}", "",
                  "| layer | median ms | speed vs mha |", "|---|---|---|"]
        lines += [f"| {r['case']} | {r['median_ms']:.0f} | {r['vs_mha']:.2f}x |" for r in rows]
        lines.append("")
    with open(os.path.splitext(path)[0] + ".md", "w") as f:
        f.write("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", default="fwd,fwdbwd")
    ap.add_argument("--causal", default="false,true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "gated_heads.json"))
    ap.add_argument("--render", metavar="JSON", help="only write the markdown table of an earlier run")
    a = ap.parse_args()
    if a.render:
        render(a.render)
        return
    rows = []
    for causal in (c.strip() == "true" for c in a.causal.split(",")):
        for mode in a.modes.split(","):
            fns = {}
            for name, (impl, options, selected) in CASES.items():
                heads = H if isinstance(selected, bool) else selected
                case = Case(impl, a.n, h=heads, e=H * E // heads, causal=causal, mode=mode, threads=a.threads,
                            options=options)
                fn, _ = build(case)
                fraction = base.SELECTED_FRACTION if selected else 0.0

                def run(fn=fn, fraction=fraction):
                    base.SELECTED_FRACTION = fraction
                    try:
                        fn()
                    finally:
                        base.SELECTED_FRACTION = 0.8

                fns[name] = run
            times = interleaved_times(fns, a.repeats)
            med = {name: statistics.median(t) for name, t in times.items()}
            for name, t in times.items():
                rows.append({"case": name, "n": a.n, "mode": mode, "causal": causal, "median_ms": med[name] * 1e3,
                             "times_ms": [x * 1e3 for x in t], "vs_mha": med["mha"] / med[name]})
                print(f"n={a.n} {mode:6s} causal={causal!s:5s} {name:32s} {med[name] * 1e3:9.1f} ms  "
                      f"{med['mha'] / med[name]:.2f}x mha", flush=True)
    out = {
        "what": __doc__.split("\n\n")[0].replace("\n", " "),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared with other jobs)",
        "torch": torch.__version__, "threads": a.threads, "shape": {"batch": 1, "heads": H, "head_dim": E,
                                                                    "embed_dim": H * E},
        "repeats": a.repeats, "rows": rows,
    }
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    render(a.out)


if __name__ == "__main__":
    main()
