"""The q, k, v the approximation-error section measures on.

* ``trained`` -- captured from a trained model: a small softmax :class:`~fastattn.bench.tasks.TinyTransformer`
  is trained on MQAR (non-causal, at the error section's own length) and the queries, keys and values
  entering its last attention layer are read on fresh sequences. These are the inputs that matter: peaked
  rows where the model retrieves, broad rows elsewhere, values with a mean and a few large channels.
* ``structured`` -- synthetic, peaked: each query is a scaled copy of one random key plus noise (row
  entropy well below uniform at every length) and the values have a non-zero mean (a random offset per
  channel, as the values of trained layers have), so that "output the mean of v" and "output zeros"
  are different baselines.
* ``gaussian`` -- i.i.d. normal q, k, v. Kept for comparison only: the exact output is then an average
  of many random vectors, close to the mean of v, and the figure ranks nothing (the report says so).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["gaussian_inputs", "peaked_inputs", "structured_inputs", "TrainedInputs", "trained_inputs"]


def gaussian_inputs(b: int, h: int, n: int, e: int, g: torch.Generator) -> tuple[Tensor, ...]:
    return tuple(torch.randn(b, h, n, e, generator=g) for _ in range(3))


def peaked_inputs(b: int, h: int, n: int, e: int, g: torch.Generator) -> tuple[Tensor, ...]:
    """Queries that copy one random key each, plus noise; the gain puts that key's score about
    ``log(n) + 2`` above the others (scale ``e ** -0.5``), so most of each row's mass sits on it."""
    k = torch.randn(b, h, n, e, generator=g)
    v = torch.randn(b, h, n, e, generator=g)
    target = torch.randint(0, n, (b, h, n), generator=g)
    gain = (math.log(n) + 2.0) / math.sqrt(e)
    q = gain * torch.gather(k, 2, target[..., None].expand(b, h, n, e)) + 0.3 * torch.randn(b, h, n, e, generator=g)
    return q, k, v


def structured_inputs(b: int, h: int, n: int, e: int, g: torch.Generator, value_mean: float = 1.0) -> tuple[Tensor, ...]:
    """:func:`peaked_inputs` with values ``mu + noise``: ``mu`` one random vector per head of norm about
    ``value_mean * sqrt(e)``, the same for every position."""
    q, k, v = peaked_inputs(b, h, n, e, g)
    mu = value_mean * torch.randn(b, h, 1, e, generator=g)
    return q, k, v + mu


@dataclass
class TrainedInputs:
    """Attention inputs captured from a trained softmax model, with how that model was trained."""

    q: Tensor
    k: Tensor
    v: Tensor
    info: dict[str, Any] = field(default_factory=dict)


def _last_layer_inputs(model: nn.Module, x: Tensor, layer: int) -> tuple[Tensor, Tensor, Tensor]:
    """Heads-first q, k, v ``(B, H, N, E)`` entering attention layer ``layer`` of ``model`` on ``x``
    (the projections of that layer's normalised input, exactly as the layer computes them)."""
    captured: dict[str, Tensor] = {}
    att = model.attn[layer]

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured["x"] = args[0] if args else kwargs["query"]

    handle = att.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model.hidden(x)
    finally:
        handle.remove()
    h = captured["x"]
    b, n, _ = h.shape

    def heads(t: Tensor, count: int) -> Tensor:
        return t.view(b, n, count, -1).transpose(1, 2).contiguous()

    with torch.no_grad():
        q = heads(att.q_proj(h), att.num_heads)
        k = heads(att.k_proj(h), att.num_kv_heads)
        v = heads(att.v_proj(h), att.num_kv_heads)
    return q, k, v


def trained_inputs(cfg: Any, length: int, steps: int, batch: int = 2, budget_s: float = 120.0,
                   vocab: int = 64, pairs: int = 4) -> TrainedInputs:
    """Train a softmax :class:`TinyTransformer` (the task section's shape: ``cfg.task_width``,
    ``cfg.task_layers``, ``cfg.task_heads``) on non-causal MQAR at ``length`` (``pairs`` key-value pairs
    from a vocabulary of ``vocab``) for ``steps`` steps (or ``budget_s`` seconds), then capture its last
    layer's q, k, v on ``batch`` fresh sequences."""
    from ..registry import get_method
    from .tasks import mqar_batch, train_task

    tc = replace(cfg.mqar, length=length, steps=steps, budget_s=budget_s, vocab=vocab,
                 pairs=max(1, min(pairs, vocab // 2 - 1, length // 4)), eval_batches=2)
    sub = replace(cfg, mqar=tc)
    t0 = time.perf_counter()
    row, model = train_task(sub, get_method("softmax"), "mqar", causal=False, return_model=True)
    g = torch.Generator().manual_seed(cfg.seed + 20_000)
    x, _ = mqar_batch(batch, length, tc.pairs, tc.vocab, g)
    model = model.cpu().double().eval()
    q, k, v = _last_layer_inputs(model, x, len(model.attn) - 1)
    info = {
        "task": "mqar (non-causal)", "length": length, "pairs": tc.pairs, "vocab": tc.vocab, "steps": row["steps"],
        "steps_planned": steps, "accuracy": row["accuracy"], "majority": row.get("majority"),
        "chance": row.get("chance"), "layer": len(model.attn), "layers": len(model.attn),
        "heads": q.shape[1], "head_dim": q.shape[-1], "batch": batch, "train_s": time.perf_counter() - t0,
    }
    return TrainedInputs(q.float(), k.float(), v.float(), info)
