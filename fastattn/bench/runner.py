"""Run every section of a benchmark, with progress output, and write the results folder."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .. import __version__
from ..registry import MethodSpec
from .config import OUTPUT_NORMALISED, Config, feature_option
from .report import write_plots, write_report
from .suite import available_peers, run_error, run_memory, run_peers, run_speed
from .tasks import run_tasks

__all__ = ["run_bench", "machine_info"]


def machine_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(), "machine": platform.machine(), "processor": _cpu_name(),
        "cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


class _Progress:
    """rich progress when available (a live line on terminals), plain prints otherwise."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.start = time.perf_counter()
        self._progress = None
        self._task = None
        if not quiet:
            try:
                from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

                self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                          transient=True)
            except ImportError:
                pass

    def __enter__(self) -> "_Progress":
        if self._progress is not None:
            self._progress.start()
            self._task = self._progress.add_task("starting", total=None)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(self, text: str) -> None:
        if self.quiet:
            return
        if self._progress is not None and self._progress.console.is_terminal:
            self._progress.update(self._task, description=text)
        else:
            print(f"[{time.perf_counter() - self.start:6.1f}s] {text}", flush=True)

    def log(self, text: str) -> None:
        if self.quiet:
            return
        if self._progress is not None:
            self._progress.console.print(f"[{time.perf_counter() - self.start:6.1f}s] {text}", highlight=False)
        else:
            print(f"[{time.perf_counter() - self.start:6.1f}s] {text}", flush=True)


def _count(rows: list[dict]) -> str:
    ok = sum(r.get("status") == "ok" for r in rows)
    sk = sum(r.get("status") == "skipped" for r in rows)
    er = sum(r.get("status") == "error" for r in rows)
    return f"{ok} measured, {sk} skipped, {er} failed"


def run_bench(cfg: Config, specs: list[MethodSpec], out: Path, *, command: str = "fastattn bench",
              notes: list[str] | None = None, quiet: bool = False,
              on_section: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the configured sections for ``specs`` and write ``results.json``, ``report.md`` and plots."""
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    res: dict[str, Any] = {
        "meta": {
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": command, "fastattn": __version__, "torch": torch.__version__,
            "python": platform.python_version(), "machine": machine_info(cfg.device),
            "config": cfg.to_dict(), "notes": list(notes or []),
            "output_normalised": [s.name for s in specs if s.name in OUTPUT_NORMALISED],
        },
        "methods": [
            {"name": s.name, "family": s.family, "complexity": s.complexity, "functional": s.functional,
             "causal": s.causal, "decoding": s.decoding, "padding": s.padding, "exact": s.exact,
             "weights": s.weights, "randomized": s.randomized, "options": _jsonable(s.options),
             "feature_option": feature_option(s), "time_growth": s.time_growth, "memory_growth": s.memory_growth}
            for s in specs
        ],
        "speed": [], "error": [], "error_inputs": [], "tasks": [], "peers": [],
    }
    with _Progress(quiet) as prog:
        found, peer_notes = available_peers(specs) if cfg.peers else ([], [])
        peer_impls = [f"peer:{p.name}" for p in found]
        if cfg.peers:
            prog.log(f"peers installed and matched: {[p.name for p in found] or 'none'}")
        res["speed"] = run_speed(cfg, specs, peer_impls, prog.update)
        prog.log(f"speed: {_count(res['speed'])}")
        if cfg.memory:
            run_memory(cfg, res["speed"], prog.update)
            prog.log(f"memory: {sum('peak_mb' in r for r in res['speed'])} cases measured")
        if cfg.error:
            res["error"], res["error_inputs"] = run_error(cfg, specs, prog.update)
            prog.log(f"error: {_count(res['error'])}")
        if cfg.tasks:
            res["tasks"] = run_tasks(cfg, specs, prog.update)
            prog.log(f"tasks: {_count(res['tasks'])}")
        if cfg.peers:
            res["peers"] = peer_notes + run_peers(cfg, found, res["speed"], prog.update)
        res["meta"]["wall_s"] = time.perf_counter() - t0
        prog.update("writing the report")
        (out / "results.json").write_text(json.dumps(_jsonable(res), indent=1), encoding="utf-8")
        write_report(res, out)
        plots = write_plots(res, out)
        prog.log(f"wrote {out / 'results.json'}, {out / 'report.md'} and {len(plots)} plots "
                 f"in {res['meta']['wall_s']:.0f} s")
    return res


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return "inf" if x > 0 else None
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return repr(x)


def command_line() -> str:
    return "fastattn " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0] else "fastattn bench"
