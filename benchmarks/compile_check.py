"""Does each mechanism of a family compile with ``torch.compile(fullgraph=True)``, forward and backward,
and agree with eager? One process, one case per (mechanism, causal); prints a table, writes JSON.

    python benchmarks/compile_check.py --family kernel [--backend aot_eager|inductor|eager]
        [--entry module|functional] [--only linear,performer] [--out benchmarks/results/compile_kernel.json]

``--entry module`` compiles ``mech.run(q, k, v, ...)`` of a module built outside the compiled region (how
a model uses a mechanism); ``--entry functional`` compiles ``fastattn.attention(q, k, v, method=m)``. On
failure the graph breaks are counted with ``torch._dynamo.explain`` and the first reasons are printed.
To add a family, nothing is needed beyond ``--family <name>`` (mechanisms are listed by
``spec.family``); extra per-mechanism cases go in ``EXTRA`` below.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "tests")]  # this checkout, not an installed fastattn

from helpers import make_mech

import fastattn

# extra (label, mechanism, options) cases per family: forms the test options do not reach
EXTRA = {
    "kernel": [("rfa gated", "rfa", {"gate": True})],
}


def _cases(family: str, only: list[str] | None) -> list[tuple[str, str, dict]]:
    specs = [s for s in fastattn.methods() if s.family == family and s.kind == "sequence"]
    cases = [(s.name, s.name, {}) for s in specs] + EXTRA.get(family, [])
    return [c for c in cases if only is None or c[1] in only]


def _check(name: str, options: dict, causal: bool, backend: str, entry: str) -> dict:
    spec = fastattn.get_method(name)
    mech = make_mech(spec, h=4, hkv=2, e=16, **options)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 37, 16, generator=g, requires_grad=True)
    k = torch.randn(2, 2, 37, 16, generator=g, requires_grad=True)
    v = torch.randn(2, 2, 37, 8, generator=g, requires_grad=True)

    if entry == "module":
        def fn(q, k, v):
            return mech.run(q, k, v, is_causal=causal)
    else:
        def fn(q, k, v):
            return fastattn.attention(q, k, v, method=name, is_causal=causal, **{**spec.cls.test_options, **options})

    ref = fn(q, k, v)  # eager, also loads the registry entry outside the compiled region
    ref_g = torch.autograd.grad(ref.sum(), (q, k, v), allow_unused=True)
    row = {"mechanism": name, "options": options, "causal": causal, "backend": backend, "entry": entry}
    t0 = time.perf_counter()
    try:
        torch._dynamo.reset()
        out = torch.compile(fn, fullgraph=True, backend=backend)(q, k, v)
        grads = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
        err = max([(out - ref).abs().max().item()] + [(a - b).abs().max().item() for a, b in zip(grads, ref_g)
                                                       if a is not None and b is not None])
        row.update(fullgraph=True, max_abs_diff=err, ok=err < 1e-3)
    except Exception as e:  # noqa: BLE001 -- report any failure, then count the breaks
        row.update(fullgraph=False, ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        try:
            torch._dynamo.reset()
            ex = torch._dynamo.explain(fn)(q, k, v)
            row.update(graph_breaks=ex.graph_break_count or "n/a",
                       reasons=sorted({str(r.reason).splitlines()[0][:120] for r in ex.break_reasons})[:3])
        except Exception as e2:  # noqa: BLE001
            row["explain_error"] = f"{type(e2).__name__}: {str(e2).splitlines()[0][:200]}"
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", required=True)
    ap.add_argument("--backend", default="aot_eager")
    ap.add_argument("--entry", choices=["module", "functional"], default="module")
    ap.add_argument("--only", default=None, help="comma-separated mechanism ids")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rows = []
    print("| mechanism | causal | fullgraph | agrees | breaks | s |\n|---|---|---|---|---|---|")
    for label, name, options in _cases(a.family, None if a.only is None else a.only.split(",")):
        for causal in ([False, True] if fastattn.get_method(name).causal else [False]):
            if options.get("gate") and not causal:
                continue
            r = _check(name, options, causal, a.backend, a.entry)
            r["label"] = label
            rows.append(r)
            print(f"| {label} | {causal} | {r['fullgraph']} | {r['ok']} | {r.get('graph_breaks', 0)} | "
                  f"{r['seconds']} |" + (f" {r.get('error')} {r.get('reasons', '')}" if not r["ok"] else ""),
                  flush=True)
    out = a.out or os.path.join(os.path.dirname(__file__), "results",
                                f"compile_{a.family}_{a.backend}_{a.entry}.json")
    with open(out, "w") as f:
        json.dump({"torch": torch.__version__, "rows": rows}, f, indent=1)
    n_ok = sum(r["ok"] for r in rows)
    print(f"{n_ok}/{len(rows)} compile with fullgraph=True and agree with eager; wrote {out}")


if __name__ == "__main__":
    main()
