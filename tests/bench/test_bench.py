"""The benchmark harness: a tiny end-to-end run, the task generators, selection, skipping, peers."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

import fastattn
from fastattn.bench import peers as peer_registry
from fastattn.bench.config import TaskConfig, feature_option, preset, select_methods
from fastattn.bench.report import BEGIN, END, update_readme
from fastattn.bench.suite import run_speed
from fastattn.bench.tasks import ListOpsVocab as V
from fastattn.bench.tasks import listops_batch, listops_evaluate, listops_sample, mqar_batch
from fastattn.cli import main


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    rc = main([
        "bench", "--quick", "--methods", "softmax,flash,not_a_method", "--lengths", "24,48",
        "--error-lengths", "32,64", "--tasks", "--task-steps", "3", "--repeats", "1", "--device", "cpu",
        "--threads", "1",
        "--time-scale", "1000", "--case-budget", "100", "--out", str(out), "-q",
    ])
    assert rc == 0
    return out


def test_quick_run_writes_every_output(quick_run: Path) -> None:
    for name in ("results.json", "report.md", "time_vs_length.png", "memory_vs_length.png",
                 "error_vs_length.png", "task_accuracy.png", "pick.png"):
        assert (quick_run / name).stat().st_size > 0, name
    report = (quick_run / "report.md").read_text()
    assert "## Summary" in report and "`flash`" in report
    # the trivial baselines are printed beside the error and accuracy figures
    summary = report.split("## Summary", 1)[1].split("\n\n")[1]
    assert "*trivial baselines*" in summary and "mean of v" in summary and "zeros 1" in summary
    assert "majority" in summary and "chance" in summary
    assert "error, trained-model inputs" in summary and "Gaussian" not in summary.splitlines()[0]
    assert report.count("**mean of v (baseline)**") >= 3 and report.count("**zeros (baseline)**") >= 3
    assert "| task | method | accuracy | majority class | chance |" in report


def test_quick_run_values_are_sane(quick_run: Path) -> None:
    res = json.loads((quick_run / "results.json").read_text())
    meta = res["meta"]
    assert meta["torch"] == torch.__version__ and meta["date"] and meta["machine"]["cpu_count"]
    assert [m["name"] for m in res["methods"]] == ["softmax", "flash"]
    assert any("not_a_method" in n for n in meta["notes"])
    ok = [r for r in res["speed"] if r["status"] == "ok"]
    impls = {r["impl"] for r in ok}
    assert {"sdpa", "softmax", "flash"} <= impls
    assert {r["mode"] for r in ok} == {"fwd", "fwdbwd", "decode"}
    for r in ok:
        assert r["median_ms"] > 0 and all(t > 0 for t in r["times_ms"])
        assert r["speedup_vs_sdpa"] > 0
    sdpa = [r for r in ok if r["impl"] == "sdpa"]
    assert all(r["speedup_vs_sdpa"] == pytest.approx(1.0) for r in sdpa)
    mem = [r["peak_mb"] for r in res["speed"] if "peak_mb" in r]
    assert mem and all(m >= 0 and math.isfinite(m) for m in mem)
    for r in res["speed"]:
        assert r["status"] in ("ok", "skipped", "error")
        if r["status"] == "skipped":
            assert r["reason"]
    errs = [r for r in res["error"] if r["status"] == "ok"]
    assert {r["inputs"] for r in errs} == {"trained", "structured", "gaussian"}
    for r in errs:
        assert math.isfinite(r["rel_err"]) and 0 <= r["scaled_err"] <= r["rel_err"] + 1e-12
        if r["method"] in ("softmax", "flash"):  # exact mechanisms: float32 round-off only
            assert r["rel_err"] < 1e-5
    assert any(r["method"] == "softmax" and abs(r["kl"]) < 1e-6 and r["tv"] < 1e-5 for r in errs)
    stats = {(s["inputs"], s["n"]): s for s in res["error_inputs"]}
    for st in stats.values():
        assert st["zeros_rel_err"] == 1.0 and 0 < st["mean_v_rel_err"] and 0 < st["uniform_tv"] <= 1
    ent = {k: s["mean_row_entropy_nats"] for (k, n), s in stats.items() if n == 64}
    assert ent["structured"] < ent["gaussian"]  # the structured inputs really are peaked
    # the structured values have a mean: the mean-of-v baseline is then far better than zeros
    assert stats[("structured", 64)]["mean_v_rel_err"] < 0.9
    cap = stats[("trained", 64)]["capture"]
    assert cap["task"].startswith("mqar") and cap["steps"] >= 1 and 0 <= cap["accuracy"] <= 1
    tasks = [r for r in res["tasks"] if r["status"] == "ok"]
    assert {(r["task"], r["method"]) for r in tasks} == {(t, m) for t in ("mqar", "listops") for m in ("softmax", "flash")}
    for r in tasks:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["steps"] >= 1 and math.isfinite(r["final_loss"])
        assert 0.0 < r["chance"] <= r["majority"] <= 1.0  # the most frequent label is at least as common as 1/k


def test_report_and_readme_regenerate_from_results(quick_run: Path, tmp_path: Path) -> None:
    (quick_run / "report.md").unlink()
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{BEGIN}\nold\n{END}\n\ntail\n")
    assert main(["bench", "--from", str(quick_run), "--readme", str(readme)]) == 0
    assert (quick_run / "report.md").exists()
    text = readme.read_text()
    assert "\nold\n" not in text and text.endswith("tail\n") and "time_vs_length.png" in text and "| `flash` |" in text
    # without markers a section is appended
    other = tmp_path / "OTHER.md"
    other.write_text("# y\n")
    update_readme(json.loads((quick_run / "results.json").read_text()), quick_run, other)
    assert "## Benchmark" in other.read_text() and BEGIN in other.read_text()


# ---- task generators ------------------------------------------------------------------------------------
def test_mqar_answers_are_the_values_paired_with_the_queried_keys() -> None:
    g = torch.Generator().manual_seed(0)
    pairs, vocab, length = 6, 40, 48
    x, y = mqar_batch(16, length, pairs, vocab, g)
    assert x.shape == y.shape == (16, length)
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        keys, values = row_x[0:2 * pairs:2], row_x[1:2 * pairs:2]
        assert len(set(keys)) == pairs and all(1 <= k < vocab // 2 for k in keys)
        assert all(vocab // 2 <= v < vocab for v in values)
        table = dict(zip(keys, values))
        queried = [i for i, t in enumerate(row_y) if t != -100]
        assert len(queried) == pairs and min(queried) >= 2 * pairs
        assert sorted(row_x[i] for i in queried) == sorted(keys)  # each key queried once
        for i in queried:
            assert row_y[i] == table[row_x[i]]
        rest = [row_x[i] for i in range(2 * pairs, length) if i not in queried]
        assert set(rest) <= {0}  # nothing else in the query region, the answers never appear there
        assert all(row_x[i] not in values for i in range(2 * pairs, length))


def test_mqar_rejects_impossible_sizes() -> None:
    with pytest.raises(ValueError, match="pairs"):
        mqar_batch(2, 64, 20, 32, torch.Generator())
    with pytest.raises(ValueError, match="too short"):
        mqar_batch(2, 20, 8, 64, torch.Generator())


def test_listops_labels_match_a_direct_evaluator() -> None:
    rng = random.Random(0)
    cfg = TaskConfig(length=64, steps=1, max_depth=4, max_args=5, min_length=10)
    for _ in range(200):
        tokens, label = listops_sample(rng, cfg)
        assert cfg.min_length <= len(tokens) <= cfg.length
        assert listops_evaluate(tokens) == label and 0 <= label <= 9
    x, y, pad = listops_batch(rng, cfg, 8)
    assert x.shape == (8, 64) and pad.dtype == torch.bool
    for row, label in zip(x.tolist(), y.tolist()):
        assert listops_evaluate(row) == label


def test_listops_evaluator_on_hand_written_lists() -> None:
    def d(*ds):
        return [V.DIGIT0 + i for i in ds]

    # [MAX 2 9 [MIN 4 7 ] 0 ] = 9 ; [MED 1 2 3 4 ] = int(2.5) = 2 ; [SM 5 6 [MED 9 1 3 ] ] = (11 + 3) % 10
    assert listops_evaluate([V.MAX, *d(2, 9), V.MIN, *d(4, 7), V.END, *d(0), V.END]) == 9
    assert listops_evaluate([V.MED, *d(1, 2, 3, 4), V.END]) == 2
    assert listops_evaluate([V.SM, *d(5, 6), V.MED, *d(9, 1, 3), V.END, V.END]) == 4
    assert listops_evaluate([V.MIN, *d(8, 3), V.END, 0, 0]) == 3  # padding ends the sequence
    with pytest.raises(ValueError):
        listops_evaluate([V.MIN, *d(8, 3)])


# ---- selection, skipping, peers -------------------------------------------------------------------------
def test_method_selection_tolerates_missing_ids() -> None:
    specs, notes = select_methods("family:exact")
    assert [s.name for s in specs] == [s.name for s in fastattn.methods("exact")]
    specs, notes = select_methods("flash,softmax,nonexistent,family:nofamily")
    assert [s.name for s in specs] == ["softmax", "flash"]  # catalogue order, no duplicates
    assert len(notes) == 2
    assert select_methods("all")[0] == [s for s in fastattn.methods() if s.kind == "sequence"]  # layer-level too


def test_feature_option_detection() -> None:
    class Fake:
        def __init__(self, options):
            self.options = options

    assert feature_option(Fake({"num_features": 64, "eps": 1e-6})) == "num_features"
    assert feature_option(Fake({"rank": 32})) == "rank"
    assert feature_option(Fake({"nb_features": 8})) == "nb_features"
    assert feature_option(Fake({"block_q": 256, "window": 64, "redraw": True})) is None
    assert feature_option(fastattn.get_method("flash")) is None


@pytest.fixture
def fake_peers():
    @peer_registry.peer("test.same_as_sdpa", package="torch", matches="softmax", causal=False)
    def _good(q, k, v, case):
        return lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)

    @peer_registry.peer("test.broken", package="torch", matches="softmax", causal=False)
    def _broken(q, k, v, case):
        raise RuntimeError("this peer is broken")

    @peer_registry.peer("test.missing", package="no_such_package_xyz", matches="softmax", causal=False)
    def _missing(q, k, v, case):
        raise AssertionError("never built")

    yield
    for name in ("test.same_as_sdpa", "test.broken", "test.missing"):
        peer_registry._PEERS.pop(name, None)


def test_over_budget_cases_are_skipped_and_failures_recorded(fake_peers) -> None:
    from fastattn.bench.suite import available_peers, run_peers

    cfg = preset("quick")
    cfg.lengths, cfg.modes, cfg.repeats, cfg.heads, cfg.head_dim = [16, 32, 64], ["fwd"], 1, 2, 8
    cfg.threads = 1
    cfg.case_budget_s = 1e-9  # every extrapolated case is over budget
    specs = [fastattn.get_method("softmax")]
    found, notes = available_peers(specs)
    assert {p.name for p in found} == {"test.same_as_sdpa", "test.broken"}
    assert any(n["peer"] == "test.missing" and "not installed" in n["reason"] for n in notes)
    rows = run_speed(cfg, specs, [f"peer:{p.name}" for p in found], lambda s: None)
    by = {(r["impl"], r["n"]): r for r in rows}
    assert by[("softmax", 16)]["status"] == "ok"
    assert by[("softmax", 32)]["status"] == "skipped" and "predicted" in by[("softmax", 32)]["reason"]
    assert by[("peer:test.broken", 16)]["status"] == "error" and "broken" in by[("peer:test.broken", 16)]["error"]
    assert by[("peer:test.broken", 32)]["status"] == "skipped"  # a failed impl is not retried larger
    cfg.case_budget_s = 100.0
    rows = run_speed(cfg, specs, ["peer:test.same_as_sdpa"], lambda s: None)
    agree = run_peers(cfg, [p for p in found if p.name == "test.same_as_sdpa"], rows, lambda s: None)
    assert all(r["status"] == "ok" and r["rel_diff"] < 1e-5 and r["peer_ms"] > 0 for r in agree)


def test_lengths_beyond_a_length_tied_table_are_skipped_not_failed() -> None:
    cfg = preset("quick")
    cfg.lengths, cfg.modes, cfg.repeats, cfg.heads, cfg.head_dim, cfg.baselines = [256, 1024], ["fwd"], 1, 2, 8, []
    cfg.threads = 1
    rows = run_speed(cfg, [fastattn.get_method("linformer")], [], lambda s: None)
    by = {r["n"]: r for r in rows}
    assert by[256]["status"] == "ok"
    assert by[1024]["status"] == "skipped" and by[1024]["reason"].startswith("n > max_length (1024 > 512")


def test_memory_prediction_skips_quadratic_cases() -> None:
    cfg = preset("quick")
    cfg.lengths, cfg.modes, cfg.baselines = [100_000], ["fwd"], ["naive"]
    cfg.memory_budget_mb = 100.0
    rows = run_speed(cfg, [], [], lambda s: None)
    assert rows[0]["status"] == "skipped" and "memory budget" in rows[0]["reason"]


# ---- the paths that approximate mechanisms take (none is registered on this branch: a stand-in) ----------
@pytest.fixture
def approx_spec(monkeypatch):
    """A non-causal, non-decoding stand-in with a feature-count option and attention weights: exact
    softmax with its scores perturbed by a fixed random matrix of size 1 / sqrt(num_features)."""
    from dataclasses import dataclass

    from fastattn import registry
    from fastattn.core.base import Mechanism
    from fastattn.ops.softmax.dense import dense_weights

    fastattn.methods()  # every family imported first
    free = [n for n, row in registry.catalogue().items() if row["kind"] == "sequence" and n not in registry._REGISTRY]
    if not free:
        pytest.skip("every catalogue id is registered")

    class Approx(Mechanism):
        @dataclass(frozen=True)
        class Options:
            num_features: int = 64

        def weights(self, q, k, mask, scale):
            g = torch.Generator().manual_seed(0)
            noise = torch.randn(q.shape[-2], k.shape[-2], generator=g).to(q.dtype)
            return dense_weights(q, k, mask, scale, extra_bias=noise / self.options.num_features ** 0.5)

        def forward(self, q, k, v, mask, scale, dropout_p=0.0):
            return self.weights(q, k, mask, scale) @ v

    spec = fastattn.MethodSpec(
        name=free[0], title="stand-in", arxiv="0", year=2020, family="test", kind="sequence", summary="",
        complexity="O(n^2 d)", functional=True, causal=False, decoding=False, padding=False, weights=True,
        exact=False, options={"num_features": 64}, cls=Approx,
    )
    Approx.spec = spec
    monkeypatch.setitem(registry._REGISTRY, spec.name, spec)
    return spec


def test_approximate_mechanism_paths(approx_spec, tmp_path: Path) -> None:
    from fastattn.bench.runner import run_bench

    assert feature_option(approx_spec) == "num_features"
    cfg = preset("quick")
    cfg.lengths, cfg.modes, cfg.repeats, cfg.heads, cfg.head_dim = [16], ["fwd", "decode"], 1, 2, 16
    cfg.memory, cfg.task_methods, cfg.threads = False, [approx_spec.name], 1
    cfg.error_lengths, cfg.error_feature_length, cfg.error_features = [32], 32, [4, 64, 1024]
    cfg.tasks, cfg.mqar.steps, cfg.listops.steps = True, 2, 2
    cfg.section_budget_s = {k: 1e6 for k in cfg.section_budget_s}
    cfg.case_budget_s = 100.0
    res = run_bench(cfg, [fastattn.get_method("softmax"), approx_spec], tmp_path, quiet=True)
    name = approx_spec.name
    dec = [r for r in res["speed"] if r["impl"] == name and r["mode"] == "decode"]
    assert dec and all(r["status"] == "skipped" and "decoding" in r["reason"] for r in dec)
    sweep = {(r["inputs"], r["value"]): r for r in res["error"] if r["method"] == name and r["option"]}
    assert {v for _, v in sweep} == {4, 64, 1024}
    assert {k for k, _ in sweep} == {"trained", "structured"}
    for kind in ("trained", "structured"):
        errs = [sweep[(kind, v)]["rel_err"] for v in (4, 64, 1024)]
        assert errs[0] > errs[1] > errs[2] > 0  # more features, smaller error: the sweep is wired right
        assert sweep[(kind, 4)]["kl"] > sweep[(kind, 1024)]["kl"] > 0
    mqar = next(r for r in res["tasks"] if r["task"] == "mqar" and r["method"] == name)
    assert mqar["status"] == "ok" and not mqar["causal"] and "non-causal" in mqar["note"]
    listops = next(r for r in res["tasks"] if r["task"] == "listops" and r["method"] == name)
    assert "padding attended" in listops["note"]
    assert (tmp_path / "error_vs_features.png").exists()
    assert f"`{name}` (num_features)" in (tmp_path / "report.md").read_text()


# ---- declared growth exponents (issue 9) ----------------------------------------------------------------
def test_every_mechanism_declares_its_growth_exponents() -> None:
    for spec in fastattn.methods():
        for what in ("time_growth", "memory_growth"):
            value = getattr(spec, what)
            assert isinstance(value, float) and 0.0 < value <= 3.0, (spec.name, what, value)
        assert spec.memory_growth <= spec.time_growth, spec.name  # nothing stores more than it computes
    assert (fastattn.get_method("flash").time_growth, fastattn.get_method("flash").memory_growth) == (2.0, 1.0)
    assert fastattn.get_method("linear").time_growth == 1.0


def test_bench_predictions_read_the_declared_exponents(monkeypatch) -> None:
    import dataclasses
    import inspect

    from fastattn import registry
    from fastattn.bench import suite

    source = inspect.getsource(suite)
    assert "\nimport re\n" not in source and ".complexity" not in source  # no parsing of the free text
    spec = fastattn.get_method("linear")
    # a misleading complexity text must not change the prediction: the declared numbers are used
    fake = dataclasses.replace(spec, complexity="O(n^2 d) time, O(n) memory", time_growth=1.0, memory_growth=1.0)
    monkeypatch.setitem(registry._REGISTRY, "linear", fake)
    assert suite._exponents("linear", "fwd") == (1.0, 1.0)
    assert suite._exponents("linear", "decode") == (0.0, 0.0)
    monkeypatch.setitem(registry._REGISTRY, "linear", dataclasses.replace(spec, time_growth=None, memory_growth=None))
    assert suite._exponents("linear", "fwd") == (2.0, 2.0)  # undeclared: the cautious guess


def test_register_rejects_nonsense_growth() -> None:
    from fastattn.registry import register

    with pytest.raises(ValueError, match="time_growth"):
        register("softmax", complexity="x", causal=True, decoding=True, padding=True, time_growth=0)
    with pytest.raises(ValueError, match="memory_growth"):
        register("softmax", complexity="x", causal=True, decoding=True, padding=True, memory_growth="2")


# ---- the error metric ------------------------------------------------------------------------------------
def test_metrics_on_hand_made_outputs() -> None:
    from fastattn.bench.metrics import baselines, rel_error, row_kl, row_tv, scaled_error

    g = torch.Generator().manual_seed(0)
    exact = torch.randn(1, 2, 16, 8, generator=g)
    assert rel_error(exact, exact) == 0 and rel_error(torch.zeros_like(exact), exact) == 1.0
    # an output right up to a positive scale per row (what an output norm does) is no error after the scale
    rows = torch.rand(1, 2, 16, 1, generator=g) * 20 + 0.5
    assert rel_error(exact * rows, exact) > 1 and scaled_error(exact * rows, exact) < 1e-6
    assert scaled_error(-exact, exact) == pytest.approx(1.0)  # a negative scale is not allowed
    noisy = exact + 0.3 * torch.randn(exact.shape, generator=g)
    assert scaled_error(noisy, exact) <= rel_error(noisy, exact)
    p = torch.softmax(torch.randn(3, 5, generator=g), -1)
    assert row_kl(p, p) == 0 and row_tv(p, p) == 0
    one_hot = torch.eye(5)[:3]
    assert row_tv(one_hot, torch.full((3, 5), 0.2)) == pytest.approx(0.8)
    v = torch.randn(1, 2, 16, 8, generator=g) + 3.0
    w = torch.softmax(torch.randn(1, 2, 16, 16, generator=g) * 4, -1)
    b = baselines(v, w @ v, w)
    assert b["zeros_rel_err"] == 1.0 and b["mean_v_rel_err"] < 0.5  # values with a mean: mean of v is close


def test_error_metric_ranks_exact_first_and_trivial_baselines_below_an_approximation_on_trained_inputs() -> None:
    from fastattn.bench.inputs import trained_inputs
    from fastattn.bench.measure import Case, make_mechanism
    from fastattn.bench.metrics import baselines, rel_error, scaled_error
    from fastattn.core.base import build_mask
    from fastattn.ops.softmax.dense import dense_attention, dense_weights

    cfg = preset("default")
    cfg.threads = 1
    cap = trained_inputs(cfg, length=64, steps=300, vocab=32)
    q, k, v = cap.q, cap.k, cap.v
    assert q.shape == (2, cfg.task_heads, 64, cfg.task_width // cfg.task_heads)
    mask = build_mask(q, k, None, None, False)
    scale = q.shape[-1] ** -0.5
    exact = dense_attention(q.double(), k.double(), v.double(), mask, scale)
    w = dense_weights(q.double(), k.double(), mask, scale)
    assert metrics_entropy(w) < 0.9 * math.log(64)  # the trained layer's rows are not uniform
    base = baselines(v, exact, w)

    def err(method: str) -> tuple[float, float]:
        mech = make_mechanism(Case(method, 64, b=2, h=q.shape[1], e=q.shape[-1]))
        with torch.no_grad():
            out = mech.run(q, k, v)
        return rel_error(out, exact), scaled_error(out, exact)

    assert max(err("softmax")) < 1e-5 and max(err("flash")) < 1e-5
    performer = err("performer")  # 256 positive random features at head dim 16: a reasonable approximation
    assert performer[0] < base["mean_v_rel_err"] < base["zeros_rel_err"]
    assert performer[1] < base["mean_v_scaled_err"]


def metrics_entropy(w: torch.Tensor) -> float:
    from fastattn.bench.metrics import entropy

    return entropy(w)


def test_output_normalised_mechanisms_are_ranked_on_the_scaled_error(quick_run: Path) -> None:
    from fastattn.bench.report import _primary, error_ranking, headline_table

    res = json.loads((quick_run / "results.json").read_text())
    row = next(r for r in res["error"] if r["status"] == "ok" and r["method"] == "softmax")
    fake = dict(row, method="lightning", rel_err=27.0, scaled_err=0.2)
    res["error"].append(fake)
    res["methods"].append({"name": "lightning", "family": "kernel"})
    res["meta"]["output_normalised"] = ["lightning"]
    assert _primary(res, fake) == (0.2, True)
    assert "| `lightning` | kernel |" in headline_table(res) and "0.2†" in headline_table(res)
    ranked = [name for name, _, _ in error_ranking(res, fake["inputs"], fake["n"])]
    assert ranked.index("lightning") < ranked.index("zeros")  # not reported as a 27x error


# ---- decode: steps through the in-place cache ------------------------------------------------------------
def test_decode_case_times_a_loop_of_steps_through_the_in_place_cache(monkeypatch) -> None:
    from fastattn.bench.measure import Case, build, time_case
    from fastattn.core import state as base

    made = []
    init = base._KVBuffer.__init__

    def counting(self, *a, **kw):
        made.append(1)
        init(self, *a, **kw)

    monkeypatch.setattr(base._KVBuffer, "__init__", counting)
    case = Case("softmax", 64, h=2, e=8, mode="decode", threads=1, decode_steps=8)
    fn, (q, k, v) = build(case)
    assert fn.calls == 8
    fn.prepare()
    made.clear()
    out = fn()
    assert made == []  # the timed steps append in place: no fresh copy of the cache
    exact = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)[:, :, -1:]
    torch.testing.assert_close(out, exact, rtol=1e-5, atol=1e-5)  # the loop really ended at token n
    r = time_case(case, warmup=0, repeats=2, fn=fn)
    assert len(r["times_s"]) == 2 and r["median_s"] > 0
    for impl in ("sdpa", "naive", "linear"):  # the baselines: a preallocated cache written in place
        fn, (q, k, v) = build(Case(impl, 40, h=2, e=8, mode="decode", threads=1, decode_steps=4))
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)[:, :, -1:]
        if impl != "linear":
            torch.testing.assert_close(fn(), ref, rtol=1e-5, atol=1e-5)
        else:
            assert fn().shape == ref.shape


# ---- peers: the same random draw, no attention to padding ------------------------------------------------
def test_peer_adapters_share_randomness_and_mask_padding(monkeypatch) -> None:
    import sys
    import types

    from fastattn.bench.measure import Case, make_mechanism
    from fastattn.bench.peers import get_peer

    calls = {}

    class FakeFast(torch.nn.Module):
        def __init__(self, dim_heads, nb_features, causal):
            super().__init__()
            self.register_buffer("projection_matrix", torch.randn(nb_features, dim_heads))

        def forward(self, q, k, v):
            calls["projection"] = self.projection_matrix.clone()
            return v

    class FakeLocal(torch.nn.Module):
        def __init__(self, **kw):
            super().__init__()

        def forward(self, q, k, v, mask=None):
            calls["mask"] = mask
            return v

    monkeypatch.setitem(sys.modules, "performer_pytorch", types.SimpleNamespace(FastAttention=FakeFast))
    monkeypatch.setitem(sys.modules, "local_attention", types.SimpleNamespace(LocalAttention=FakeLocal))
    case = Case("peer:performer_pytorch", 30, h=2, e=8, threads=1, seed=3)
    q = k = v = torch.randn(1, 2, 30, 8)
    get_peer("performer_pytorch").build(q, k, v, case)()
    ours = make_mechanism(Case("performer", 30, h=2, e=8, threads=1, seed=3))
    assert torch.equal(calls["projection"], ours.projection)
    get_peer("local_attention").build(q, k, v, Case("peer:local_attention", 30, h=2, e=8, options={"window": 8}))()
    assert calls["mask"].shape == (1, 30) and bool(calls["mask"].all())


def test_local_attention_peer_agrees_when_n_is_not_a_multiple_of_the_window() -> None:
    pytest.importorskip("local_attention")
    from fastattn.bench.measure import Case, build
    from fastattn.bench.peers import get_peer

    case = Case("local", 100, h=2, e=16, options={"window": 16}, threads=1)
    ours, (q, k, v) = build(case)
    theirs = get_peer("local_attention").build(q, k, v, case)
    torch.testing.assert_close(theirs(), ours(), rtol=1e-5, atol=1e-5)


def test_performer_peer_uses_our_draw() -> None:
    pytest.importorskip("performer_pytorch")
    from fastattn.bench.measure import Case, build
    from fastattn.bench.peers import get_peer

    case = Case("performer", 100, h=2, e=16, threads=1)
    ours, (q, k, v) = build(case)
    for t in (q, k):
        t.mul_(0.3)  # small scores: the peer's additive eps on key features stays negligible
    a, b = ours(), get_peer("performer_pytorch").build(q, k, v, case)()
    assert float((a - b).norm() / a.norm()) < 1e-2  # independent draws differ by ~5e-2 here


# ---- the headline table: one length per column ------------------------------------------------------------
def test_headline_columns_have_one_length_and_skips_are_listed(quick_run: Path) -> None:
    from fastattn.bench.report import headline_skips, headline_table

    res = json.loads((quick_run / "results.json").read_text())
    row = next(r for r in res["speed"] if r["impl"] == "flash" and r["mode"] == "fwdbwd" and r["n"] == 48)
    row.clear()
    row.update(impl="flash", mode="fwdbwd", n=48, status="skipped", reason="predicted 9 s per run > case budget")
    table = headline_table(res)
    assert "fwd+bwd ms (x SDPA), n=48" in table and "@n=" not in table
    flash = next(line for line in table.splitlines() if line.startswith("| `flash`"))
    assert flash.split(" | ")[3] == "skip"  # not the figure from a shorter length
    assert any("`flash` forward+backward at n=48" in s and "case budget" in s for s in headline_skips(res))


def test_pareto_front() -> None:
    from fastattn.bench.report import pareto_front

    pts = [("exact", 1.0, 1e-7), ("fast_bad", 20.0, 0.9), ("mid", 5.0, 0.1), ("dominated", 4.0, 0.2),
           ("slow_bad", 0.5, 0.5)]
    assert pareto_front(pts, higher_is_better=False) == ["fast_bad", "mid", "exact"]
    acc = [("a", 1.0, 0.99), ("b", 10.0, 0.3), ("c", 2.0, 0.2)]
    assert pareto_front(acc, higher_is_better=True) == ["b", "a"]


# ---- tasks: baselines, coverage, a ListOps that learns -----------------------------------------------------
def test_task_methods_cover_every_family() -> None:
    from fastattn.bench.config import DEFAULT_TASK_METHODS, task_methods_covering_families

    specs, _ = select_methods("all")
    chosen = task_methods_covering_families(specs, DEFAULT_TASK_METHODS)
    assert {fastattn.get_method(m).family for m in chosen} == {s.family for s in specs}
    assert set(DEFAULT_TASK_METHODS) <= set(chosen)
    sparse_only = [s for s in specs if s.family == "sparse"]
    assert task_methods_covering_families(sparse_only, ["softmax"]) == [sparse_only[0].name]


def test_default_listops_is_learnable_within_the_default_budget() -> None:
    from fastattn.bench.tasks import train_task

    cfg = preset("default")
    cfg.threads = 1
    r = train_task(cfg, fastattn.get_method("softmax"), "listops")
    assert r["steps"] == cfg.listops.steps  # not cut by the time cap
    assert r["accuracy"] > r["majority"] + 0.1 and r["majority"] < 0.3 and r["chance"] == 0.1


def test_decode_predictions_count_every_step_of_the_loop() -> None:
    cfg = preset("quick")
    cfg.lengths, cfg.modes, cfg.baselines, cfg.repeats, cfg.threads = [16, 32], ["decode"], ["sdpa"], 1, 1
    cfg.heads, cfg.head_dim, cfg.decode_steps = 2, 8, 4
    specs = [fastattn.get_method("softmax")]
    rows = run_speed(cfg, specs, [], lambda s: None)
    step = next(r for r in rows if r["impl"] == "softmax" and r["n"] == 16)["median_ms"] / 1e3
    # n=32 is predicted at 2 x step per decode step, 8 x step for the loop of four: over a budget of 2.5 x
    # step only when the loop is counted (the margin absorbs a second run measuring n=16 up to 3x faster
    # than the first on a loaded machine)
    cfg.case_budget_s = step * 2.5
    rows = run_speed(cfg, specs, [], lambda s: None)
    assert next(r for r in rows if r["impl"] == "softmax" and r["n"] == 32)["status"] == "skipped"


def test_time_plot_has_one_row_of_panels_per_family(quick_run: Path, tmp_path: Path) -> None:
    import matplotlib.image

    from fastattn.bench.report import HEADLINE_PLOT, write_plots

    res = json.loads((quick_run / "results.json").read_text())
    write_plots(res, tmp_path)
    one = matplotlib.image.imread(tmp_path / HEADLINE_PLOT).shape[0]
    for m in res["methods"]:
        if m["name"] == "flash":
            m["family"] = "other"  # two families now: two rows of panels
    out = tmp_path / "two"
    out.mkdir()
    paths = write_plots(res, out)
    assert matplotlib.image.imread(out / HEADLINE_PLOT).shape[0] > 1.7 * one
    assert {p.name for p in paths} >= {HEADLINE_PLOT, "memory_vs_length.png", "error_vs_length.png", "pick.png"}


def test_causal_only_layers_are_skipped_not_errors_in_non_causal_cases() -> None:
    from fastattn.bench.measure import causal_only
    from fastattn.bench.suite import _capability_skip

    assert causal_only("intra") and causal_only("compressive") and not causal_only("moh")
    assert "causal-only" in _capability_skip("intra", "fwdbwd", False, 256, {})
    assert _capability_skip("intra", "fwdbwd", True, 256, {}) is None
    assert _capability_skip("moh", "fwd", False, 256, {}) is None
