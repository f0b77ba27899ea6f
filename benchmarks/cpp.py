"""The compiled CPU backend ("cpp") against the PyTorch backend ("torch") and SDPA, side by side in one
process: for each group its cases interleaved (order alternating), medians of the repeats; then decoding
(``MultiheadAttention(512, 8, "linear").step``, one token after n cached, against SDPA over a KV cache
with the same projections). B=1, H=8, E=64, fp32, CPU.

    python benchmarks/cpp.py            # default run: a few minutes on a quiet 2-core machine
    python benchmarks/cpp.py --quick    # lengths / 4, one repeat (a smoke run)
    python benchmarks/cpp.py --peers    # also performer-pytorch (slow: ~12 s a call at n=4096)
    python benchmarks/cpp.py --threads 1 --clock cpu   # CPU time of one thread (a shared machine)

Writes benchmarks/results/cpp.json (the command, the machine and its load average, every time).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, replace

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, _ROOT)  # this checkout, not an installed fastattn

import torch  # noqa: E402

import fastattn  # noqa: E402
from fastattn.bench.measure import Case, build  # noqa: E402
from fastattn.bench.peers import get_peer  # noqa: E402

N = 16384
P256 = {"num_features": 256}
GROUPS = [  # (label, cases); ratios are against the group's first case (cpp)
    ("causal linear fwd+bwd", [Case("linear", N, causal=True, mode="fwdbwd", backend="cpp"),
                               Case("linear", N, causal=True, mode="fwdbwd", backend="torch"),
                               Case("sdpa", N, causal=True, mode="fwdbwd")]),
    ("linear fwd (non-causal)", [Case("linear", N, backend="cpp"), Case("linear", N, backend="torch"),
                                 Case("sdpa", N)]),
    ("causal linear fwd", [Case("linear", N, causal=True, backend="cpp"),
                           Case("linear", N, causal=True, backend="torch")]),
    ("lightning (decay) causal fwd+bwd", [Case("lightning", N, causal=True, mode="fwdbwd", backend="cpp"),
                                          Case("lightning", N, causal=True, mode="fwdbwd", backend="torch")]),
    ("causal performer-256 fwd+bwd", [Case("performer", N // 4, causal=True, mode="fwdbwd", options=P256, backend="cpp"),
                                      Case("performer", N // 4, causal=True, mode="fwdbwd", options=P256, backend="torch"),
                                      Case("peer:performer_pytorch.causal", N // 4, causal=True, mode="fwdbwd",
                                           options=P256)]),
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="lengths / 4, one repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peers", action="store_true", help="include performer-pytorch (slow)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: this thread's CPU time (needs --threads 1; for a machine shared with other work)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpp.json"))
    a = ap.parse_args()
    div, repeats = (4, 1) if a.quick else (1, a.repeats)
    if a.clock == "cpu":
        if a.threads != 1:
            sys.exit("--clock cpu measures one thread: use it with --threads 1")
        global CLOCK
        CLOCK = time.thread_time
    torch.set_num_threads(a.threads)
    from fastattn.ops.linear import compiled
    t0 = time.perf_counter()
    why = compiled.build()
    build_s = time.perf_counter() - t0
    if why is not None:
        sys.exit(f"the compiled backend is unavailable: {why}")
    print(f"cpp backend ready in {build_s:.1f} s (build or cache load); threads={a.threads}, "
          f"load average {os.getloadavg()[0]:.1f}\n")
    result = {"command": " ".join(["python", "benchmarks/cpp.py", *sys.argv[1:]]),
              "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                          "torch": torch.__version__, "threads": a.threads, "clock": a.clock,
                          "load_avg_start": os.getloadavg()},
              "build_s": build_s, "groups": [], "decode": []}
    print("| case | n | " + " | ".join(["cpp", "torch", "baseline"]) + " | torch / cpp | baseline / cpp |")
    print("|---|---|---|---|---|---|---|")
    for label, cases in GROUPS:
        cases = [replace(c, n=c.n // div, threads=a.threads) for c in cases]
        cases = [c for c in cases if not c.impl.startswith("peer:") or (a.peers and get_peer(c.impl[5:]).available())]
        fns = {_name(c): build(c)[0] for c in cases}
        times = interleaved(fns, repeats)
        med = {k: statistics.median(t) for k, t in times.items()}
        names = list(fns)
        cells = [f"{med[k] * 1e3:.0f} ms ({k})" for k in names] + [""] * (3 - len(names))
        ratios = [f"{med[k] / med[names[0]]:.1f}x" for k in names[1:]] + [""] * (3 - len(names))
        print(f"| {label} | {cases[0].n} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
        result["groups"].append({"label": label, "cases": [asdict(c) for c in cases], "times_s": times,
                                 "median_s": med})
    steps = 8 if a.quick else 32
    print(f"\ndecoding, per token (median of {repeats} x {steps} steps), MultiheadAttention(512, 8, 'linear')")
    print("| cached | linear[cpp] | linear[torch] | sdpa+kv-cache | sdpa / cpp | sdpa / torch |")
    print("|---|---|---|---|---|---|")
    per = {}
    for n in (16, N // div):
        times = interleaved(_decoders(n, steps), repeats)
        med = {k: statistics.median(t) / steps for k, t in times.items()}
        per[n] = med
        print(f"| {n} | {med['linear[cpp]'] * 1e3:.3f} ms | {med['linear[torch]'] * 1e3:.3f} ms | "
              f"{med['sdpa+kv-cache'] * 1e3:.3f} ms | {med['sdpa+kv-cache'] / med['linear[cpp]']:.1f}x | "
              f"{med['sdpa+kv-cache'] / med['linear[torch]']:.1f}x |")
        result["decode"].append({"cached": n, "steps": steps, "per_token_s": med, "times_s": times})
    lo, hi = per[16], per[N // div]
    flat = {k: hi[k] / lo[k] for k in ("linear[cpp]", "linear[torch]")}
    print(f"per-token time at {N // div} / at 16 cached: cpp {flat['linear[cpp]']:.2f}, torch {flat['linear[torch]']:.2f}")
    result["decode_flatness"] = flat
    result["machine"]["load_avg_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
