"""SwitchHead's value-expert projection, forward+backward: every expert in one einsum (what
``fastattn.ops.routing.experts_in`` does, unselected experts weighed by 0) against computing only the
selected (token, expert) pairs, two ways: tokens grouped by expert with ``group_by_expert`` (padded to the
busiest expert), gathered, one batched matmul, scattered back; and the selections sorted by (head, expert),
gathered with ``index_select``, one matmul per (head, expert) over its rows (a loop over the ``H * E``
segments), summed back with ``index_add``. All cases interleaved in one process, medians. The question: is
a selected form cheaper on CPU at the paper's sizes (k = 2 of E = 4 experts)?

    python benchmarks/switchhead_experts.py [--n 4096] [--repeats 5] [--threads 2] [--heads 8] [--head-dim 64]
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

from fastattn.bench.measure import interleaved_times
from fastattn.ops.routing import (
    experts_in,
    gather_tokens,
    group_by_expert,
    route,
    scatter_tokens,
)


def selected_experts_in(x: torch.Tensor, weight: torch.Tensor, routing) -> torch.Tensor:
    """``experts_in`` on the selected pairs only: ``x (B, L, Din)``, ``weight (G, E, Din, Dout)``."""
    b, n, din = x.shape
    g, e, _, dout = weight.shape
    index, valid = group_by_expert(routing.mask.flatten(-2))  # (B, G*E, S)
    xs = gather_tokens(x[:, None].expand(b, g * e, n, din), index)  # (B, G*E, S, Din)
    ys = torch.einsum("bgsi,gio->bgso", xs, weight.reshape(g * e, din, dout))
    gates = routing.gates.flatten(-2).transpose(1, 2)  # (B, G*E, L)
    ys = ys * gates.gather(2, index)[..., None]
    out = scatter_tokens(ys, index, valid, n)  # (B, G*E, L, Dout)
    return out.view(b, g, e, n, dout).sum(2).transpose(1, 2)  # (B, L, G, Dout)


def sorted_experts_in(x: torch.Tensor, weight: torch.Tensor, routing) -> torch.Tensor:
    """``experts_in`` on the selected pairs only, sorted by (head, expert), one matmul per segment."""
    b, n, din = x.shape
    g, e, _, dout = weight.shape
    idx = routing.index.reshape(b * n, g, -1)  # (N, G, k)
    key = (torch.arange(g)[:, None] * e + idx).reshape(-1)
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=g * e).tolist()
    row = order // idx.shape[-1]  # the (token, head) row token * G + g of each sorted selection
    rows = x.reshape(b * n, din).index_select(0, row // g)
    w = weight.reshape(g * e, din, dout)
    ys = torch.cat([seg @ w[j] for j, seg in enumerate(rows.split(counts)) if counts[j]])
    ys = ys * routing.gates.reshape(b * n, g, e).gather(-1, idx).reshape(-1)[order, None]
    return ys.new_zeros(b * n * g, dout).index_add(0, row, ys).view(b, n, g, dout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "switchhead_experts.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    heads, experts, k, d, width = a.heads, 4, 2, a.head_dim, 512
    x = torch.randn(1, a.n, width, requires_grad=True)
    weight = (torch.randn(heads, experts, width, d) * width ** -0.5).requires_grad_(True)
    logits = torch.randn(1, a.n, heads, experts)
    r = route(logits, k, gate="sigmoid", renormalize=False)
    with torch.no_grad():
        torch.testing.assert_close(selected_experts_in(x, weight, r), experts_in(x, weight, r.gates), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(sorted_experts_in(x, weight, r), experts_in(x, weight, r.gates), rtol=1e-4, atol=1e-4)

    def every() -> None:
        experts_in(x, weight, r.gates).sum().backward()
        x.grad = weight.grad = None

    def selected() -> None:
        selected_experts_in(x, weight, r).sum().backward()
        x.grad = weight.grad = None

    def by_segment() -> None:
        sorted_experts_in(x, weight, r).sum().backward()
        x.grad = weight.grad = None

    fns = {"every expert (einsum)": every, "selected pairs (gather, bmm, scatter)": selected,
           "selected pairs (sorted, matmul per expert)": by_segment}
    times = interleaved_times(fns, a.repeats)
    med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    for name, m in med.items():
        print(f"n={a.n} {name:40s} {m:8.1f} ms", flush=True)
    out = {"what": __doc__.split("\n\n")[0].replace("\n", " "), "n": a.n, "heads": heads, "experts": experts,
           "active": k, "head_dim": d, "embed_dim": width, "threads": a.threads, "torch": torch.__version__,
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared with other jobs)",
           "median_ms": med, "times_ms": {n_: [t * 1e3 for t in ts] for n_, ts in times.items()}}
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
