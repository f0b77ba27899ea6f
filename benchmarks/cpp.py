"""The issue-18 performance table in one run: fastattn with the compiled CPU backend ("cpp") and without
it ("torch") beside each other, SDPA and the peers (when installed) in the same process; per group its
cases interleaved (order alternating), medians of the repeats; then decoding
(``MultiheadAttention(512, 8, "linear").step``, one token after n cached, against SDPA over a KV cache
with the same projections). B=1, H=8, E=64, fp32, CPU.

    python benchmarks/cpp.py --threads 2        # the table: about 2-3 minutes on a quiet 2-core machine
    python benchmarks/cpp.py --quick            # lengths / 4, one repeat (a smoke run)
    python benchmarks/cpp.py --no-slow-peers    # without performer-pytorch (~12 s a call at n=4096)
    python benchmarks/cpp.py --threads 1 --clock cpu --note "shared machine"   # CPU time of one thread
    python benchmarks/cpp.py --groups local --out benchmarks/results/perf_local.json   # some rows only

Rows (the issue's table; each ratio is the other implementation's median over fastattn's, so > 1 means
fastattn is faster): causal linear fwd+bwd (goal >= 4x fast-transformers' C++ kernel, >= 30x SDPA), linear
forward non-causal (>= 4x fast-transformers), local w=256 causal fwd+bwd (>= 3x lucidrains'
local-attention), causal performer-256 fwd+bwd (keep ~44x performer-pytorch); plus two informational
rows (causal linear forward; lightning's decay). Where fast-transformers is not installed (its setup
needs CUDA_HOME: ``fast_transformers_install.txt``) the ratio is taken against the number the issue
quotes for it (measured quietly with 2 threads) and marked "quoted": meaningful only for a quiet
``--threads 2`` run.

Writes ``benchmarks/results/perf_table.json`` (the command, the machine, its load average and niceness,
every time) and ``perf_table.md`` (the table) next to it (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, _ROOT)  # this checkout, not an installed fastattn

import torch  # noqa: E402

import fastattn  # noqa: E402
from fastattn.bench.measure import Case, build  # noqa: E402
from fastattn.bench.peers import get_peer  # noqa: E402

N = 16384
P256 = {"num_features": 256}
W256 = {"window": 256}
FT_CAUSAL, FT_LINEAR = "peer:fast_transformers.causal_linear", "peer:fast_transformers.linear"
SLOW_PEERS = ("peer:performer_pytorch.causal",)


@dataclass
class Goal:
    other: str  # the implementation fastattn is compared with (a case name)
    ratio: float | None  # other / fastattn must be >= this (None: informational, "keep")
    quoted_s: float | None = None  # the quiet 2-thread number for ``other`` when it is absent


@dataclass
class Group:
    label: str
    cases: list[Case]
    goals: list[Goal] = field(default_factory=list)


GROUPS = [  # fastattn's cases first (cpp, then torch); each goal's ratio is against both
    Group("causal linear fwd+bwd",
          [Case("linear", N, causal=True, mode="fwdbwd", backend="cpp"),
           Case("linear", N, causal=True, mode="fwdbwd", backend="torch"),
           Case(FT_CAUSAL, N, causal=True, mode="fwdbwd"), Case("sdpa", N, causal=True, mode="fwdbwd")],
          [Goal(FT_CAUSAL, 4.0, 0.624), Goal("sdpa", 30.0)]),
    Group("linear forward (non-causal)",
          [Case("linear", N, backend="cpp"), Case("linear", N, backend="torch"), Case(FT_LINEAR, N), Case("sdpa", N)],
          [Goal(FT_LINEAR, 4.0, 0.123), Goal("sdpa", None)]),
    Group("local (w=256) causal fwd+bwd",
          [Case("local", N, causal=True, mode="fwdbwd", options=W256, backend="cpp"),
           Case("local", N, causal=True, mode="fwdbwd", options=W256, backend="torch"),
           Case("peer:local_attention", N, causal=True, mode="fwdbwd", options=W256)],
          [Goal("peer:local_attention", 3.0)]),
    Group("causal performer-256 fwd+bwd",
          [Case("performer", N // 4, causal=True, mode="fwdbwd", options=P256, backend="cpp"),
           Case("performer", N // 4, causal=True, mode="fwdbwd", options=P256, backend="torch"),
           Case("peer:performer_pytorch.causal", N // 4, causal=True, mode="fwdbwd", options=P256)],
          [Goal("peer:performer_pytorch.causal", None)]),
    Group("causal linear forward",
          [Case("linear", N, causal=True, backend="cpp"), Case("linear", N, causal=True, backend="torch")]),
    Group("lightning (decay) causal fwd+bwd",
          [Case("lightning", N, causal=True, mode="fwdbwd", backend="cpp"),
           Case("lightning", N, causal=True, mode="fwdbwd", backend="torch")]),
]


def _name(c: Case) -> str:
    return f"{c.impl}[{c.backend}]" if not c.impl.startswith(("sdpa", "peer:")) else c.impl


CLOCK = time.perf_counter  # --clock cpu: time.thread_time (with --threads 1: robust to a shared machine)


def interleaved(fns: dict[str, object], repeats: int) -> dict[str, list[float]]:
    for fn in fns.values():  # warm-up (and the compiled backend's build)
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats):
        for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            t0 = CLOCK()
            fns[k]()
            times[k].append(CLOCK() - t0)
    return times


def _decoders(n: int, steps: int) -> dict[str, object]:
    """Per-token decoding at ``n`` cached tokens: the linear layer's step on each backend, and SDPA over a
    preallocated KV cache through the same projections. Each function runs ``steps`` steps from the same
    prefix (a step at n cached every time)."""
    torch.manual_seed(0)
    layer = fastattn.MultiheadAttention(512, 8, "linear", batch_first=True).eval()
    mech = layer.mechanism
    x = torch.randn(1, n, 512)
    tok = torch.randn(1, 1, 512)
    with torch.no_grad():
        _, state = layer.step(x)
        kc = torch.empty(1, 8, n + 1, 64)
        vc = torch.empty(1, 8, n + 1, 64)
        kc[:, :, :n] = mech.k_proj(x).view(1, n, 8, 64).transpose(1, 2)
        vc[:, :, :n] = mech.v_proj(x).view(1, n, 8, 64).transpose(1, 2)

    def linear(backend: str):
        def run():
            layer.backend = backend
            with torch.no_grad():
                for _ in range(steps):
                    layer.step(tok, state)
        return run

    def sdpa():
        with torch.no_grad():
            for _ in range(steps):
                q = mech.q_proj(tok).view(1, 1, 8, 64).transpose(1, 2)
                kc[:, :, n:] = mech.k_proj(tok).view(1, 1, 8, 64).transpose(1, 2)
                vc[:, :, n:] = mech.v_proj(tok).view(1, 1, 8, 64).transpose(1, 2)
                o = torch.nn.functional.scaled_dot_product_attention(q, kc, vc)
                mech.out_proj(o.transpose(1, 2).reshape(1, 1, 512))

    return {"linear[cpp]": linear("cpp"), "linear[torch]": linear("torch"), "sdpa+kv-cache": sdpa}


def _peer_missing(name: str) -> str | None:
    """Why the peer case ``name`` cannot run here (None: it can)."""
    if not name.startswith("peer:"):
        return None
    if get_peer(name[5:]).available():
        return None
    why = f"{get_peer(name[5:]).package} is not installed"
    if name.startswith("peer:fast_transformers"):
        why += " (its build needs CUDA_HOME: benchmarks/results/fast_transformers_install.txt)"
    return why


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="lengths / 4, one repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-slow-peers", action="store_true", help="skip performer-pytorch (~12 s a call)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: this thread's CPU time (needs --threads 1; for a machine shared with other work)")
    ap.add_argument("--groups", default="",
                    help="only the rows whose label contains one of these comma-separated words (no decoding)")
    ap.add_argument("--note", default="", help="recorded with the results (e.g. whether the machine was shared)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "perf_table.json"))
    a = ap.parse_args()
    div, repeats = (4, 1) if a.quick else (1, a.repeats)
    if a.clock == "cpu":
        if a.threads != 1:
            sys.exit("--clock cpu measures one thread: use it with --threads 1")
        global CLOCK
        CLOCK = time.thread_time
    torch.set_num_threads(a.threads)
    from fastattn.ops.linear import compiled
    t_start = time.perf_counter()
    why = compiled.build()
    build_s = time.perf_counter() - t_start
    if why is not None:
        sys.exit(f"the compiled backend is unavailable: {why}")
    lines: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    command = " ".join(["python", "benchmarks/cpp.py", *sys.argv[1:]])
    result = {"command": command, "note": a.note,
              "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                          "torch": torch.__version__, "threads": a.threads, "clock": a.clock,
                          "nice": os.nice(0), "load_avg_start": os.getloadavg()},
              "build_s": build_s, "groups": [], "decode": []}
    say(f"`{command}`: B=1, H=8, E=64, fp32, {a.threads} thread(s), {a.clock} clock, medians of {repeats} "
        f"interleaved repeats; load average at start {os.getloadavg()[0]:.1f}, nice {os.nice(0)}.")
    if a.note:
        say(f"Note: {a.note}")
    say()
    say("| case | n | fastattn cpp | fastattn torch | other | other / cpp | other / torch | goal | met (cpp) |")
    say("|---|---|---|---|---|---|---|---|---|")
    words = [w for w in a.groups.split(",") if w]
    for grp in GROUPS:
        if words and not any(w in grp.label for w in words):
            continue
        cases = [replace(c, n=c.n // div, threads=a.threads) for c in grp.cases]
        missing = {_name(c): _peer_missing(c.impl) for c in cases}
        if a.no_slow_peers:
            missing.update({_name(c): "skipped (--no-slow-peers)" for c in cases if c.impl in SLOW_PEERS})
        cases = [c for c in cases if missing[_name(c)] is None]
        fns = {_name(c): build(c)[0] for c in cases}
        times = interleaved(fns, repeats)
        med = {k: statistics.median(t) for k, t in times.items()}
        ours = [k for k in med if not k.startswith(("sdpa", "peer:"))]
        cpp = next((k for k in ours if k.endswith("[cpp]")), ours[0])
        torch_ = next((k for k in ours if k.endswith("[torch]")), ours[0])
        rows = []
        goals = grp.goals or [Goal("", None)]
        for goal in goals:
            other_s, quoted = med.get(goal.other), False
            comparable = not a.quick and a.threads == 2 and a.clock == "wall"  # as the issue measured it
            if other_s is None and goal.quoted_s is not None and comparable:
                other_s, quoted = goal.quoted_s, True
            r_cpp = other_s / med[cpp] if other_s else None
            r_torch = other_s / med[torch_] if other_s else None
            met = None if goal.ratio is None or r_cpp is None else r_cpp >= goal.ratio
            rows.append({"other": goal.other, "other_s": other_s, "quoted": quoted,
                         "missing": missing.get(goal.other), "ratio_cpp": r_cpp, "ratio_torch": r_torch,
                         "goal": goal.ratio, "met": met})
            fmt = lambda x: f"{x * 1e3:.0f} ms" if x is not None else "-"  # noqa: E731
            other_cell = (f"{goal.other}: {fmt(other_s)}" + (" (quoted)" if quoted else "")) if goal.other else "-"
            if goal.other and other_s is None:
                other_cell = f"{goal.other}: {missing.get(goal.other) or 'absent'}"
                if goal.quoted_s is not None:
                    other_cell += f"; the issue quotes {fmt(goal.quoted_s)} (quiet, 2 threads, wall)"
            say(f"| {grp.label} | {cases[0].n} | {fmt(med[cpp]) if cpp.endswith('[cpp]') else '-'} | "
                f"{fmt(med[torch_])} | {other_cell} | "
                f"{f'{r_cpp:.2f}x' if r_cpp and cpp.endswith('[cpp]') else '-'} | "
                f"{f'{r_torch:.2f}x' if r_torch else '-'} | "
                f"{f'>= {goal.ratio:g}x' if goal.ratio else ('keep' if goal.other else '-')} | "
                f"{'-' if met is None else ('yes' if met else 'NO')} |")
        result["groups"].append({"label": grp.label, "cases": [asdict(c) for c in cases], "times_s": times,
                                 "median_s": med, "ratios": rows, "missing": {k: v for k, v in missing.items() if v}})
    if words:  # some rows only: no decoding section
        _write(a, result, lines, t_start)
        return
    steps = 8 if a.quick else 32
    say(f"\ndecoding, per token (median of {repeats} x {steps} steps), MultiheadAttention(512, 8, 'linear'); "
        "goal: sdpa / cpp >= 10x at 16384 cached, and per-token time at 16384 / at 16 <= 1.5")
    say()
    say("| cached | linear[cpp] | linear[torch] | sdpa+kv-cache | sdpa / cpp | sdpa / torch |")
    say("|---|---|---|---|---|---|")
    per = {}
    for n in (16, N // div):
        times = interleaved(_decoders(n, steps), repeats)
        med = {k: statistics.median(t) / steps for k, t in times.items()}
        per[n] = med
        say(f"| {n} | {med['linear[cpp]'] * 1e3:.3f} ms | {med['linear[torch]'] * 1e3:.3f} ms | "
            f"{med['sdpa+kv-cache'] * 1e3:.3f} ms | {med['sdpa+kv-cache'] / med['linear[cpp]']:.1f}x | "
            f"{med['sdpa+kv-cache'] / med['linear[torch]']:.1f}x |")
        result["decode"].append({"cached": n, "steps": steps, "per_token_s": med, "times_s": times})
    lo, hi = per[16], per[N // div]
    flat = {k: hi[k] / lo[k] for k in ("linear[cpp]", "linear[torch]")}
    say(f"\nper-token time at {N // div} / at 16 cached: cpp {flat['linear[cpp]']:.2f}, "
        f"torch {flat['linear[torch]']:.2f}")
    result["decode_flatness"] = flat
    _write(a, result, lines, t_start)


def _write(a: argparse.Namespace, result: dict, lines: list[str], t_start: float) -> None:
    result["machine"]["load_avg_end"] = os.getloadavg()
    result["wall_s"] = time.perf_counter() - t_start
    line = f"\nload average at the end {os.getloadavg()[0]:.1f}; the run took {result['wall_s']:.0f} s."
    print(line, flush=True)
    lines.append(line)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    md = os.path.splitext(a.out)[0] + ".md"
    with open(md, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {a.out} and {md}")


if __name__ == "__main__":
    main()
