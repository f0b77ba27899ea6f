"""Sequence-parallel attention (fastattn.distributed): forward + backward time per rank, per-rank peak
memory of one layer's forward + backward beside the single process, and the bytes each strategy sends per
layer (counted from the shapes), with a check against the single process on rank 0 (``--check``, small n).

    torchrun --nproc_per_node 2 benchmarks/sequence_parallel.py --method linear --causal --length 8192
    torchrun --nproc_per_node 2 benchmarks/sequence_parallel.py --method softmax --strategy ring \\
        --layout zigzag --causal --length 4096
    python benchmarks/sequence_parallel.py ...   # one process: the single-process baseline
    python benchmarks/sequence_parallel.py --sweep   # every strategy at 1, 2, 4 processes on this machine:
                                                     # benchmarks/results/sequence_parallel_<device>.{json,md}

Peak memory: on CUDA the allocator's peak above what was allocated before the call; on CPU the peak
resident memory above the resident memory before the call (the kernel's peak-RSS counter, reset first;
``fastattn.bench.measure.cpu_peak_mb``). Inputs (this rank's shards) are allocated before and not counted.
gloo on CPU, NCCL when CUDA is available (one GPU per rank, by LOCAL_RANK).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

import fastattn
from fastattn import distributed as fad
from fastattn.bench.measure import cpu_peak_mb, cuda_peak_mb

RESULTS = Path(__file__).resolve().parent / "results"

# (method, strategy, causal, length, options): the sweep, one per strategy, sized for a CPU machine
SWEEP = [
    ("linear", "lasp2", True, 65536, {}),
    ("linear", "lasp2+overlap", True, 65536, {}),
    ("lightning", "lasp2", True, 16384, {}),
    ("softmax", "ring", True, 4096, {}),
    ("local", "halo", True, 16384, {"window": 256}),
    ("efficient", "ulysses", False, 16384, {}),
]


def traffic(strategy: str, world: int, b: int, h: int, n_local: int, e: int, item: int, chunks: int,
            normalize: bool, reach: int = 0, causal: bool = True) -> int:
    """Bytes one rank sends per layer (forward + backward), from the shapes."""
    if world == 1:
        return 0
    if strategy == "lasp2":  # one all-gather of the states forward, one all-reduce of their gradients back
        state = chunks * b * h * (e * e + (e if normalize else 0) + 1) * item
        return state * (world - 1) + 2 * state * world * (world - 1) // world
    if strategy == "ring":  # K, V around the ring forward and again backward, dK/dV W hops back
        kv = b * h * n_local * 2 * e * item
        return (world - 1) * kv * 2 + world * kv
    if strategy == "halo":  # r keys and values to the next chunk (and the previous when not causal), back
        sides = 1 if causal else 2
        return 2 * chunks * sides * b * h * reach * 2 * e * item
    local = b * h * n_local * e * item  # ulysses: q, k, v, out forward; their gradients back
    return 8 * local * (world - 1) // world


def run_one(args: argparse.Namespace) -> dict:
    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    device = torch.device("cuda" if cuda else "cpu")
    if distributed:
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.set_num_threads(max(1, args.threads // world) if args.threads else max(1, (os.cpu_count() or 1) // world))
    options = json.loads(args.options)

    g = torch.Generator().manual_seed(0)
    shape = (args.batch, args.heads, args.length, args.dim)
    q, k, v = (torch.randn(shape, generator=g).to(device) for _ in range(3))
    if distributed:
        q, k, v = (t.clone() for t in fad.shard_sequence((q, k, v), layout=args.layout))  # the full ones freed
        strategy = fad.choose_strategy(args.method, args.strategy, length=args.length,
                                       chunk=q.shape[2] // (2 if args.layout == "zigzag" else 1), **options)
    else:
        strategy = "single"

    def run() -> torch.Tensor:
        torch.manual_seed(1)  # randomised mechanisms draw their features on rank 0 (then broadcast) as below
        x = [t.detach().requires_grad_() for t in (q, k, v)]
        if distributed:
            out = fad.sequence_parallel_attention(*x, args.method, is_causal=args.causal, strategy=strategy,
                                                  layout=args.layout, overlap=args.overlap, **options)
        else:
            out = fastattn.attention(*x, args.method, is_causal=args.causal, **options)
        out.square().mean().backward()
        return out.detach()

    run()  # warm-up
    if distributed:
        dist.barrier()
    peak = (cuda_peak_mb if cuda else cpu_peak_mb)(run)
    times = []
    for _ in range(args.repeat):
        if distributed:
            dist.barrier()
        t0 = time.perf_counter()
        out = run()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    spec = fastattn.get_method(args.method)
    chunks = 2 if args.layout == "zigzag" else 1
    sent = traffic(strategy, world, args.batch, args.heads, q.shape[2], args.dim, q.element_size(), chunks,
                   getattr(spec.cls, "normalize", True), int(options.get("window", 0)), args.causal)
    row = {"method": args.method, "strategy": strategy + ("+overlap" if args.overlap and distributed else ""), "layout": args.layout, "causal": args.causal,
           "length": args.length, "world": world, "rank": rank, "median_s": statistics.median(times),
           "peak_mib": peak, "sent_mib": sent / 2**20, "device": "cuda" if cuda else "cpu"}
    print(f"rank {rank}/{world} {args.method} {strategy} {args.layout} causal={args.causal} n={args.length}: "
          f"fwd+bwd median {row['median_s'] * 1e3:.1f} ms, peak {peak:.0f} MiB, "
          f"sends {row['sent_mib']:.2f} MiB per layer", flush=True)
    if args.json:  # one file per rank (their printed lines may interleave)
        Path(args.json, f"row_{rank}.json").write_text(json.dumps(row))
    if args.check and distributed:
        full = fad.unshard_sequence(out, layout=args.layout)
        if rank == 0:
            g = torch.Generator().manual_seed(0)
            fq, fk, fv = (torch.randn(shape, generator=g).to(device) for _ in range(3))
            torch.manual_seed(1)
            want = fastattn.attention(fq, fk, fv, args.method, is_causal=args.causal, **options)
            print(f"max |sequence parallel - single process| = {(full - want).abs().max().item():.3g}")
    if distributed:
        dist.barrier()  # rank 0 may still be checking
        dist.destroy_process_group()
    return row


def sweep(args: argparse.Namespace) -> None:
    """Every SWEEP case at 1, 2 and 4 processes (fresh ones each), rows collected from their output."""
    rows = []
    for method, strategy, causal, length, options in SWEEP:
        for world in (1, 2, 4):
            if world == 1 and "+" in strategy:
                continue  # the same single process as the plain strategy's
            out_dir = tempfile.mkdtemp()
            cmd = [__file__, "--method", method, "--strategy", strategy.split("+")[0], "--length", str(length),
                   "--options", json.dumps(options), "--repeat", str(args.repeat), "--json", out_dir,
                   "--threads", str(args.threads or world)] + (["--causal"] if causal else []) + \
                (["--overlap"] if strategy.endswith("+overlap") else [])
            cmd = ([sys.executable] if world == 1 else
                   [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]) + cmd
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            got = [json.loads(f.read_text()) for f in sorted(Path(out_dir).glob("row_*.json"))]
            if proc.returncode or len(got) != world:
                raise RuntimeError(f"{method} world {world} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
            for r in got:
                r["strategy_run"] = strategy
            rows += got
            print(f"{method} W={world}: peak per rank {[round(r['peak_mib']) for r in got]} MiB, "
                  f"{statistics.median(r['median_s'] for r in got):.2f} s", flush=True)
    dev = rows[0]["device"]
    meta = {"torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d"), "batch": args.batch, "heads": args.heads, "dim": args.dim,
            "dtype": "float32", "threads_per_rank": "1 (OMP_NUM_THREADS=1)" if not args.threads else args.threads,
            "note": args.note}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"sequence_parallel_{dev}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [f"Sequence parallelism (benchmarks/sequence_parallel.py --sweep): forward + backward of one attention "
             f"call, B={args.batch}, H={args.heads}, E={args.dim}, fp32, gloo, every process on one {dev} machine "
             f"({os.cpu_count()} cores), torch {torch.__version__}, {meta['date']}. {args.note}", "",
             "Peak MiB: the largest rank's peak resident memory above its inputs during one forward + backward "
             "(single process: W = 1). Sent: bytes one rank sends per layer, forward + backward, from the shapes.",
             "", "| method | strategy | causal | n | W | peak MiB per rank (max) | vs W=1 | sent MiB per rank | "
             "time s (median rank) |", "|---|---|---|---|---|---|---|---|---|"]
    base = {}
    for r in rows:
        key = (r["method"], r["length"])
        same = [x for x in rows if (x["method"], x["length"], x["world"], x["strategy"]) ==
                (*key, r["world"], r["strategy"])]
        if r["rank"] != 0:
            continue
        peak = max(x["peak_mib"] for x in same)
        if r["world"] == 1:
            base[key] = peak
        t = statistics.median(x["median_s"] for x in same)
        lines.append(f"| {r['method']} | {r['strategy']} | {r['causal']} | {r['length']} | {r['world']} | {peak:.0f} | "
                     f"{peak / base[key]:.2f} | {max(x['sent_mib'] for x in same):.2f} | {t:.2f} |")
    (RESULTS / f"sequence_parallel_{dev}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="linear")
    ap.add_argument("--strategy", default="auto")
    ap.add_argument("--layout", default="contiguous")
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--options", default="{}", help="the method's options as JSON")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads in all (0: the cores, split over ranks)")
    ap.add_argument("--overlap", action="store_true", help="lasp2: overlap the intra-chunk attention with the exchange")
    ap.add_argument("--check", action="store_true", help="compare with the single process on rank 0")
    ap.add_argument("--json", default="", help="a folder to write each rank's result to (for --sweep)")
    ap.add_argument("--sweep", action="store_true", help="every strategy at 1, 2, 4 processes; write results")
    ap.add_argument("--note", default="", help="a note for the results file (e.g. the machine was shared)")
    args = ap.parse_args()
    if args.sweep:
        sweep(args)
    else:
        run_one(args)


if __name__ == "__main__":
    main()
