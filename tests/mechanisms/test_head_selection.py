"""The mixture-of-heads layers (moh, moa) attend only on the (token, head) pairs their routers select
(fastattn/mechanisms/gated/base.py): the selected path equals the full one (values and gradients: the
unselected pairs have gate 0), with padding and grouped-query heads; it runs when it is cheaper and the
call is not causal, and cores it cannot serve take the full path."""

from __future__ import annotations

import pytest
import torch

import fastattn
from fastattn.mechanisms.gated import base

D, H, L = 24, 6, 29


def _layer(method, core="softmax", seed=0, **options):
    torch.manual_seed(seed)
    opts = {"moh": {"shared_heads": 1, "active_heads": 1}, "moa": {"active_heads": 1}}[method]
    return fastattn.MultiheadAttention(
        D, H, method, num_kv_heads=3, batch_first=True, dtype=torch.float64, core=core, **{**opts, **options}
    ).train()


def _x(seed=1):
    return torch.randn(2, L, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _run(layer, x, fraction, monkeypatch, **kw):
    monkeypatch.setattr(base, "SELECTED_FRACTION", fraction)
    calls = []
    original = base.HeadGatedAttention._attend_selected

    def spy(self, *a, **k):
        out = original(self, *a, **k)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(base.HeadGatedAttention, "_attend_selected", spy)
    out, _ = layer(x, **kw)
    return out, calls


@pytest.mark.parametrize("method", ["moh", "moa"])
@pytest.mark.parametrize("causal", [False, True])
def test_the_selected_path_equals_the_full_one(method, causal, monkeypatch):
    monkeypatch.setattr(base, "MIN_CHUNK", 4)  # queries split into chunks, as for more threads than heads
    monkeypatch.setattr(base.torch, "get_num_threads", lambda: 16)
    layer = _layer(method)
    kpm = torch.zeros(2, L, dtype=torch.bool)
    kpm[1, 20:] = True
    x = _x().requires_grad_(True)
    w = _x(seed=5)
    params = list(layer.parameters())
    results = []
    for fraction in (1.0, 0.0):  # 1.0: whenever possible; 0.0: never
        out, calls = _run(layer, x, fraction, monkeypatch, key_padding_mask=kpm, is_causal=causal)
        assert calls == [fraction > 0 and not causal]  # causal calls compute every head
        grads = torch.autograd.grad((out * w).sum() + layer.aux_loss, [x, *params])
        results.append((out, grads))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v, rtol=1e-9, atol=1e-11)


def test_it_runs_when_cheaper_at_the_default_threshold(monkeypatch):
    layer = _layer("moa")  # one expert of six per token: about a sixth of the rows (padded to the busiest)
    _, calls = _run(layer, _x(), base.SELECTED_FRACTION, monkeypatch)
    assert calls == [True]
    every = _layer("moa", active_heads=H)  # every expert selected: nothing to skip
    _, calls = _run(every, _x(), base.SELECTED_FRACTION, monkeypatch)
    assert calls == [False]


def test_cores_it_cannot_serve_take_the_full_path(monkeypatch):
    """performer holds random features (state per head); a kernel core without state is served."""
    _, calls = _run(_layer("moh", core="performer"), _x(), 1.0, monkeypatch)
    assert calls == [False]
    layer = _layer("moh", core="linear")
    out, calls = _run(layer, _x(), 1.0, monkeypatch)
    assert calls == [True]
    full, _ = _run(layer, _x(), 0.0, monkeypatch)
    torch.testing.assert_close(out, full, rtol=1e-10, atol=1e-12)
