"""Smoke test of benchmarks/seq2seq_alignment.py (the classic alignment mechanisms on a generated
reversal task): its data are right, and a few training steps of two mechanisms run end to end and write
the report. The accuracies themselves are the benchmark's, not a test's."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "seq2seq_alignment.py"


def load():
    spec = importlib.util.spec_from_file_location("seq2seq_alignment", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_task_is_reversal_with_padding():
    m = load()
    src, kpm, dec_in, tgt = m.batch(16, torch.Generator().manual_seed(0))
    for i in range(16):
        n = int((~kpm[i]).sum())
        assert 4 <= n <= 12 and (src[i, n:] == m.PAD).all()
        assert tgt[i, :n].tolist() == src[i, :n].flip(0).tolist() and tgt[i, n] == m.EOS
        assert (tgt[i, n + 1:] == m.PAD).all()
        assert dec_in[i, 0] == m.BOS and dec_in[i, 1:n + 1].tolist() == tgt[i, :n].tolist()
    pred = tgt.clone()
    assert m.accuracy(pred, tgt) == (1.0, 1.0)
    pred[0, 0] = (pred[0, 0] + 1) % 10
    assert m.accuracy(pred, tgt)[0] == 15 / 16


def test_a_few_steps_run_and_write_the_report(tmp_path):
    m = load()
    rows = m.main(["--methods", "additive", "gmm_window", "--steps", "2", "--batch", "4", "--eval", "16",
                   "--out", str(tmp_path)])
    assert [r["name"] for r in rows] == ["additive", "gmm_window"]
    data = json.loads((tmp_path / "seq2seq_alignment.json").read_text())
    assert len(data["rows"]) == 2 and 0.0 <= data["rows"][0]["seq_acc"] <= 1.0
    assert "| additive |" in (tmp_path / "seq2seq_alignment.md").read_text()
