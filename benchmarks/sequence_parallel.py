"""One case of sequence-parallel attention (fastattn.distributed): forward + backward time per rank, peak
memory (CUDA) and the bytes each strategy moves per layer (counted from the shapes), with a check
against the single process on rank 0 (``--check``, small n only).

    torchrun --nproc_per_node 2 benchmarks/sequence_parallel.py --method linear --causal --length 8192
    torchrun --nproc_per_node 2 benchmarks/sequence_parallel.py --method softmax --strategy ring \\
        --layout zigzag --causal --length 4096
    python benchmarks/sequence_parallel.py ...   # one process: the single-process baseline

gloo on CPU, NCCL when CUDA is available (one GPU per rank, by LOCAL_RANK).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

import fastattn
from fastattn import distributed as fad


def traffic(strategy: str, world: int, b: int, h: int, n_local: int, e: int, item: int, chunks: int,
            normalize: bool) -> int:
    """Bytes one rank sends per layer (forward + backward), from the shapes."""
    if world == 1:
        return 0
    if strategy == "lasp2":  # one all-gather of the states forward, one all-reduce of their gradients back
        state = chunks * b * h * (e * e + (e if normalize else 0) + 1) * item
        return state * (world - 1) + 2 * state * world * (world - 1) // world
    if strategy == "ring":  # K, V around the ring forward and again backward, dK/dV W hops back
        kv = b * h * n_local * 2 * e * item
        return (world - 1) * kv * 2 + world * kv
    local = b * h * n_local * e * item  # ulysses: q, k, v, out forward; their gradients back
    return 8 * local * (world - 1) // world


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
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--check", action="store_true", help="compare with the single process on rank 0")
    args = ap.parse_args()

    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    device = torch.device("cuda" if cuda else "cpu")
    if distributed:
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    g = torch.Generator().manual_seed(0)
    shape = (args.batch, args.heads, args.length, args.dim)
    q, k, v = (torch.randn(shape, generator=g).to(device) for _ in range(3))
    strategy = fad.choose_strategy(args.method, args.strategy) if distributed else "single"
    if distributed:
        q, k, v = fad.shard_sequence((q, k, v), layout=args.layout)

    def run() -> torch.Tensor:
        torch.manual_seed(1)  # randomised mechanisms draw their features on rank 0 (then broadcast) as below
        x = [t.detach().requires_grad_() for t in (q, k, v)]
        if distributed:
            out = fad.sequence_parallel_attention(*x, args.method, is_causal=args.causal, strategy=strategy,
                                                  layout=args.layout)
        else:
            out = fastattn.attention(*x, args.method, is_causal=args.causal)
        out.square().mean().backward()
        return out.detach()

    run()  # warm-up
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeat):
        if distributed:
            dist.barrier()
        t0 = time.perf_counter()
        out = run()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")
    spec = fastattn.get_method(args.method)
    chunks = 2 if args.layout == "zigzag" else 1
    sent = traffic(strategy, world, args.batch, args.heads, q.shape[2], args.dim, q.element_size(), chunks,
                   getattr(spec.cls, "normalize", True))
    print(f"rank {rank}/{world} {args.method} {strategy} {args.layout} causal={args.causal} n={args.length}: "
          f"fwd+bwd median {statistics.median(times) * 1e3:.1f} ms, peak {peak:.0f} MiB (CUDA only), "
          f"sends {sent / 2**20:.2f} MiB per layer", flush=True)
    if args.check and distributed:
        full = fad.unshard_sequence(out, layout=args.layout)
        if rank == 0:
            g = torch.Generator().manual_seed(0)
            fq, fk, fv = (torch.randn(shape, generator=g).to(device) for _ in range(3))
            torch.manual_seed(1)
            want = fastattn.attention(fq, fk, fv, args.method, is_causal=args.causal)
            print(f"max |sequence parallel - single process| = {(full - want).abs().max().item():.3g}")
    if distributed:
        dist.barrier()  # rank 0 may still be checking
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
