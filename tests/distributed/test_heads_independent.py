"""``Mechanism.heads_independent`` (what Ulysses sequence parallelism requires) is true where declared: for
every sequence-level mechanism declaring it, two modules of half the heads, with the module's buffers and
parameters, compute the two halves of the heads."""

from __future__ import annotations

import pytest
import torch

from fastattn.registry import methods

B, H, L, E = 1, 4, 24, 8
SPECS = [s for s in methods() if s.kind == "sequence" and s.level == "sequence"]


def _build(spec, options, heads: int):
    return spec.cls(options, head_dim=E, num_heads=heads).double()


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_declared_independent_heads_split(spec) -> None:
    torch.manual_seed(0)
    full = _build(spec, spec.make_options(**(spec.cls.test_options or {})), H)
    if not full.heads_independent:
        pytest.skip("declares heads_independent=False")
    q, k, v = (torch.randn(B, H, L, E, dtype=torch.float64) for _ in range(3))
    for causal in (False, True) if spec.causal else (False,):
        want = full.run(q, k, v, is_causal=causal)
        if not torch.equal(want, full.run(q, k, v, is_causal=causal)):
            pytest.skip("draws anew at every call")
        halves = []
        for hs in (slice(0, H // 2), slice(H // 2, H)):
            half = _build(spec, full.options, H // 2)
            mine = {**dict(full.named_buffers()), **dict(full.named_parameters())}
            with torch.no_grad():  # a shape that differs is a per-head tensor: the heads are not alike
                for name, t in [*half.named_buffers(), *half.named_parameters()]:
                    t.copy_(mine[name])
            halves.append(half.run(q[:, hs], k[:, hs], v[:, hs], is_causal=causal))
        assert (torch.cat(halves, 1) - want).abs().max().item() < 1e-12, f"causal={causal}"


def test_option_dependent_declarations() -> None:
    from fastattn.registry import get_method

    def make(name, heads=H, **o):
        spec = get_method(name)
        return spec.cls(spec.make_options(**o), head_dim=E, num_heads=heads)

    assert make("longformer", dilation=2).heads_independent
    assert not make("longformer", dilation=(1, 1, 2, 2)).heads_independent
    assert make("bigbird", per_head=False).heads_independent
    assert not make("bigbird", per_head=True).heads_independent
    assert make("jukebox", kinds=("row",)).heads_independent
    assert not make("jukebox").heads_independent
    assert not make("lightning").heads_independent
    assert make("softmax").heads_independent
