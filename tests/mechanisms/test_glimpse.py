"""DRAM glimpses (``fastattn.GlimpseAttention``, kind "vision" with its own facade): the module's contract
(shapes, efficient == literal sensor on values and gradients, step == forward, batch independence,
save/load, errors) and its defining properties (the sensor is explicit crops at each scale, the policy
is a seeded Gaussian, REINFORCE with a baseline moves it)."""

from __future__ import annotations

import math

import pytest
import torch

import fastattn
from fastattn.mechanisms.classic.glimpse import patch_corner

C, HH, WW, N = 2, 11, 14, 4
OPTS = dict(patch=3, scales=3, hidden=10, glimpse_dim=12, context_size=2)


def make(seed=0, dtype=torch.float64, **options):
    torch.manual_seed(seed)
    return fastattn.GlimpseAttention(C, dtype=dtype, **{**OPTS, **options})


def image(b=2, seed=0, dtype=torch.float64):
    return torch.randn(b, C, HH, WW, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_shapes_and_eval_uses_the_mean():
    m = make().eval()
    r = m(image(), N)
    assert r.features.shape == (2, N, 10) and r.locations.shape == (2, N, 2)
    assert r.log_probs.shape == r.baselines.shape == (2, N) and r.means.shape == (2, N, 2)
    torch.testing.assert_close(r.locations, r.means)  # no sampling in eval mode
    assert (r.locations.abs() <= 1).all()
    assert m(image(), None).features.shape[1] == m.mechanism.options.glimpses


@pytest.mark.parametrize("sample", [False, True])
def test_fast_sensor_equals_the_literal_crops_values_and_grads(sample):
    m = make()
    x = image().requires_grad_(True)
    fast = m(x, N, generator=gen(), sample=sample)
    ref = m.reference(x, N, generator=gen(), sample=sample)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    params = [x, *m.parameters()]
    loss = lambda r: (r.features ** 2).sum() + r.log_probs.sum() + r.baselines.sum()  # noqa: E731
    for a, b in zip(torch.autograd.grad(loss(fast), params, allow_unused=True),
                    torch.autograd.grad(loss(ref), params, allow_unused=True)):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_sensor_is_explicit_crops_per_scale_with_zeros_beyond_the_border():
    """Each scale j is the (s 2^j)-pixel square centred at the location, averaged down by 2^j x 2^j
    blocks, written here with plain slicing; a corner location reaches past the border (zeros)."""
    m = make().mechanism
    x = image(b=1)
    s = 3
    for loc in ([0.1, -0.3], [-1.0, 1.0], [0.97, -0.99]):
        l = torch.tensor([loc], dtype=torch.float64)
        got = m.retina(m.pyramid(x), l, (HH, WW))[0]  # (k, C, s, s)
        for j in range(3):
            f, size = 2 ** j, s * 2 ** j
            top, left = int(patch_corner(l[0, 1], size, HH)), int(patch_corner(l[0, 0], size, WW))
            big = torch.zeros(C, HH + 2 * size, WW + 2 * size, dtype=torch.float64)
            big[:, size:size + HH, size:size + WW] = x[0]
            crop = big[:, top + size:top + 2 * size, left + size:left + 2 * size]
            want = crop.reshape(C, s, f, s, f).mean(dim=(2, 4))
            torch.testing.assert_close(got[j], want, rtol=1e-12, atol=1e-12)
    # the centre: location 0 is the middle of the image
    assert int(patch_corner(torch.tensor(0.0), 4, 10)) == 3


def test_policy_is_a_seeded_gaussian_and_log_probs_match_it():
    m = make().train()
    x = image()
    a = m(x, N, generator=gen(5))
    b = m(x, N, generator=gen(5))
    c = m(x, N, generator=gen(6))
    torch.testing.assert_close(a.locations, b.locations, rtol=0, atol=0)
    assert not torch.allclose(a.locations, c.locations)
    std = m.mechanism.options.std
    # the unclamped draw is recovered where no clamping happened
    inside = (a.locations.abs() < 1).all(-1)
    normal = torch.distributions.Normal(a.means, std)
    want = normal.log_prob(a.locations).sum(-1)
    torch.testing.assert_close(a.log_probs[inside], want[inside], rtol=1e-12, atol=1e-12)
    assert inside.any()
    # in eval mode the mean is taken: the log-probability is the Gaussian's peak
    e = m.eval()(x, N)
    torch.testing.assert_close(e.log_probs, torch.full_like(e.log_probs, -2 * (math.log(std) + 0.5 * math.log(2 * math.pi))))


def test_step_equals_forward_and_each_glimpse_depends_only_on_earlier_ones():
    m = make().train()
    x = image()
    full = m(x, N, generator=gen(1))
    g, state, parts = gen(1), None, []
    for _ in range(N):
        r, state = m.step(x, state, generator=g)
        parts.append(r)
    assert state.length == N
    for i, field in enumerate(full):
        torch.testing.assert_close(torch.cat([p[i] for p in parts], 1), field, rtol=1e-12, atol=1e-12)
    # the state's batch rows can be selected (beam search): row 1 continues as if it were alone
    _, st = m.step(x, None, sample=False)
    picked, _ = m.step(x[[1]], st.select([1]), sample=False)
    _, st1 = m.step(x[[1]], None, sample=False)
    alone, _ = m.step(x[[1]], st1, sample=False)
    torch.testing.assert_close(picked.features, alone.features, rtol=1e-12, atol=1e-12)


def test_batch_independence_and_save_load():
    m = make().eval()
    x = image(b=3)
    both = m(x, N)
    for i in range(3):
        one = m(x[i:i + 1], N)
        torch.testing.assert_close(one.features, both.features[i:i + 1], rtol=1e-12, atol=1e-12)
    other = make(seed=1).eval()
    assert not torch.allclose(other(x, N).features, both.features)
    other.load_state_dict(m.state_dict())
    torch.testing.assert_close(other(x, N).features, both.features, rtol=0, atol=0)
    m32 = make(dtype=torch.float32).eval()
    assert m32(image(dtype=torch.float32), N).features.dtype == torch.float32


def test_reinforce_with_a_baseline_moves_the_policy_towards_the_reward():
    """Reward: closeness of the first glimpse to a target location. A few hundred REINFORCE steps bring
    the policy's mean there (no gradient reaches the policy except through the log-probabilities)."""
    torch.manual_seed(0)
    m = fastattn.GlimpseAttention(1, patch=2, scales=1, hidden=8, context_size=1, std=0.2).train()
    target = torch.tensor([0.5, -0.4])
    opt = torch.optim.Adam(m.parameters(), lr=0.03)
    x = torch.ones(32, 1, 6, 6)
    g = gen(0)
    before = m.eval()(x, 1).means[0, 0]
    m.train()
    for _ in range(150):
        r = m(x, 1, generator=g)
        reward = -((r.locations[:, 0] - target) ** 2).sum(-1)
        loss = fastattn.reinforce_loss(r, reward)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = m.eval()(x, 1).means[0, 0]
    assert (after - target).norm() < 0.15 < (before - target).norm()
    with pytest.raises(ValueError, match="reward"):
        fastattn.reinforce_loss(r, torch.zeros(3, 2))


def test_errors_and_the_other_facades_point_here():
    m = make()
    with pytest.raises(ValueError, match="channels"):
        m(torch.randn(2, C + 1, 5, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="num_glimpses"):
        m(image(), 0)
    with pytest.raises(ValueError, match="patch"):
        make(patch=0)
    with pytest.raises(ValueError, match="unknown option"):
        make(bogus=1)
    with pytest.raises(ValueError, match="GlimpseAttention"):
        fastattn.Attention2d(C, "glimpse")
    with pytest.raises(ValueError, match="GlimpseAttention"):
        fastattn.attention(*(torch.randn(1, 1, 4, 8) for _ in range(3)), method="glimpse")
    with pytest.raises(ValueError, match="not a glimpse mechanism"):
        fastattn.GlimpseAttention(C, "softmax")
    spec = fastattn.get_method("glimpse")
    assert spec.kind == "vision" and spec.family == "classic" and spec.causal and spec.decoding and spec.randomized
