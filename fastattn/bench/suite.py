"""The benchmark sections: speed, isolated peak memory, approximation error, peers.

Every section returns plain rows (dicts) for ``results.json``. A row has ``status`` ``"ok"``,
``"skipped"`` (with the ``reason``: a prediction over the time or memory budget, a capability the
mechanism lacks, the section's wall-clock budget) or ``"error"`` (with the ``error`` the case raised):
no case can stop the run.
"""

from __future__ import annotations

import math
import time
import traceback
from dataclasses import replace
from typing import Any, Callable

import torch

from ..core.base import build_mask
from fastattn.ops.softmax.dense import dense_attention, dense_weights
from ..registry import MethodSpec, get_method
from .config import Config, feature_option
from .inputs import gaussian_inputs, peaked_inputs, structured_inputs, trained_inputs
from .measure import Case, build, causal_only, make_mechanism, peak_memory_batch, peak_memory_mb, time_case
from .metrics import baselines, entropy, rel_error, row_kl, row_tv, scaled_error

__all__ = ["Budget", "run_speed", "run_memory", "run_error", "run_peers", "peaked_inputs", "gaussian_inputs",
           "structured_inputs"]

Progress = Callable[[str], None]


class Budget:
    """A section's wall-clock allowance."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.start = seconds, time.perf_counter()

    @property
    def spent(self) -> float:
        return time.perf_counter() - self.start

    def exhausted(self) -> str | None:
        if self.spent > self.seconds:
            return f"section time budget ({self.seconds:.0f} s) used up"
        return None


def _err(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip()[:500]


# ---- predictions ------------------------------------------------------------------------------------
def _exponents(impl: str, mode: str) -> tuple[float, float]:
    """Growth exponents in n of (time, memory): the registry's declared ``time_growth`` and
    ``memory_growth`` (2.0 where a mechanism declares none: predictions err on the side of skipping)."""
    if impl in ("sdpa", "naive", "mha"):  # mha: the softmax layer, SDPA inside
        t, m = 2.0, (2.0 if impl == "naive" else 1.0)
    elif impl.startswith("peer:"):
        return 2.0, 2.0
    else:
        spec = get_method(impl)
        t = 2.0 if spec.time_growth is None else spec.time_growth
        m = 2.0 if spec.memory_growth is None else spec.memory_growth
    if mode == "decode":  # one token: exact attention reads the whole cache, constant-state ones do not
        t, m = max(t - 1.0, 0.0), max(m - 1.0, 0.0)
    return t, m


def _first_memory_mb(case: Case) -> float:
    """A coarse a-priori memory estimate (scores matrices of quadratic-memory cases)."""
    elt = torch.finfo(getattr(torch, case.dtype)).bits // 8
    _, m = _exponents(case.impl, case.mode)
    per = case.b * case.h * elt / 2**20
    if m >= 2:
        return per * case.n * case.n * (4 if case.mode == "fwdbwd" else 2)
    return per * case.n * case.e * 12


def _extrapolate(points: list[tuple[int, float]], n: int, exponent: float) -> float:
    """Value at ``n`` from measured ``(n, value)`` points: the last two give the slope on a log-log
    scale (clamped to [exponent - 0.5, exponent + 1], small sizes are dominated by overheads);
    with one point the complexity exponent is used."""
    pts = sorted(p for p in points if p[1] > 0)
    if not pts:
        return float("nan")
    (n1, v1) = pts[-1]
    slope = exponent
    if len(pts) >= 2:
        (n0, v0) = pts[-2]
        if n1 > n0:
            slope = min(max(math.log(v1 / v0) / math.log(n1 / n0), exponent - 0.5), exponent + 1.0)
    return v1 * (n / n1) ** slope


# ---- speed --------------------------------------------------------------------------------------------
def _impls(cfg: Config, specs: list[MethodSpec], peer_impls: list[str]) -> list[str]:
    # layer-level ids time whole layers: the standard softmax layer ("mha") is their baseline
    layer = ["mha"] if any(s.level == "layer" for s in specs) else []
    return list(cfg.baselines) + layer + [s.name for s in specs] + peer_impls


def _inproc_peak(fn: Callable[[], Any], device: str) -> float | None:
    """Rough peak extra memory of one call in this process (for predictions only)."""
    from .measure import _peak_rss_mb, _reset_peak_rss, cuda_peak_mb, rss_mb

    if device.startswith("cuda"):
        return cuda_peak_mb(fn)

    if not _reset_peak_rss():
        fn()
        return None
    base = rss_mb()
    fn()
    return max(_peak_rss_mb() - base, 0.0)


def _case(cfg: Config, impl: str, n: int, mode: str, causal: bool | None = None, options=None) -> Case:
    return Case(
        impl=impl, n=n, b=cfg.batch, h=cfg.heads, e=cfg.head_dim, causal=cfg.causal if causal is None else causal,
        mode=mode, dtype=cfg.dtype, device=cfg.device, threads=cfg.threads, options=dict(options or {}),
        seed=cfg.seed, decode_steps=cfg.decode_steps,
    )


def _capability_skip(impl: str, mode: str, causal: bool, n: int | None = None, options=None) -> str | None:
    if impl in ("sdpa", "naive", "mha"):
        return None
    if impl.startswith("peer:"):
        from .peers import get_peer

        p = get_peer(impl[5:])
        if mode == "decode":
            return "peers are timed on forward passes only"
        if p.causal != causal:
            return f"the peer implements the {'causal' if p.causal else 'non-causal'} form only"
        return None
    spec = get_method(impl)
    if mode == "decode" and not spec.decoding:
        return "no incremental decoding (decoding=False)"
    if causal and mode != "decode" and not spec.causal:
        return "no causal form"
    if not causal and mode != "decode" and causal_only(impl, options):
        return "a causal-only layer (requires is_causal=True)"
    if n is not None and "max_length" in spec.options:  # a length-tied table (projections, synthesized rows)
        limit = (options or {}).get("max_length", spec.options["max_length"])
        if n > limit:
            return f"n > max_length ({n} > {limit}: its tables cover max_length positions)"
    return None


def run_speed(cfg: Config, specs: list[MethodSpec], peer_impls: list[str], progress: Progress) -> list[dict]:
    """Time every (impl, mode, length): warm-up, ``repeats`` runs, median. Lengths ascend so each case
    can be predicted from the smaller ones and skipped when over the time or memory budget."""
    budget = Budget(cfg.section_budget_s.get("speed", float("inf")))
    rows: list[dict] = []
    times: dict[tuple[str, str], list[tuple[int, float]]] = {}
    mems: dict[tuple[str, str], list[tuple[int, float]]] = {}
    dead: dict[tuple[str, str], str] = {}  # an impl/mode that failed or was skipped stays skipped above
    impls = _impls(cfg, specs, peer_impls)
    for n in sorted(cfg.lengths):
        for mode in cfg.modes:
            for impl in impls:
                case = _case(cfg, impl, n, mode)
                row: dict[str, Any] = {"impl": impl, "mode": mode, "n": n, "case": case.__dict__.copy()}
                rows.append(row)
                key = (impl, mode)
                reason = (_capability_skip(impl, mode, case.causal, n, case.options) or budget.exhausted()
                          or dead.get(key))
                if reason is None:
                    t_exp, m_exp = _exponents(impl, mode)
                    t_pred = _extrapolate(times.get(key, []), n, t_exp)
                    if mode == "decode":  # times are per step; one run is a loop of decode_steps steps
                        t_pred *= max(1, cfg.decode_steps)
                    m_pred = _extrapolate(mems.get(key, []), n, m_exp) if mems.get(key) else _first_memory_mb(case)
                    if t_pred == t_pred and t_pred > cfg.case_budget_s:
                        reason = f"predicted {t_pred:.1f} s per run > case budget {cfg.case_budget_s:g} s"
                    elif m_pred == m_pred and m_pred > cfg.memory_budget_mb:
                        reason = f"predicted {m_pred:.0f} MiB > memory budget {cfg.memory_budget_mb:.0f} MiB"
                if reason is not None:
                    row.update(status="skipped", reason=reason)
                    if reason.startswith("predicted"):
                        dead.setdefault(key, f"{reason} (at n={n})")
                    continue
                progress(f"speed {impl} {mode} n={n}")
                try:
                    fn, _ = build(case)
                    t0 = time.perf_counter()
                    peak = _inproc_peak(fn, cfg.device)  # the warm-up run, also a rough memory reading
                    first = time.perf_counter() - t0
                    r = time_case(case, warmup=max(cfg.warmup - 1, 0), repeats=cfg.repeats,
                                  budget_s=max(cfg.case_budget_s * 2, first * 2), fn=fn)
                    if cfg.device.startswith("cuda"):  # read again after warm-up (library workspaces)
                        peak = _inproc_peak(fn, cfg.device)
                    del fn
                except Exception as exc:
                    row.update(status="error", error=_err(exc))
                    dead[key] = f"failed at n={n}"
                    continue
                med = r["median_s"]
                row.update(status="ok", median_ms=med * 1e3, times_ms=[t * 1e3 for t in r["times_s"]],
                           repeats=len(r["times_s"]))
                if cfg.device.startswith("cuda") and peak is not None:
                    row["peak_mb"] = peak
                    row["memory_method"] = "cuda allocator peak"
                times.setdefault(key, []).append((n, med))
                if peak is not None:
                    mems.setdefault(key, []).append((n, max(peak, 1e-3)))
    # ratios to SDPA measured in the same run; layer cases also to the softmax layer ("mha")
    from .measure import is_layer

    for name in ("sdpa", "mha"):
        base = {(r["mode"], r["n"]): r["median_ms"] for r in rows if r["impl"] == name and r.get("status") == "ok"}
        for r in rows:
            b = base.get((r["mode"], r["n"]))
            if r.get("status") == "ok" and b and (name == "sdpa" or is_layer(r["impl"])):
                r[f"speedup_vs_{name}"] = b / r["median_ms"]
    return rows


def run_memory(cfg: Config, speed_rows: list[dict], progress: Progress) -> None:
    """Isolated peak memory of every case that was timed, in fresh subprocesses (CPU); filled into the
    speed rows as ``peak_mb``. On CUDA the speed section already read the allocator's peak.

    ``memory_isolation="case"``: one subprocess per case. ``"batch"``: one subprocess for all cases,
    smallest lengths first (see :func:`peak_memory_batch`); cases not reached within the section's
    budget are marked so."""
    if cfg.device.startswith("cuda") or not cfg.memory:
        return
    budget = Budget(cfg.section_budget_s.get("memory", float("inf")))
    rows = [r for r in speed_rows if r.get("status") == "ok" and r["mode"] in cfg.memory_modes]
    rows.sort(key=lambda r: (r["n"], cfg.modes.index(r["mode"])))
    if not rows:
        return
    cases = [Case(**r["case"]) for r in rows]
    if cfg.memory_isolation == "case":
        values: list[float | str] = []
        for r, c in zip(rows, cases):
            reason = budget.exhausted()
            if reason:
                values.append(reason)
                continue
            progress(f"memory {r['impl']} {r['mode']} n={r['n']}")
            try:
                values.append(peak_memory_mb(c, timeout_s=min(max(budget.seconds - budget.spent, 10.0), 3600)))
            except Exception as exc:
                values.append(_err(exc))
        method = "fresh subprocess per case: peak RSS (VmHWM) minus RSS before the call"
    else:
        progress(f"memory: {len(cases)} cases in one fresh subprocess")
        values = peak_memory_batch(cases, timeout_s=min(max(budget.seconds, 10.0), 24 * 3600))
        method = "one fresh subprocess: peak RSS (VmHWM, reset per case) minus RSS before the call"
    for r, v in zip(rows, values):
        if isinstance(v, str):
            r["memory_error" if not v.startswith(("section", "measurement process failed: timed")) else "memory_skipped"] = v
        else:
            r["peak_mb"] = v
            r["memory_method"] = method


# ---- approximation error -----------------------------------------------------------------------------
def _input_sets(cfg: Config, specs: list[MethodSpec], budget: Budget, progress: Progress) -> tuple[list, list[dict]]:
    """The inputs of the error section: ``(kind, n, sweep, seeds)`` where ``seeds`` is a list of
    ``(q, k, v, exact, exact_w)``, and one stats row per (kind, n) with the trivial baselines."""
    e, h = cfg.head_dim, cfg.error_heads
    feat = any(feature_option(s) for s in specs)
    sets: list[tuple[str, int, bool, list]] = []
    stats: list[dict] = []

    def prepare(kind: str, n: int, sweep: bool, qkv_list: list, info: dict | None = None) -> None:
        seeds = []
        for q, k, v in qkv_list:
            mask = build_mask(q, k, None, None, False)
            qd, kd, vd = q.double(), k.double(), v.double()
            scale = q.shape[-1] ** -0.5
            exact_w = dense_weights(qd, kd, mask, scale) if n <= 4096 else None
            seeds.append((q, k, v, dense_attention(qd, kd, vd, mask, scale), exact_w))
        sets.append((kind, n, sweep, seeds))
        if sweep:
            return
        q, k, v, exact, exact_w = seeds[0]
        row: dict[str, Any] = {"inputs": kind, "n": n, "heads": q.shape[1], "head_dim": q.shape[-1],
                               "uniform_entropy_nats": math.log(n), **baselines(v, exact, exact_w)}
        if exact_w is not None:
            row["mean_row_entropy_nats"] = entropy(exact_w)
        if info:
            row["capture"] = info
        stats.append(row)

    for kind in cfg.error_inputs:
        if kind == "trained":
            reason = budget.exhausted()
            if reason:
                stats.append({"inputs": kind, "n": cfg.error_trained_length, "status": "skipped", "reason": reason})
                continue
            progress(f"error: training a softmax model on MQAR (n={cfg.error_trained_length}) to capture q, k, v")
            try:
                cap = trained_inputs(cfg, cfg.error_trained_length, cfg.error_trained_steps,
                                     budget_s=max(budget.seconds - budget.spent, 1.0) * 0.5,
                                     vocab=cfg.error_trained_vocab, pairs=cfg.error_trained_pairs)
            except Exception as exc:
                stats.append({"inputs": kind, "n": cfg.error_trained_length, "status": "error", "error": _err(exc)})
                continue
            qkv = [(cap.q, cap.k, cap.v)] * cfg.error_seeds  # the seeds vary the mechanisms' randomness only
            prepare(kind, cfg.error_trained_length, False, qkv, cap.info)
            if feat:
                prepare(kind, cfg.error_trained_length, True, qkv)
            continue
        make = {"structured": structured_inputs, "gaussian": gaussian_inputs}.get(kind)
        if make is None:
            raise ValueError(f"unknown error inputs {kind!r}; use trained, structured or gaussian")
        plan = [(n, False) for n in cfg.error_lengths]
        if feat and kind == "structured":
            plan.append((cfg.error_feature_length, True))
        for n, sweep in plan:
            qkv = []
            for seed in range(cfg.error_seeds):
                g = torch.Generator().manual_seed(cfg.seed * 1000 + seed + n)
                qkv.append(make(1, h, n, e, g))
            prepare(kind, n, sweep, qkv)
    # what the summary table shows first (trained-model inputs, structured inputs at the longest length),
    # so that a section budget running out cuts the sweeps and the other lengths instead
    longest = max(cfg.error_lengths, default=0)

    def priority(entry: tuple) -> int:
        kind, n, sweep, _ = entry
        if sweep:
            return 3
        return 0 if kind == "trained" else 1 if (kind == "structured" and n == longest) else 2

    sets.sort(key=priority)
    return sets, stats


def run_error(cfg: Config, specs: list[MethodSpec], progress: Progress) -> tuple[list[dict], list[dict]]:
    """Output error against exact softmax attention (float64, non-causal) on the configured inputs
    (:mod:`fastattn.bench.inputs`: q, k, v captured from a trained model, structured synthetic ones,
    Gaussian ones), across lengths and, for mechanisms with a feature-count option, feature counts.

    Each ok row has ``rel_err`` and ``scaled_err`` (:mod:`fastattn.bench.metrics`) and, where the
    mechanism exposes attention weights, ``kl`` and ``tv`` of its rows. Returns (rows, input stats);
    a stats row carries the trivial baselines of its inputs (zeros, mean of v, uniform weights)."""
    budget = Budget(cfg.section_budget_s.get("error", float("inf")))
    rows: list[dict] = []
    feat = {s.name: feature_option(s) for s in specs}
    sets, stats = _input_sets(cfg, specs, budget, progress)
    for kind, n, sweep, seeds in sets:
        values = cfg.error_features if sweep else [None]
        for fval in values:
            for spec in specs:
                opt = feat[spec.name]
                if sweep and opt is None:
                    continue
                row: dict[str, Any] = {"method": spec.name, "inputs": kind, "n": n,
                                       "option": opt if sweep else None, "value": fval}
                rows.append(row)
                reason = budget.exhausted()
                if not spec.functional:
                    reason = "learned parameters: the error of an untrained module is not meaningful"
                if reason:
                    row.update(status="skipped", reason=reason)
                    continue
                progress(f"error {spec.name} {kind} n={n}" + (f" {opt}={fval}" if sweep else ""))
                options = {opt: fval} if sweep else {}
                try:
                    got: dict[str, list[float]] = {"rel_err": [], "scaled_err": [], "kl": [], "tv": []}
                    for seed, (q, k, v, exact, exact_w) in enumerate(seeds):
                        c = Case(spec.name, n, b=q.shape[0], h=q.shape[1], e=q.shape[-1], options=options,
                                 seed=cfg.seed + seed)
                        mech = make_mechanism(c)
                        with torch.no_grad():
                            out = mech.run(q, k, v)
                            w = mech.attention_weights(q, k) if spec.weights and exact_w is not None else None
                        got["rel_err"].append(rel_error(out, exact))
                        got["scaled_err"].append(scaled_error(out, exact))
                        if w is not None:
                            got["kl"].append(row_kl(exact_w, w))
                            got["tv"].append(row_tv(exact_w, w))
                    row.update(status="ok", seeds=len(seeds))
                    row.update({key: sum(x) / len(x) for key, x in got.items() if x})
                    if not all(math.isfinite(x) for x in got["rel_err"]):
                        row.update(status="error", error="non-finite output")
                except Exception as exc:
                    row.update(status="error", error=_err(exc))
    return rows, stats


# ---- peers ---------------------------------------------------------------------------------------------
def available_peers(specs: list[MethodSpec]) -> tuple[list[Any], list[dict]]:
    """Installed peers whose matching mechanism is selected, and notes on the others."""
    from .peers import peers

    names = {s.name for s in specs}
    found, notes = [], []
    for p in peers():
        if p.matches not in names:
            notes.append({"peer": p.name, "matches": p.matches, "status": "skipped",
                          "reason": f"{p.matches!r} not selected or not registered"})
        elif not p.available():
            notes.append({"peer": p.name, "matches": p.matches, "status": "skipped",
                          "reason": f"package {p.package!r} not installed (pip install fastattn[peers])"})
        else:
            found.append(p)
    return found, notes


def run_peers(cfg: Config, found: list[Any], speed_rows: list[dict], progress: Progress) -> list[dict]:
    """Numerical agreement of each installed peer with its fastattn mechanism on identical inputs (the
    timings are in the speed rows, impl ``peer:<name>``, beside the mechanism's)."""
    budget = Budget(cfg.section_budget_s.get("peers", float("inf")))
    timed = {(r["impl"], r["mode"], r["n"]): r for r in speed_rows if r.get("status") == "ok"}
    rows = []
    for p in found:
        for n in sorted(cfg.lengths):
            row: dict[str, Any] = {"peer": p.name, "matches": p.matches, "n": n, "causal": p.causal,
                                   "note": p.note}
            rows.append(row)
            reason = budget.exhausted()
            if reason is None and (f"peer:{p.name}", "fwd", n) not in timed and cfg.causal == p.causal:
                reason = "not timed at this length (see the speed rows)"
            if reason:
                row.update(status="skipped", reason=reason)
                continue
            progress(f"peer {p.name} n={n}")
            try:
                case = replace(_case(cfg, p.matches, n, "fwd", causal=p.causal), impl=p.matches)
                ours, (q, k, v) = build(case)
                theirs = p.build(q, k, v, case)
                with torch.no_grad():
                    a, b = ours(), theirs()
                row.update(status="ok", rel_diff=float((a.double() - b.double()).norm() / a.double().norm()))
                for impl, key in ((p.matches, "fastattn_ms"), (f"peer:{p.name}", "peer_ms")):
                    t = timed.get((impl, "fwd", n))
                    if t:
                        row[key] = t["median_ms"]
            except Exception as exc:
                row.update(status="error", error=_err(exc), trace=traceback.format_exc(limit=3)[-800:])
    return rows
