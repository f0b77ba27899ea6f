"""Wall time of decoding n tokens one at a time with ``Mechanism.step`` (the KV cache across steps).

    python benchmarks/decode_loop.py [--method softmax] [--n 4096]
"""

import argparse
import time

import torch

import fastattn

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="softmax")
    ap.add_argument("--n", type=int, default=4096)
    args = ap.parse_args()
    torch.set_num_threads(2)
    mech = fastattn.get_method(args.method).cls(head_dim=64, num_heads=8)
    x = torch.randn(1, 8, args.n, 64)
    with torch.no_grad():
        t0, state = time.perf_counter(), None
        for t in range(args.n):
            tok = x[:, :, t:t + 1]
            _, state = mech.step(tok, tok, tok, state, 0.125)
    print(f"{args.method}: {args.n} decode steps in {time.perf_counter() - t0:.2f} s")
