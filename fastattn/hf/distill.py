"""``fastattn.hf.distill``: attention transfer into a linearized model, then optional fine-tuning.

Stage 1, attention transfer (Hedgehog, Zhang et al. 2024, arXiv:2402.04347, section 4; LoLCATs' first
stage): every swapped layer sees the *original* model's hidden states -- its output is exact softmax
attention of its own ``q, k, v`` -- and its learned parts are trained to mimic softmax there: the
mechanism's ``mimicry_loss`` where it has one and ``mimics_weights`` (Hedgehog: KL divergence between the
softmax weights and the feature-map weights, row by row), else the mean squared error between its output and
softmax's (LoLCATs, and Hedgehog with a softmax window by default). Only the
fastattn parameters train; the model's weights stay frozen. Layers are independent in this stage, so one
forward trains them all.

Stage 2, fine-tuning (optional, ``finetune_steps > 0``): the model runs linearized end to end and a loss
(``finetune_loss(model, batch)``, default: the model's own language-model loss) trains the chosen
parameters (``train="fastattn"``: the feature maps; ``"attention"``: also the swapped layers' projections;
``"all"``) -- this repairs the errors that compound across layers.
"""

from __future__ import annotations

import itertools
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

__all__ = ["distill", "DistillReport", "transfer_mode"]


@dataclass
class DistillReport:
    """What :func:`distill` did: the losses per step of each stage and their wall-clock time."""

    transfer_losses: list[float] = field(default_factory=list)
    finetune_losses: list[float] = field(default_factory=list)
    transfer_seconds: float = 0.0
    finetune_seconds: float = 0.0
    trained_parameters: int = 0

    def summary(self) -> str:
        def ends(xs: list[float]) -> str:
            return f"{xs[0]:.4f} -> {xs[-1]:.4f} in {len(xs)} steps" if xs else "not run"

        return (f"attention transfer: {ends(self.transfer_losses)} ({self.transfer_seconds:.0f} s); "
                f"fine-tuning: {ends(self.finetune_losses)} ({self.finetune_seconds:.0f} s); "
                f"{self.trained_parameters} trained parameters")


def _cores(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    return [(m, m.fastattn_core) for m in model.modules() if getattr(m, "fastattn_core", None) is not None]


class transfer_mode:
    """Context manager: linearized layers output exact softmax attention and store their transfer loss
    in ``module.fastattn_transfer_loss`` (see :func:`transfer_loss`)."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = [m for m, _ in _cores(model)]

    def __enter__(self) -> "transfer_mode":
        for m in self.modules:
            m.fastattn_transfer = True
            m.fastattn_transfer_loss = None
        return self

    def __exit__(self, *exc: Any) -> None:
        for m in self.modules:
            m.fastattn_transfer = False
            m.fastattn_transfer_loss = None
            m.fastattn_captured = None

    def loss(self) -> Tensor:
        losses = [m.fastattn_transfer_loss for m in self.modules if m.fastattn_transfer_loss is not None]
        if not losses:
            raise ValueError("no linearized layer ran in this forward")
        return torch.stack(losses).mean()


def transfer_loss(core: nn.Module, q: Tensor, k: Tensor, v: Tensor, pad: Tensor | None, causal: bool,
                  scale: float | None, with_loss: bool = True) -> tuple[Tensor | None, Tensor]:
    """The transfer loss of one layer (None unless ``with_loss``) and the softmax output it passes on
    (``(B, H, L, Ev)``)."""
    import fastattn

    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    with torch.no_grad():
        teacher = fastattn.attention(q, k, v, "softmax", key_padding_mask=pad, is_causal=causal, scale=scale)
    return (layer_loss(core, q, k, v, pad, causal, scale, teacher) if with_loss else None), teacher


def layer_loss(core: nn.Module, q: Tensor, k: Tensor, v: Tensor, pad: Tensor | None, causal: bool,
               scale: float | None, teacher: Tensor | None = None) -> Tensor:
    """One layer's transfer loss: its ``mimicry_loss`` (KL of softmax weights to its own) where the
    mechanism has one and mimics weights, else the squared error of its output against softmax's (``teacher``)."""
    import fastattn
    from fastattn.core.checks import build_mask, repeat_kv

    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if hasattr(core, "mimicry_loss") and getattr(core, "mimics_weights", True):
        kk = repeat_kv(k, q.shape[1] // k.shape[1])
        qf, kf = core.upcast(q, kk)
        return core.mimicry_loss(qf, kf, build_mask(qf, kf, pad, None, causal), scale)
    if teacher is None:
        with torch.no_grad():
            teacher = fastattn.attention(q, k, v, "softmax", key_padding_mask=pad, is_causal=causal, scale=scale)
    student = core.run(q.detach(), k.detach(), v.detach(), key_padding_mask=pad, is_causal=causal, scale=scale)
    err = (student.float() - teacher.float()) ** 2
    if pad is not None and q.shape[2] == k.shape[2]:
        err = err * (~pad)[:, None, :, None]  # padded queries' outputs are unspecified
    return err.mean()


def _capture(model: nn.Module, mode: transfer_mode, stream: Any, n: int,
             progress: bool | Callable[[str], None]) -> list[list[tuple[nn.Module, tuple]]]:
    """Run ``n`` batches through the model (softmax passed on) recording each linearized layer's
    ``q, k, v`` and mask: per batch, a list of (core, inputs)."""
    out = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(n):
            for m in mode.modules:
                m.fastattn_captured = []
            model(**next(stream))
            out.append([(m.fastattn_core, m.fastattn_captured[0]) for m in mode.modules if m.fastattn_captured])
            for m in mode.modules:
                m.fastattn_captured = None
    _log(progress, f"[transfer] recorded the attention inputs of {n} batches in {time.perf_counter() - t0:.0f} s")
    return out


def _default_lm_loss(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    labels = batch["input_ids"].clone()
    if batch.get("attention_mask") is not None:
        labels[batch["attention_mask"] == 0] = -100
    return model(**batch, labels=labels).loss


def _trainable(model: nn.Module, train: str) -> list[nn.Parameter]:
    if train == "all":
        return list(model.parameters())
    params: list[nn.Parameter] = []
    for m, core in _cores(model):
        params += list((m if train == "attention" else core).parameters())
    if train not in ("fastattn", "attention"):
        raise ValueError(f"train must be 'fastattn', 'attention' or 'all', got {train!r}")
    return params


def _log(progress: bool | Callable[[str], None], msg: str) -> None:
    if callable(progress):
        progress(msg)
    elif progress:
        print(msg, file=sys.stderr, flush=True)


def distill(
    model: nn.Module,
    batches: Iterable[dict[str, Any]],
    *,
    steps: int = 100,
    lr: float = 1e-2,
    finetune_steps: int = 0,
    finetune_lr: float = 1e-4,
    finetune_loss: Callable[[nn.Module, dict[str, Any]], Tensor] | None = None,
    train: str = "fastattn",
    max_seconds: float | None = None,
    finetune_max_seconds: float | None = None,
    progress: bool | Callable[[str], None] = True,
    log_every: int = 10,
    capture: int = 0,
) -> DistillReport:
    """Train a :func:`~fastattn.hf.linearize`-d model's attention to mimic the softmax it replaced.

    Args:
        model: a linearized model (its swapped layers have ``fastattn_core``).
        batches: keyword-argument dicts for ``model(**batch)`` (``input_ids``, ``attention_mask``), cycled.
        steps: attention-transfer steps (stage 1; 0 skips it), at learning rate ``lr`` (Adam).
        finetune_steps: fine-tuning steps (stage 2; 0 skips it), at ``finetune_lr``, minimising
            ``finetune_loss(model, batch)`` (default: the language-model loss on ``input_ids``) over the
            parameters named by ``train`` (``"fastattn"``, ``"attention"`` or ``"all"``).
        max_seconds, finetune_max_seconds: wall-clock budgets that end a stage early.
        progress: print progress to stderr (True), not at all (False), or hand lines to a callable.
        log_every: steps between progress lines.
        capture: stage 1 records the attention inputs (``q, k, v``, masks) of every linearized layer for this
            many batches (one model forward each, no gradients) and then trains on them without running
            the model -- the layers are independent in this stage, so this is the same objective at a
            fraction of the cost. 0: run the model on every step.

    Returns:
        a :class:`DistillReport`. The model is left in eval mode with its parameters' ``requires_grad`` as
        they were. Training runs in eval mode (no dropout anywhere), as distillation does.
    """
    cores = _cores(model)
    if not cores:
        raise ValueError("the model has no linearized layers: call fastattn.hf.linearize(model, ...) first")
    report = DistillReport()
    was = {p: p.requires_grad for p in model.parameters()}
    model.eval()
    stream = itertools.cycle(batches)
    try:
        core_params = [p for _, c in cores for p in c.parameters()]
        if steps > 0 and core_params:
            for p in model.parameters():
                p.requires_grad_(False)
            for p in core_params:
                p.requires_grad_(True)
            report.trained_parameters = sum(p.numel() for p in core_params)
            opt = torch.optim.Adam(core_params, lr=lr)
            t0 = time.perf_counter()
            with transfer_mode(model) as mode:
                captured = _capture(model, mode, stream, capture, progress) if capture else None
                for i in range(steps):
                    opt.zero_grad(set_to_none=True)
                    if captured is None:
                        model(**next(stream))
                        loss = mode.loss()
                    else:  # the recorded inputs of every layer: no model forward
                        recorded = captured[i % len(captured)]
                        loss = torch.stack([layer_loss(core, *inputs) for core, inputs in recorded]).mean()
                    loss.backward()
                    opt.step()
                    report.transfer_losses.append(float(loss.detach()))
                    elapsed = time.perf_counter() - t0
                    if (i + 1) % log_every == 0 or i == 0 or i + 1 == steps:
                        _log(progress, f"[transfer {i + 1}/{steps}] loss {float(loss.detach()):.4f}  {elapsed:.0f} s")
                    if max_seconds is not None and elapsed > max_seconds:
                        _log(progress, f"[transfer] time budget of {max_seconds:.0f} s reached after {i + 1} steps")
                        break
            report.transfer_seconds = time.perf_counter() - t0
        if finetune_steps > 0:
            params = _trainable(model, train)
            for p in model.parameters():
                p.requires_grad_(False)
            for p in params:
                p.requires_grad_(True)
            report.trained_parameters = max(report.trained_parameters, sum(p.numel() for p in params))
            opt = torch.optim.Adam(params, lr=finetune_lr)
            loss_fn = finetune_loss or _default_lm_loss
            t0 = time.perf_counter()
            for i in range(finetune_steps):
                batch = next(stream)
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model, batch)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                report.finetune_losses.append(float(loss.detach()))
                elapsed = time.perf_counter() - t0
                if (i + 1) % log_every == 0 or i == 0 or i + 1 == finetune_steps:
                    _log(progress,
                         f"[finetune {i + 1}/{finetune_steps}] loss {float(loss.detach()):.4f}  {elapsed:.0f} s")
                if finetune_max_seconds is not None and elapsed > finetune_max_seconds:
                    _log(progress,
                         f"[finetune] time budget of {finetune_max_seconds:.0f} s reached after {i + 1} steps")
                    break
            report.finetune_seconds = time.perf_counter() - t0
    finally:
        for p, flag in was.items():
            p.requires_grad_(flag)
        model.eval()
    return report
