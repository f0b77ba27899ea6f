"""Synthetic tasks generated on the fly, and the small models trained on them for a fixed budget.

* **MQAR**, multi-query associative recall (Arora et al., 2023, "Zoology", arXiv:2312.04927): the
  sequence starts with ``D`` key-value pairs ``k1 v1 k2 v2 ...`` (distinct keys from the first half of
  the vocabulary, distinct values from the second half); in the rest of the sequence each key appears
  once more, at even offsets drawn from Zoology's power law (most queries close to the pairs), other
  positions hold token 0. The target at each query position is that key's value; no other position
  is scored. As in Zoology, the value is never written after the query in the input, so the same
  sequences serve causal models and non-causal ones (a mechanism without a causal form).
* **ListOps** (Nangia & Bowman, 2018; the Long Range Arena generator, Tay et al., 2020,
  arXiv:2011.04006): nested lists of digits under ``[MIN``, ``[MAX``, ``[MED`` (median, truncated
  to an integer) and ``[SM`` (sum modulo 10), closed by ``]``; a node is a leaf digit with probability
  0.75 (always at ``max_depth``), else an operator over 2..``max_args`` sub-trees; sequences outside
  ``[min_length, length]`` tokens are drawn again. The label (10 classes) is the value of the tree.
  The parentheses of LRA's text form carry no information and are left out.

The model: token and learned position embeddings, ``layers`` pre-norm blocks of
:class:`fastattn.MultiheadAttention` (the mechanism under test) and a 4x MLP, a final norm and a head.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from typing import Any

import torch
from torch import Tensor, nn

from ..layers import MultiheadAttention
from ..registry import MethodSpec, get_method
from .config import Config, TaskConfig

__all__ = [
    "mqar_batch", "listops_sample", "listops_batch", "listops_evaluate", "ListOpsVocab",
    "TinyTransformer", "train_task", "run_tasks",
]


# ---- MQAR -----------------------------------------------------------------------------------------------
def mqar_batch(
    batch: int, length: int, pairs: int, vocab: int, generator: torch.Generator, power_a: float = 0.01
) -> tuple[Tensor, Tensor]:
    """``(inputs, targets)``, both ``(batch, length)`` long; targets are -100 except at queries."""
    half = vocab // 2
    if pairs > half - 1:
        raise ValueError(f"MQAR needs pairs ({pairs}) <= vocab // 2 - 1 ({half - 1}) distinct keys")
    space = (length - 2 * pairs) // 2
    if space < pairs:
        raise ValueError(f"MQAR length {length} too short for {pairs} pairs and their queries")
    keys = torch.stack([torch.randperm(half - 1, generator=generator)[:pairs] + 1 for _ in range(batch)])
    values = torch.stack([torch.randperm(vocab - half, generator=generator)[:pairs] + half for _ in range(batch)])
    inputs = torch.zeros(batch, length, dtype=torch.long)
    targets = torch.full((batch, length), -100, dtype=torch.long)
    inputs[:, 0:2 * pairs:2] = keys
    inputs[:, 1:2 * pairs:2] = values
    p = power_a * torch.arange(1, space + 1, dtype=torch.float64) ** (power_a - 1)
    slots = torch.stack([torch.multinomial(p, pairs, replacement=False, generator=generator) for _ in range(batch)])
    pos = 2 * pairs + 2 * slots
    inputs.scatter_(1, pos, keys)
    targets.scatter_(1, pos, values)
    return inputs, targets


# ---- ListOps --------------------------------------------------------------------------------------------
class ListOpsVocab:
    PAD, DIGIT0 = 0, 1                 # digits d -> 1 + d
    MIN, MAX, MED, SM, END = 11, 12, 13, 14, 15
    OPS = (MIN, MAX, MED, SM)
    SIZE = 16
    NAMES = {MIN: "[MIN", MAX: "[MAX", MED: "[MED", SM: "[SM", END: "]"}


def _apply(op: int, args: list[int]) -> int:
    if op == ListOpsVocab.MIN:
        return min(args)
    if op == ListOpsVocab.MAX:
        return max(args)
    if op == ListOpsVocab.MED:
        return int(statistics.median(args))
    return sum(args) % 10


def _tree(rng: random.Random, depth: int, max_depth: int, max_args: int, out: list[int]) -> int:
    """Append the tokens of a random tree to ``out``; return its value (LRA's generate_tree)."""
    if depth >= max_depth or rng.random() > 0.25:
        d = rng.randrange(10)
        out.append(ListOpsVocab.DIGIT0 + d)
        return d
    op = rng.choice(ListOpsVocab.OPS)
    out.append(op)
    args = [_tree(rng, depth + 1, max_depth, max_args, out) for _ in range(rng.randint(2, max_args))]
    out.append(ListOpsVocab.END)
    return _apply(op, args)


def listops_sample(rng: random.Random, cfg: TaskConfig) -> tuple[list[int], int]:
    """One (tokens, label) with ``cfg.min_length <= len(tokens) <= cfg.length``."""
    for _ in range(100_000):
        tokens: list[int] = []
        value = _tree(rng, 1, cfg.max_depth, cfg.max_args, tokens)
        if cfg.min_length <= len(tokens) <= cfg.length:
            return tokens, value
    raise ValueError(
        f"ListOps: no tree with {cfg.min_length}..{cfg.length} tokens at max_depth={cfg.max_depth}, "
        f"max_args={cfg.max_args}"
    )


def listops_batch(rng: random.Random, cfg: TaskConfig, batch: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(tokens (B, length) right-padded with 0, labels (B,), padding mask (B, length) True = pad)``."""
    x = torch.zeros(batch, cfg.length, dtype=torch.long)
    y = torch.zeros(batch, dtype=torch.long)
    for i in range(batch):
        tokens, label = listops_sample(rng, cfg)
        x[i, :len(tokens)] = torch.tensor(tokens)
        y[i] = label
    return x, y, x == ListOpsVocab.PAD


def listops_evaluate(tokens: list[int]) -> int:
    """Evaluate a token sequence with an explicit stack (independent of the generator's recursion)."""
    stack: list[Any] = []
    for t in tokens:
        if t == ListOpsVocab.PAD:
            break
        if t in ListOpsVocab.OPS:
            stack.append([t])
        elif t == ListOpsVocab.END:
            op, *args = stack.pop()
            value = _apply(op, args)
            if stack:
                stack[-1].append(value)
            else:
                stack.append(value)
        else:
            d = t - ListOpsVocab.DIGIT0
            if stack and isinstance(stack[-1], list):
                stack[-1].append(d)
            else:
                stack.append(d)
    if len(stack) != 1 or isinstance(stack[0], list):
        raise ValueError("malformed ListOps sequence")
    return int(stack[0])


# ---- model ----------------------------------------------------------------------------------------------
class TinyTransformer(nn.Module):
    """Embeddings, ``layers`` pre-norm blocks (fastattn attention + MLP), final norm, linear head."""

    def __init__(self, vocab: int, classes: int, max_len: int, width: int, layers: int, heads: int,
                 method: str, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(max_len, width)
        self.norms1 = nn.ModuleList(nn.LayerNorm(width) for _ in range(layers))
        self.norms2 = nn.ModuleList(nn.LayerNorm(width) for _ in range(layers))
        heads = getattr(get_method(method).cls, "fixed_heads", None) or heads  # mega: one head
        self.attn = nn.ModuleList(
            MultiheadAttention(width, heads, method, batch_first=True, generator=generator) for _ in range(layers)
        )
        self.mlp = nn.ModuleList(
            nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)) for _ in range(layers)
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def hidden(self, x: Tensor, is_causal: bool = False, key_padding_mask: Tensor | None = None) -> Tensor:
        h = self.tok(x) + self.pos(torch.arange(x.shape[1], device=x.device))
        for n1, att, n2, mlp in zip(self.norms1, self.attn, self.norms2, self.mlp):
            h = h + att(n1(h), is_causal=is_causal, key_padding_mask=key_padding_mask)[0]
            h = h + mlp(n2(h))
        return self.norm(h)

    def aux_loss(self) -> Tensor:
        return sum((a.aux_loss for a in self.attn), torch.zeros(()))


def _task_model(cfg: Config, spec: MethodSpec, vocab: int, classes: int, length: int) -> TinyTransformer:
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed) if spec.randomized else None
    return TinyTransformer(vocab, classes, length, cfg.task_width, cfg.task_layers, cfg.task_heads, spec.name, gen)


def train_task(cfg: Config, spec: MethodSpec, task: str, cap_s: float | None = None, *,
               causal: bool | None = None, return_model: bool = False) -> Any:
    """Train a fresh model on ``task`` for the configured steps (or wall-clock cap); return its row
    (accuracy on fresh batches, with the ``majority`` class's and ``chance`` accuracy on the same
    batches), and with ``return_model`` also the trained model. ``causal``: MQAR's form (default: the
    causal one where the mechanism has it)."""
    tc: TaskConfig = getattr(cfg, task)
    labels: list[Tensor] = []  # the scored targets of the evaluation batches (for the majority class)
    cap = tc.budget_s if cap_s is None else min(tc.budget_s, cap_s)
    torch.set_num_threads(cfg.threads)
    device = cfg.device
    note = ""
    if task == "mqar":
        causal = spec.causal if causal is None else causal and spec.causal
        if not causal and spec.causal is False:
            note = "non-causal (the mechanism has no causal form)"
        model = _task_model(cfg, spec, tc.vocab, tc.vocab, tc.length).to(device)
        g = torch.Generator().manual_seed(cfg.seed + 1)
        eval_g = torch.Generator().manual_seed(cfg.seed + 10_000)

        def batch(gen: torch.Generator) -> tuple[Tensor, ...]:
            x, y = mqar_batch(tc.batch, tc.length, tc.pairs, tc.vocab, gen)
            return x.to(device), y.to(device)

        def loss_and_hits(x: Tensor, y: Tensor) -> tuple[Tensor, int, int]:
            logits = model.head(model.hidden(x, is_causal=causal))
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
            scored = y != -100
            hits = int((logits.argmax(-1)[scored] == y[scored]).sum())
            labels.append(y[scored].cpu())
            return loss, hits, int(scored.sum())

        train_batch, eval_batch = (lambda: batch(g)), (lambda: batch(eval_g))
        chance = 1.0 / (tc.vocab - tc.vocab // 2)
    elif task == "listops":
        causal = False
        if not spec.padding:
            note = "padding attended (the mechanism cannot mask padding keys)"
        model = _task_model(cfg, spec, ListOpsVocab.SIZE, 10, tc.length).to(device)
        rng, eval_rng = random.Random(cfg.seed + 1), random.Random(cfg.seed + 10_000)

        def lbatch(r: random.Random) -> tuple[Tensor, ...]:
            x, y, pad = listops_batch(r, tc, tc.batch)
            return x.to(device), y.to(device), pad.to(device)

        def loss_and_hits(x: Tensor, y: Tensor, pad: Tensor) -> tuple[Tensor, int, int]:
            h = model.hidden(x, key_padding_mask=pad if spec.padding else None)
            keep = (~pad).unsqueeze(-1).to(h.dtype)
            logits = model.head((h * keep).sum(1) / keep.sum(1).clamp_min(1))
            loss = nn.functional.cross_entropy(logits, y)
            labels.append(y.cpu())
            return loss, int((logits.argmax(-1) == y).sum()), y.numel()

        train_batch, eval_batch = (lambda: lbatch(rng)), (lambda: lbatch(eval_rng))
        chance = 0.1
    else:
        raise ValueError(f"unknown task {task!r}")
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=tc.lr, total_steps=max(tc.steps, 2), pct_start=0.1)
    model.train()
    start = time.perf_counter()
    steps, losses = 0, []
    for steps in range(1, tc.steps + 1):
        loss, _, _ = loss_and_hits(*train_batch())
        total = loss + model.aux_loss().to(loss.device)
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"training loss became {losses[-1]} at step {steps}")
        if time.perf_counter() - start > cap:
            break
    train_s = time.perf_counter() - start
    model.eval()
    hits = count = 0
    labels.clear()
    with torch.no_grad():
        for _ in range(tc.eval_batches):
            _, h, c = loss_and_hits(*eval_batch())
            hits, count = hits + h, count + c
    tail = losses[-max(len(losses) // 10, 1):]
    scored = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    majority = float(torch.bincount(scored).max()) / scored.numel() if scored.numel() else float("nan")
    row = {
        "task": task, "method": spec.name, "status": "ok", "accuracy": hits / max(count, 1), "chance": chance,
        "majority": majority,
        "steps": steps, "steps_planned": tc.steps, "train_s": train_s, "final_loss": sum(tail) / len(tail),
        "causal": causal, "length": tc.length, "note": note,
    }
    if steps < tc.steps:
        row["note"] = (note + "; " if note else "") + f"cut at {steps}/{tc.steps} steps by the {cap:.0f} s cap"
    return (row, model) if return_model else row


def run_tasks(cfg: Config, specs: list[MethodSpec], progress) -> list[dict]:
    from .measure import causal_only
    from .suite import Budget, _err

    budget = Budget(cfg.section_budget_s.get("tasks", float("inf")))
    rows = []
    # softmax first: every other accuracy is read beside it
    if cfg.task_methods is not None:
        specs = [s for s in specs if s.name in cfg.task_methods]
    ordered = sorted(specs, key=lambda s: s.name != "softmax")
    runs = [(task, spec) for spec in ordered for task in ("mqar", "listops")]
    for i, (task, spec) in enumerate(runs):
        reason = budget.exhausted()
        if reason:
            rows.append({"task": task, "method": spec.name, "status": "skipped", "reason": reason})
            continue
        if task == "listops" and causal_only(spec.name):
            rows.append({"task": task, "method": spec.name, "status": "skipped",
                         "reason": "a causal-only layer (the task is bidirectional)"})
            continue
        progress(f"task {task} {spec.name}")
        # an equal share of what is left, so a slow mechanism cannot starve the others
        share = (budget.seconds - budget.spent) / (len(runs) - i) * 0.9
        try:
            rows.append(train_task(cfg, spec, task, cap_s=share))
        except Exception as exc:
            rows.append({"task": task, "method": spec.name, "status": "error", "error": _err(exc)})
    return rows
