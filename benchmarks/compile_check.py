"""Every registered mechanism under ``torch.compile``: graph breaks and whether the compiled forward and
backward equal eager.

    python benchmarks/compile_check.py [--backend aot_eager|inductor] [--only a,b] [--out DIR]

For each mechanism and variant (unmasked, causal, padded), ``torch._dynamo.explain`` counts the graphs
and graph breaks (with the first reasons) of a first call (a fresh module: cold caches, e.g. sparse
plans). Then, after one eager call, the mechanism is compiled -- with ``fullgraph=True`` for the families
in ``FULLGRAPH`` (a break is a failure), plainly for the rest -- run forward and backward, and compared
with eager. The default backend ``aot_eager`` traces the forward and backward graphs without generating
code (minutes on 2 cores for the whole registry); ``inductor`` also compiles kernels and takes far longer.
Writes ``compile_check_<backend>.json`` to ``--out`` (default ``benchmarks/results``) and exits non-zero
if a mechanism fails. Load the registry before compiling (``fastattn.methods()`` here): a mechanism is
imported on first use, and an import inside a trace is a graph break.

The script is a registry of cases: ``CASES`` maps a mechanism kind to the function that builds its call
(inputs and a function of them); add a kind's builder there, and a family to ``FULLGRAPH`` once it
compiles without breaks.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

import fastattn
from fastattn.registry import MethodSpec

FULLGRAPH = {"exact", "kernel"}  # families that must trace as one graph


Call = tuple[str, Callable[..., Any], tuple[torch.Tensor, ...]]  # (variant, function, its inputs)


def sequence_case(spec: MethodSpec) -> list[Call]:
    """GQA attention through the mechanism's ``run``: unmasked, causal, and with padding (causal where
    supported) -- the fast paths differ (e.g. the tiled linear kernels take no padding)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 37, 16, generator=g, requires_grad=True)
    k = torch.randn(2, 2, 37, 16, generator=g, requires_grad=True)
    v = torch.randn(2, 2, 37, 12, generator=g, requires_grad=True)
    kpm = torch.zeros(2, 37, dtype=torch.bool)
    kpm[1, 30:] = True

    def call(causal: bool) -> Callable[..., torch.Tensor]:
        kw = {"generator": torch.Generator().manual_seed(0)} if spec.randomized else {}
        mech = spec.cls(spec.make_options(**spec.cls.test_options), head_dim=16, num_heads=4, num_kv_heads=2, **kw)
        mech.eval()  # a fresh module per variant: caches (sparse plans) start cold

        def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kpm: torch.Tensor | None = None) -> torch.Tensor:
            return mech.run(q, k, v, key_padding_mask=kpm, is_causal=causal)
        return run

    calls: list[Call] = [("plain", call(False), (q, k, v))]
    if spec.causal:
        calls.append(("causal", call(True), (q, k, v)))
    if spec.padding:
        calls.append(("padding", call(spec.causal), (q, k, v, kpm)))
    return calls


def layer_case(spec: MethodSpec) -> list[Call]:
    """A layer-level mechanism through ``MultiheadAttention`` (6 query / 3 key-value heads, width 48,
    23 tokens: within the position tables of the test options)."""
    x = torch.randn(2, 23, 48, generator=torch.Generator().manual_seed(0), requires_grad=True)
    kpm = torch.zeros(2, 23, dtype=torch.bool)
    kpm[1, 18:] = True

    def call(causal: bool) -> Callable[..., torch.Tensor]:
        kw = {"generator": torch.Generator().manual_seed(0)} if spec.randomized else {}
        layer = fastattn.MultiheadAttention(48, 6, spec.name, num_kv_heads=3, batch_first=True,
                                            **spec.cls.test_options, **kw).eval()

        def run(x: torch.Tensor, kpm: torch.Tensor | None = None) -> torch.Tensor:
            return layer(x, key_padding_mask=kpm, is_causal=causal)[0]
        return run

    only_causal = fastattn.MultiheadAttention(  # a causal-only layer (intra) has no plain call
        48, 6, spec.name, num_kv_heads=3, **spec.cls.test_options,
        **({"generator": torch.Generator()} if spec.randomized else {}),
    ).mechanism.requires_causal
    calls: list[Call] = [] if only_causal else [("plain", call(False), (x,))]
    if spec.causal:
        calls.append(("causal", call(True), (x,)))
    if spec.padding:
        calls.append(("padding", call(spec.causal), (x, kpm)))
    return calls


CASES: dict[str, Callable[[MethodSpec], list[Call]]] = {  # by kind ("layer": layer-level sequence mechanisms)
    "sequence": sequence_case,
    "layer": layer_case,
}


def _outputs(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for y in x for t in _outputs(y)]
    return []


def _forward_backward(fn: Callable[..., Any], inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    outs = _outputs(fn(*inputs))
    diff = [t for t in inputs if t.requires_grad]
    loss = sum((o.float() * torch.linspace(-1, 1, o.numel()).view(o.shape)).sum() for o in outs if o.is_floating_point())
    return [o.detach() for o in outs] + list(torch.autograd.grad(loss, diff, allow_unused=True, materialize_grads=True))


def _summary(e: BaseException) -> str:
    """The error in one line, with the innermost fastattn source line it names (dynamo lists the user code
    in its message; other errors in their traceback)."""
    text = str(e)
    msg = " ".join(text.split())[:300]
    frames = re.findall(r'File "([^"]*fastattn/[^"]*)", line (\d+)', text + "".join(traceback.format_tb(e.__traceback__)))
    where = f" [at {frames[-1][0].split('fastattn/', 1)[1]}:{frames[-1][1]}]" if frames else ""
    return f"{type(e).__name__}: {msg}{where}"


def check(spec: MethodSpec, variant: str, fn: Callable[..., Any], inputs: tuple[torch.Tensor, ...],
          backend: str) -> dict[str, Any]:
    res: dict[str, Any] = {"name": spec.name, "variant": variant, "family": spec.family, "kind": spec.kind,
                           "fullgraph": spec.family in FULLGRAPH}
    torch._dynamo.reset()
    try:
        ex = torch._dynamo.explain(fn)(*inputs)
        res.update(graphs=ex.graph_count, breaks=ex.graph_break_count,
                   break_reasons=sorted({r.reason.splitlines()[0][:200] for r in ex.break_reasons})[:5])
    except Exception as e:  # noqa: BLE001 -- the report records whatever went wrong
        res.update(graphs=None, breaks=None, explain_error=_summary(e))
    torch._dynamo.reset()
    t0 = time.perf_counter()
    try:
        want = _forward_backward(fn, inputs)
        got = _forward_backward(torch.compile(fn, fullgraph=res["fullgraph"], backend=backend), inputs)
        err = max(((a.double() - b.double()).abs().max().item() for a, b in zip(got, want)), default=0.0)
        scale = max((b.double().abs().max().item() for b in want), default=1.0)
        res.update(status="pass" if err <= 1e-4 * max(scale, 1.0) else "mismatch", max_abs_err=err)
    except Exception as e:  # noqa: BLE001
        res.update(status="fail", error=_summary(e))
    res["compile_s"] = round(time.perf_counter() - t0, 1)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="aot_eager")
    ap.add_argument("--only", default="", help="comma-separated mechanism ids")
    ap.add_argument("--family", default="", help="comma-separated families (exact, kernel, sparse, ...)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    specs = fastattn.methods()  # loads every mechanism: imports stay out of the traces
    if args.only:
        keep = set(args.only.split(","))
        specs = [s for s in specs if s.name in keep]
    if args.family:
        families = set(args.family.split(","))
        specs = [s for s in specs if s.family in families]
    rows = []
    for spec in specs:
        build = CASES.get("layer" if spec.kind == "sequence" and spec.level == "layer" else spec.kind)
        if build is None:
            rows.append({"name": spec.name, "kind": spec.kind, "status": "no case"})
            print(f"{spec.name:20s} no compile case for kind {spec.kind!r}", flush=True)
            continue
        for variant, fn, inputs in build(spec):
            r = check(spec, variant, fn, inputs, args.backend)
            rows.append(r)
            mode = "fullgraph" if r["fullgraph"] else "compile"
            print(f"{spec.name:20s} {variant:8s} {spec.family:8s} {mode:9s} graphs={r.get('graphs')} "
                  f"breaks={r.get('breaks')} {r['status']:8s} {r['compile_s']}s {r.get('error', '')}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / (f"compile_check_{args.backend}" + (f"_{args.family.replace(',', '_')}" if args.family else "") + ".json")
    meta = {"torch": torch.__version__, "backend": args.backend, "device": "cpu", "threads": 1}
    path.write_text(json.dumps({"meta": meta, "results": rows}, indent=1) + "\n")
    bad = sorted({r["name"] for r in rows if r["status"] != "pass"})
    print(f"{len(specs) - len(bad)}/{len(specs)} mechanisms pass; wrote {path}" + (f"; not passing: {bad}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
