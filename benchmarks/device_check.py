"""Every registered sequence mechanism on an accelerator: the fast path on the device against the float64
reference on the CPU (values and gradients), causal where supported, plus bf16/fp16 finiteness, and
peak-memory/time of forward+backward for the exact family against SDPA at long lengths.

    python benchmarks/device_check.py [--device cuda] [--out DIR]

Exits non-zero if any mechanism disagrees with its reference on the device.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

import torch

import fastattn
from fastattn.bench.measure import Case, peak_memory_mb, time_case


def _mech(spec, device, dtype):
    opts = spec.cls.test_options
    kw = {"generator": torch.Generator().manual_seed(0)} if spec.randomized else {}
    m = spec.cls(spec.make_options(**opts), head_dim=16, num_heads=4, num_kv_heads=2, **kw).eval()
    return m.to(device=device, dtype=dtype) if dtype == torch.float64 else m.to(device)


def check(spec, device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 61, 16, generator=g), torch.randn(2, 2, 61, 16, generator=g), torch.randn(2, 2, 61, 12, generator=g)
    kpm = torch.zeros(2, 61, dtype=torch.bool)
    kpm[1, 40:] = True
    res = {"name": spec.name}
    ref_m = _mech(spec, "cpu", torch.float64)
    dev_m = _mech(spec, device, torch.float32)
    dev_m.load_state_dict({k_: t.float() if t.is_floating_point() else t for k_, t in ref_m.state_dict().items()})
    worst = 0.0
    for causal in ([False, True] if spec.causal else [False]):
        kw = {"is_causal": causal, "key_padding_mask": kpm if spec.padding else None}
        qd, kd, vd = (t.to(device).requires_grad_() for t in (q, k, v))
        qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
        out = dev_m.run(qd, kd, vd, **{**kw, "key_padding_mask": None if kw["key_padding_mask"] is None else kpm.to(device)})
        ref = ref_m.run(qr, kr, vr, reference=True, **kw)
        w = torch.randn(out.shape, generator=g)
        gd = torch.autograd.grad((out * w.to(device)).sum(), (qd, kd, vd), allow_unused=True)
        gr = torch.autograd.grad((ref * w.double()).sum(), (qr, kr, vr), allow_unused=True)
        err = ((out.double().cpu() - ref).norm() / ref.norm()).item()
        gerr = max(((a.double().cpu() - b).norm() / b.norm().clamp_min(1e-12)).item() for a, b in zip(gd, gr) if b is not None)
        worst = max(worst, err, gerr)
        for dt in (torch.bfloat16, torch.float16):
            half = dev_m.run(qd.detach().to(dt), kd.detach().to(dt), vd.detach().to(dt), **{**kw, "key_padding_mask": None if kw["key_padding_mask"] is None else kpm.to(device)})
            res[f"finite_{dt}_{causal}"] = bool(torch.isfinite(half).all())
    res["rel_err"] = worst
    res["ok"] = worst < 1e-4 and all(v_ for k_, v_ in res.items() if k_.startswith("finite"))
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--lengths", default="4096,16384,65536")
    args = ap.parse_args()
    print(torch.__version__, torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device)
    results, failed = [], 0
    for spec in fastattn.methods():
        if spec.kind != "sequence":
            continue
        try:
            r = check(spec, args.device)
        except Exception as exc:  # report and go on
            r = {"name": spec.name, "ok": False, "error": "".join(traceback.format_exception_only(exc)).strip()}
        failed += not r["ok"]
        results.append(r)
        print(f"{r['name']:<20} ok={r['ok']} rel_err={r.get('rel_err', float('nan')):.2e} {r.get('error', '')}", flush=True)
    perf = []
    for n in map(int, args.lengths.split(",")):
        for impl in ["sdpa", "memory_efficient", "flash", "naive"]:
            if impl == "naive" and n > 16384:
                continue
            for causal in (False, True):
                case = Case(impl, n=n, b=1, h=8, e=64, causal=causal, mode="fwdbwd", device=args.device, dtype="bfloat16", threads=8)
                try:
                    t = time_case(case, warmup=1, repeats=5)["median_s"]
                    mem = peak_memory_mb(case)
                except Exception as exc:
                    t, mem = float("nan"), float("nan")
                    print("  failed:", impl, n, exc)
                perf.append({"impl": impl, "n": n, "causal": causal, "ms": t * 1e3, "peak_mb": mem})
                print(f"  n={n:>6} causal={causal!s:<5} {impl:<17} {t * 1e3:9.2f} ms  peak {mem:9.1f} MiB", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "device_check.json").write_text(json.dumps({"checks": results, "perf": perf}, indent=1))
    print(f"{failed} of {len(results)} mechanisms failed on {args.device}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
