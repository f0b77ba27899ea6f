"""Decode time per token of a transformers model, after a short and a long prompt: is it flat?

A Llama-architecture model built from config (random weights; 4 layers, hidden 256, 4 query / 2 key-value
heads of 64) decodes ``--tokens`` tokens one at a time with its cache after prompts of 128 and 4096 tokens.
Variants, side by side in one run:

* ``softmax``: transformers' sdpa attention with its KV cache (grows with the prompt);
* ``register-linear``: ``fastattn.hf.register(method="linear")`` -- an attention *function*: the cache
  hands it every past key and value, so each token re-scans the prefix;
* ``linearize-linear`` / ``linearize-hedgehog``: ``fastattn.hf.linearize`` -- fastattn's constant-size
  state in the cache (``FastattnStateLayer``): O(1) per token; ``linearize-hedgehog-w64``: Hedgehog with a
  64-key softmax window (LoLCATs), whose state is the linear state plus a 64-key ring.

The figure of merit is the ratio of the median per-token time at 4096 to that at 128 (flat: <= 1.5).

    python benchmarks/hf_decode.py [--tokens 32] [--out benchmarks/results/hf_decode.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

import fastattn.hf as fh


def build(variant: str) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192)
    attn = "sdpa"
    if variant == "register-linear":
        attn = fh.register("bench-linear", "linear")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation=attn).eval()
    if variant.startswith("linearize-"):
        method, _, window = variant.split("-", 1)[1].partition("-w")
        fh.linearize(model, method, **({"window": int(window)} if window else {}))
    return model


@torch.no_grad()
def per_token(model: torch.nn.Module, prompt: int, tokens: int) -> list[float]:
    ids = torch.randint(0, 1000, (1, prompt), generator=torch.Generator().manual_seed(prompt))
    out = model(input_ids=ids, use_cache=True)
    cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    times = []
    for _ in range(tokens):
        t0 = time.perf_counter()
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        times.append(time.perf_counter() - t0)
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompts", default="128,4096")
    ap.add_argument("--variants", default="softmax,register-linear,linearize-linear,linearize-hedgehog,linearize-hedgehog-w64")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/hf_decode.json")
    ap.add_argument("--note", default="shared with other jobs: compare ratios, not absolute times")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    prompts = [int(p) for p in args.prompts.split(",")]
    rows = {}
    for variant in args.variants.split(","):
        model = build(variant)
        per_token(model, 16, 4)  # warm-up
        med = {p: statistics.median(per_token(model, p, args.tokens)) for p in prompts}
        ratio = med[prompts[-1]] / med[prompts[0]]
        rows[variant] = {"ms_per_token": {str(p): 1e3 * t for p, t in med.items()}, "ratio": ratio}
        print(f"{variant:<20} " + "  ".join(f"{p}: {1e3 * t:7.2f} ms" for p, t in med.items())
              + f"  ratio {prompts[-1]}/{prompts[0]}: {ratio:.2f}", flush=True)
    result = {
        "machine": f"{platform.machine()} CPU, {args.threads} threads ({args.note})",
        "command": "python benchmarks/hf_decode.py " + " ".join(sys.argv[1:]),
        "torch": torch.__version__, "transformers": transformers.__version__, "tokens": args.tokens,
        "statistic": "median per-token decode time", "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
