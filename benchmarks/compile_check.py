"""Every registered mechanism under ``torch.compile``: graph breaks and whether the compiled forward and
backward equal eager.

    python benchmarks/compile_check.py [--backend aot_eager|inductor] [--only a,b] [--family f,g] [--kind k]
                                       [--merge]

For each mechanism and variant (unmasked, causal, padded; ``step`` -- a decoding loop -- for seq2seq
mechanisms), ``torch._dynamo.explain`` counts the graphs
and graph breaks (with the first reasons) of a first call (a fresh module: cold caches, e.g. sparse
plans). Then, after one eager call, the mechanism is compiled -- with ``fullgraph=True`` for the families
in ``FULLGRAPH`` (a break is a failure), plainly for the rest -- run forward and backward, and compared
with eager: outputs and the gradients of the inputs (and of the module's parameters, for the vision and
seq2seq cases, which draw them at random so that no zero-initialised gate hides a path). The default backend ``aot_eager`` traces the forward and backward graphs without generating
code (minutes on 2 cores for the whole registry); ``inductor`` also compiles kernels and takes far longer.
Writes ``compile_check_<backend>.json`` to ``--out`` (default ``benchmarks/results``; with ``--family``
``compile_check_<backend>_<families>.json``; ``--merge`` updates ``compile_check_<backend>.json``, replacing
the rows of the mechanisms checked) and exits non-zero if a mechanism fails. The cases build their modules eagerly (``fastattn.methods()`` loads the registry
first), so a trace holds the mechanism's forward and backward only.

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

FULLGRAPH = {"exact", "kernel", "vision", "classic"}  # families that must trace as one graph


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


def _randomise(module: torch.nn.Module) -> torch.nn.Module:
    """Every parameter drawn at random (zero-initialised gates, such as ccnet's gamma, would make a block
    the identity and its gradients trivial); eval mode."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.4 * torch.randn(p.shape, generator=g))
    return module.eval()


def vision_case(spec: MethodSpec) -> list[Call]:
    """A feature-map module through ``Attention2d`` (16 channels, a 5 x 7 map): unmasked, and with a pixel
    mask (image 1 padded to its top-left 3 x 4 region); glimpse mechanisms through ``GlimpseAttention``
    (3 glimpses at the policy's means, eval mode)."""
    from fastattn.core.vision import GlimpseMechanism

    g = torch.Generator().manual_seed(0)
    if issubclass(spec.cls, GlimpseMechanism):
        x = torch.randn(2, 3, 9, 11, generator=g, requires_grad=True)
        m = fastattn.GlimpseAttention(3, spec.name, generator=torch.Generator().manual_seed(0),
                                      **spec.cls.test_options).eval()

        def glimpses(x: torch.Tensor) -> Any:
            return m(x, num_glimpses=3)
        glimpses.module = m  # type: ignore[attr-defined]
        return [("plain", glimpses, (x,))]
    x = torch.randn(2, 16, 5, 7, generator=g, requires_grad=True)
    mask = torch.zeros(2, 5, 7, dtype=torch.bool)
    mask[1, 3:, :] = True
    mask[1, :, 4:] = True

    def call() -> Callable[..., torch.Tensor]:
        kw = {"generator": torch.Generator().manual_seed(0)} if spec.randomized else {}
        m = _randomise(fastattn.Attention2d(16, spec.name, **spec.cls.test_options, **kw))

        def run(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
            return m(x, mask)
        run.module = m  # type: ignore[attr-defined]
        return run

    calls: list[Call] = [("plain", call(), (x,))]
    if spec.padding:
        calls.append(("padding", call(), (x, mask)))
    return calls


def seq2seq_case(spec: MethodSpec) -> list[Call]:
    """An alignment mechanism through ``AlignmentAttention`` (query 6, keys 7, values 4 features; 5 queries
    over 9 keys): unmasked, padded (sequence 1 to 5 keys, 2 to one key), causal, and -- for decoding
    mechanisms -- 5 ``step`` calls threading the state; query-free mechanisms are called with ``query=None``."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 5, 6, generator=g, requires_grad=True)
    k = torch.randn(3, 9, 7, generator=g, requires_grad=True)
    v = torch.randn(3, 9, 4, generator=g, requires_grad=True)
    kpm = torch.zeros(3, 9, dtype=torch.bool)
    kpm[1, 5:] = True
    kpm[2, 1:] = True

    def call(causal: bool = False, steps: bool = False) -> Callable[..., Any]:
        a = _randomise(fastattn.AlignmentAttention(6, 7, spec.name, value_dim=4, **spec.cls.test_options))
        free = a.attn.query_free

        def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kpm: torch.Tensor | None = None) -> Any:
            return a(None if free else q, k, v, kpm, is_causal=causal)

        def step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kpm: torch.Tensor | None = None) -> Any:
            state, out = None, []
            for t in range(q.shape[1]):
                context, weights, state = a.step(q[:, t], k, state, kpm, values=v)
                out += [context, weights]
            return out
        fn = step if steps else run
        fn.module = a  # type: ignore[attr-defined]
        return fn

    calls: list[Call] = [("plain", call(), (q, k, v))]
    if spec.padding:
        calls.append(("padding", call(), (q, k, v, kpm)))
    if spec.causal:
        calls.append(("causal", call(causal=True), (q, k, v)))
    if spec.decoding:
        calls.append(("step", call(steps=True), (q, k, v, kpm) if spec.padding else (q, k, v)))
    return calls


CASES: dict[str, Callable[[MethodSpec], list[Call]]] = {  # by kind ("layer": layer-level sequence mechanisms)
    "sequence": sequence_case,
    "layer": layer_case,
    "vision": vision_case,
    "seq2seq": seq2seq_case,
}


def _outputs(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for y in x for t in _outputs(y)]
    return []


def _forward_backward(fn: Callable[..., Any], inputs: tuple[torch.Tensor, ...],
                      params: list[torch.Tensor]) -> list[torch.Tensor]:
    outs = _outputs(fn(*inputs))
    diff = [t for t in inputs if t.requires_grad] + params
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
        params = list(fn.module.parameters()) if hasattr(fn, "module") else []  # a case naming its module
        want = _forward_backward(fn, inputs, params)
        got = _forward_backward(torch.compile(fn, fullgraph=res["fullgraph"], backend=backend), inputs, params)
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
    ap.add_argument("--kind", default="", help="comma-separated kinds (sequence, vision, seq2seq)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--merge", action="store_true",
                    help="update compile_check_<backend>.json: replace the rows of the mechanisms checked now, keep the rest")
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
    if args.kind:
        kinds = set(args.kind.split(","))
        specs = [s for s in specs if s.kind in kinds]
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
    meta = {"torch": torch.__version__, "backend": args.backend, "device": "cpu", "threads": 1}
    if args.merge:
        path = out / f"compile_check_{args.backend}.json"
        done = {r["name"] for r in rows}
        kept = [r for r in json.loads(path.read_text())["results"] if r["name"] not in done] if path.exists() else []
        order = {s.name: i for i, s in enumerate(fastattn.methods())}
        merged = sorted(kept + rows, key=lambda r: order.get(r["name"], len(order)))  # stable: variants keep their order
        path.write_text(json.dumps({"meta": meta, "results": merged}, indent=1) + "\n")
    else:
        suffix = f"_{args.family.replace(',', '_')}" if args.family else ""
        path = out / f"compile_check_{args.backend}{suffix}.json"
        path.write_text(json.dumps({"meta": meta, "results": rows}, indent=1) + "\n")
    bad = sorted({r["name"] for r in rows if r["status"] != "pass"})
    print(f"{len(specs) - len(bad)}/{len(specs)} mechanisms pass; wrote {path}" + (f"; not passing: {bad}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
