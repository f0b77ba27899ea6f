"""What a benchmark run measures, declared as data: presets, method selection, device choice.

A :class:`Config` holds every knob of a run; :func:`preset` gives the three presets (``quick``,
``default``, ``full``) for the device at hand, and the command line overrides single fields. The
config is stored verbatim in ``results.json`` so every figure can be traced to how it was made.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..registry import MethodSpec, methods

__all__ = ["Config", "TaskConfig", "preset", "select_methods", "resolve_device", "feature_option",
           "OUTPUT_NORMALISED", "task_methods_covering_families"]


@dataclass
class TaskConfig:
    """One synthetic task: its sizes and the fixed training budget every mechanism gets."""

    length: int
    steps: int
    batch: int = 32
    lr: float = 3e-3
    eval_batches: int = 8
    budget_s: float = 120.0  # wall-clock cap of one training run (the run is cut, and marked so)
    # MQAR
    pairs: int = 8
    vocab: int = 64
    # ListOps
    max_depth: int = 4
    max_args: int = 5
    min_length: int = 16


@dataclass
class Config:
    preset: str = "default"
    methods: list[str] = field(default_factory=list)
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = field(default_factory=lambda: _cores())  # torch CPU threads: every core this process may use
    seed: int = 0
    # speed and memory
    lengths: list[int] = field(default_factory=lambda: [256, 1024, 4096])
    modes: list[str] = field(default_factory=lambda: ["fwd", "fwdbwd", "decode"])
    batch: int = 1
    heads: int = 8
    head_dim: int = 64
    causal: bool = False
    baselines: list[str] = field(default_factory=lambda: ["sdpa", "naive"])
    warmup: int = 1
    repeats: int = 5
    case_budget_s: float = 5.0       # a case whose single run is predicted longer is skipped
    memory_budget_mb: float = 4096.0  # a case predicted to need more is skipped
    memory: bool = True
    memory_modes: list[str] = field(default_factory=lambda: ["fwd", "fwdbwd"])
    memory_isolation: str = "batch"  # "case": one subprocess per case; "batch": one per method and mode
    decode_steps: int = 16  # decode cases time this many consecutive steps through the state, per step
    # approximation error
    error: bool = True
    # the inputs measured on (see fastattn.bench.inputs): q, k, v captured from a trained softmax model,
    # structured synthetic ones (peaked rows, values with a non-zero mean), i.i.d. Gaussian ones
    error_inputs: list[str] = field(default_factory=lambda: ["trained", "structured", "gaussian"])
    error_trained_length: int = 128  # MQAR length of the model the "trained" inputs are captured from
    error_trained_steps: int = 600   # its training steps (its accuracy is reported beside the errors)
    error_trained_vocab: int = 64
    error_trained_pairs: int = 4     # (with 8 pairs at length 128 the model reached 0.12 in 600 steps, with 4: 0.27)
    error_lengths: list[int] = field(default_factory=lambda: [256, 1024, 2048])
    error_features: list[int] = field(default_factory=lambda: [16, 32, 64, 128, 256])
    error_feature_length: int = 1024
    error_seeds: int = 1
    error_heads: int = 4
    # tasks and peers
    tasks: bool = True
    mqar: TaskConfig = field(default_factory=lambda: TaskConfig(length=32, steps=500, pairs=4, vocab=32))
    # one level of nesting, short lists: softmax reaches ~0.45 in 500 steps (majority class ~0.11); the
    # LRA-like setting (length 96, depth 4) left every model at the majority class within this budget
    listops: TaskConfig = field(default_factory=lambda: TaskConfig(length=48, steps=500, max_depth=3, max_args=4,
                                                                   min_length=8))
    # mechanisms trained on the tasks when no --methods was given (one or two per family; ids not
    # registered are left out); None = every selected mechanism
    task_methods: list[str] | None = None
    task_width: int = 64
    task_layers: int = 2
    task_heads: int = 4
    peers: bool = True
    # wall-clock budget per section (seconds); cases beyond it are skipped with that reason (sized so that
    # every registered id, layer-level ones beside the mha baseline included, is timed on a quiet 2-core CPU)
    section_budget_s: dict[str, float] = field(
        default_factory=lambda: {"speed": 480, "memory": 160, "error": 240, "tasks": 300, "peers": 60}
    )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# A spread over the families for the default preset's task section (the full preset trains every one).
# Kept to four so that each model gets enough of the default preset's task budget to learn the task
# (with seven, even softmax was cut at MQAR accuracy 0.21); --task-methods or --full trains more.
DEFAULT_TASK_METHODS = ("softmax", "linear", "performer", "local")


# Mechanisms whose output carries its own normalisation instead of softmax's denominator (an RMS norm
# of the output): their raw relative error measures that scale, not the approximation, so the report
# ranks them on the error after the best per-row scale (fastattn.bench.metrics.scaled_error), marked.
OUTPUT_NORMALISED = ("lightning", "transnormer")


def task_methods_covering_families(specs: list[MethodSpec], wanted: list[str] | tuple[str, ...]) -> list[str]:
    """``wanted`` (those selected) plus, for every family of ``specs`` that none of them belongs to, the
    family's first mechanism usable on the tasks: the task section then covers every family."""
    chosen = [s.name for s in specs if s.name in wanted]
    covered = {s.family for s in specs if s.name in chosen}
    for s in specs:
        if s.family not in covered:
            chosen.append(s.name)
            covered.add(s.family)
    order = [s.name for s in specs]
    return sorted(chosen, key=order.index)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device")
    return device


def preset(name: str, device: str = "cpu") -> Config:
    """The ``quick`` (< 2 min on 2 CPU cores), ``default`` (< 15 min) or ``full`` (hours) preset."""
    gpu = device.startswith("cuda")
    if name == "quick":
        return Config(
            preset="quick", device=device,
            lengths=[1024, 4096] if gpu else [256, 1024], repeats=3, case_budget_s=1.0,
            baselines=["sdpa"], memory_modes=["fwd"],
            error_lengths=[256], error_features=[16, 64], error_feature_length=256,
            error_trained_length=64, error_trained_steps=60, decode_steps=4,
            tasks=False,
            mqar=TaskConfig(length=32, steps=40, pairs=4, vocab=32, batch=16, eval_batches=2, budget_s=10),
            listops=TaskConfig(length=48, steps=40, batch=16, eval_batches=2, max_depth=3, max_args=4, min_length=8,
                               budget_s=10),
            section_budget_s={"speed": 40, "memory": 25, "error": 30, "tasks": 30, "peers": 15},
        )
    if name == "default":
        return Config(
            preset="default", device=device, task_methods=list(DEFAULT_TASK_METHODS),
            lengths=[1024, 4096, 16384] if gpu else [256, 1024, 4096],
            memory_budget_mb=_memory_budget_mb(device),
        )
    if name == "full":
        return Config(
            preset="full", device=device,
            lengths=[1024, 2048, 4096, 8192, 16384, 32768, 65536] if gpu else [256, 512, 1024, 2048, 4096, 8192, 16384],
            repeats=10, warmup=2, case_budget_s=120.0, memory_budget_mb=_memory_budget_mb(device),
            memory_isolation="case",
            error_lengths=[256, 512, 1024, 2048, 4096], error_features=[8, 16, 32, 64, 128, 256, 512],
            error_seeds=3, error_trained_length=1024, error_trained_steps=3000, error_trained_vocab=256,
            error_trained_pairs=16,
            mqar=TaskConfig(length=128, steps=3000, pairs=16, vocab=128, budget_s=1800),
            listops=TaskConfig(length=512, steps=3000, max_depth=6, max_args=6, min_length=64, budget_s=1800),
            section_budget_s={k: float("inf") for k in ("speed", "memory", "error", "tasks", "peers")},
        )
    raise ValueError(f"unknown preset {name!r}; use quick, default or full")


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _memory_budget_mb(device: str) -> float:
    """Half the free memory of the device: a case predicted to need more is skipped."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info()
        return free / 2**20 / 2
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) for line in f}
        return info["MemAvailable"] / 1024 / 2
    except (OSError, KeyError, ValueError):
        return 4096.0


def select_methods(expr: str | None) -> tuple[list[MethodSpec], list[str]]:
    """Parse ``a,b`` / ``family:kernel`` / ``all`` (comma-combinable) into sequence mechanisms (layer-level
    ones included: the speed and memory sections time their whole ``MultiheadAttention`` layer).

    Returns the selected specs (catalogue order) and notes about names that matched nothing, so a
    default list naming mechanisms not (yet) registered still works.
    """
    registered = [s for s in methods() if s.kind == "sequence"]
    by_name = {s.name: s for s in registered}
    if expr is None or expr.strip() in ("", "all"):
        return registered, []
    chosen: list[str] = []
    notes: list[str] = []
    for part in (p.strip() for p in expr.split(",")):
        if not part:
            continue
        if part == "all":
            chosen += list(by_name)
        elif part.startswith("family:"):
            fam = part.split(":", 1)[1]
            names = [s.name for s in registered if s.family == fam]
            if not names:
                notes.append(f"family {fam!r} has no registered sequence mechanism")
            chosen += names
        elif part in by_name:
            chosen.append(part)
        else:
            notes.append(f"method {part!r} is not registered (or not a sequence mechanism); left out")
    seen = set()
    specs = []
    for s in registered:
        if s.name in chosen and s.name not in seen:
            seen.add(s.name)
            specs.append(s)
    return specs, notes


_FEATURE_RE = re.compile(
    r"^(num_|nb_|n_)?(random_)?(features|feature_dim|feature_map_dim|rank|landmarks|proj_dim|projection_dim|k_proj)$"
    r"|^(num_|nb_|n_)(features|landmarks)$"
)


def feature_option(spec: MethodSpec) -> str | None:
    """The option that sets the approximation's size (random features, rank, landmarks), if any."""
    for name, default in spec.options.items():
        if isinstance(default, int) and not isinstance(default, bool) and _FEATURE_RE.match(name):
            return name
    return None
