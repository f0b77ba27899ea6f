"""Image classification on scikit-learn's bundled 8x8 digits (1797 images, shipped inside the package:
nothing is downloaded) with every vision module of ``fastattn.Attention2d`` inserted into a small CNN,
beside the plain CNN; then forward+backward time of each module against the non-local block at
growing resolution (same run, medians).

    .venv/bin/python benchmarks/vision_digits.py [--epochs 15] [--seeds 0,1] [--sizes 16,32,64]
        [--channels 32] [--out benchmarks/results]

The CNN: conv3x3-BN-ReLU twice (``channels`` maps at 8x8), the module, global average pooling, a linear
classifier. Train/test split: a fixed permutation (seed 0), 1200 / 597 images; Adam (lr 2e-3), batch
64; test accuracy after the last epoch, mean over the seeds. Needs scikit-learn (extra ``digits``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import fastattn

# options for an 8x8 map with few channels (the defaults target large segmentation maps)
OPTIONS = {
    "cbam": {"reduction": 8},
    "gcnet": {"reduction": 8},
    "emanet": {"bases": 16},
    "tensor_lowrank": {"size": (8, 8), "rank": 16},
}


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1200], perm[1200:]
    return x[tr], y[tr], x[te], y[te]


class Net(nn.Module):
    def __init__(self, method: str, channels: int) -> None:
        super().__init__()
        c = channels
        self.stem = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
            nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
        )
        self.attn = nn.Identity() if method == "plain" else fastattn.Attention2d(c, method, **OPTIONS.get(method, {}))
        self.head = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(self.stem(x)).mean(dim=(2, 3)))


def train_one(method: str, seed: int, data, epochs: int, channels: int) -> dict:
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    net = Net(method, channels)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(ytr), generator=g).split(64):
            loss = nn.functional.cross_entropy(net(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    train_s = time.perf_counter() - t0
    net.eval()
    with torch.no_grad():
        acc = (net(xte).argmax(-1) == yte).float().mean().item()
    return {"accuracy": acc, "train_s": train_s, "final_loss": loss.item()}


def fwd_bwd_seconds(method: str, size: int, channels: int, repeats: int) -> float:
    m = fastattn.Attention2d(channels, method, **{k: v for k, v in OPTIONS.get(method, {}).items() if k != "size"})
    x = torch.randn(1, channels, size, size, requires_grad=True)
    m(x).sum().backward()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        m(x).sum().backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--sizes", default="16,32,64")
    ap.add_argument("--channels", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    torch.set_num_threads(1)
    methods = ["plain"] + [s.name for s in fastattn.methods() if s.kind == "vision"]
    data = digits()
    seeds = [int(s) for s in args.seeds.split(",")]
    acc_rows = []
    for method in methods:
        runs = [train_one(method, s, data, args.epochs, args.channels) for s in seeds]
        row = {
            "method": method,
            "accuracy_mean": statistics.mean(r["accuracy"] for r in runs),
            "accuracy": [r["accuracy"] for r in runs],
            "train_s_median": statistics.median(r["train_s"] for r in runs),
        }
        acc_rows.append(row)
        print(f"{method:<16} acc {row['accuracy_mean']:.4f} {row['accuracy']} train {row['train_s_median']:.1f}s", flush=True)
    time_rows = []
    for size in map(int, args.sizes.split(",")):
        base = None
        for method in methods[1:]:
            t = fwd_bwd_seconds(method, size, args.channels, args.repeats)
            base = t if method == "nonlocal" else base
            time_rows.append({"method": method, "size": size, "fwd_bwd_s": t})
            print(f"{size:>4}x{size:<4} {method:<16} {t * 1e3:9.2f} ms", flush=True)
        for r in time_rows:
            if r["size"] == size and base:
                r["vs_nonlocal"] = r["fwd_bwd_s"] / base
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "task": "sklearn digits 8x8, 1200 train / 597 test", "epochs": args.epochs, "seeds": seeds,
        "channels": args.channels, "options": {k: {a: list(b) if isinstance(b, tuple) else b for a, b in v.items()}
                                                for k, v in OPTIONS.items()},
        "timing": f"forward+backward, batch 1, float32, median of {args.repeats}, 1 thread",
        "machine": platform.platform(), "torch": torch.__version__,
        "note": "CPU shared with other jobs: compare ratios within this run only",
    }
    (out / "vision_digits.json").write_text(json.dumps({"meta": meta, "accuracy": acc_rows, "time": time_rows}, indent=1))
    lines = [
        "# Vision modules on sklearn digits (8x8), and time against the non-local block",
        "",
        f"Small CNN, {args.channels} channels, {args.epochs} epochs, seeds {seeds}; CPU, 1 thread, shared machine.",
        "",
        "| module | test accuracy (mean) | per seed | train time (s, median) |",
        "|---|---|---|---|",
    ]
    for r in acc_rows:
        lines.append(f"| {r['method']} | {r['accuracy_mean']:.4f} | {', '.join(f'{a:.4f}' for a in r['accuracy'])} "
                     f"| {r['train_s_median']:.1f} |")
    sizes = sorted({r["size"] for r in time_rows})
    caption = (f"Forward+backward time (ms, median) at batch 1, {args.channels} channels; in brackets the "
               "ratio to `nonlocal` at that size.")
    lines += ["", caption, "",
              "| module | " + " | ".join(f"{s}x{s}" for s in sizes) + " |", "|---" * (len(sizes) + 1) + "|"]
    for method in methods[1:]:
        cells = []
        for s in sizes:
            r = next(r for r in time_rows if r["method"] == method and r["size"] == s)
            cells.append(f"{r['fwd_bwd_s'] * 1e3:.1f} ({r.get('vs_nonlocal', float('nan')):.2f})")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    (out / "vision_digits.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
