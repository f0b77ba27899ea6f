"""Sparse Sinkhorn attention's defining properties: the sorting matrix is doubly stochastic (more so with
more iterations), tends to a permutation as tau -> 0, is strictly lower-triangular and built from past
blocks in the causal form; S = I is block-local attention; Gumbel noise only in training, reproducible
from buffers; the SortNet learns (gradients) and its width bounds the length."""

from __future__ import annotations

import pytest
import torch

import fastattn
from fastattn.core.masks import Mask
from fastattn.registry import get_method


def _mech(seed=0, h=2, e=16, **options):
    spec = get_method("sinkhorn")
    opts = {"block": 8, "max_length": 64, **options}
    return spec.cls(spec.make_options(**opts), head_dim=e, num_heads=h,
                    generator=torch.Generator().manual_seed(seed)).double().eval()


def _qkv(n=61, seed=0, ev=8):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 2, n, d, generator=g, dtype=torch.float64) for d in (16, 16, ev))


def _dev(s):
    return max((s.sum(-1) - 1).abs().max().item(), (s.sum(-2) - 1).abs().max().item())


def test_sorting_matrix_is_doubly_stochastic():
    _, k, _ = _qkv()
    mask = Mask(61, 61)
    devs = [_dev(_mech(iterations=it).sorting_matrix(k, mask)) for it in (1, 10, 100, 1000)]
    assert all(a > b for a, b in zip(devs, devs[1:])), devs
    assert devs[-1] < 2e-3  # slow where the ReLU scores are sparse (log(0 + eps))
    s = _mech(iterations=10).sorting_matrix(k, mask)
    assert s.shape == (2, 2, 8, 8) and (s >= 0).all()


def test_low_temperature_gives_a_permutation(monkeypatch):
    _, k, _ = _qkv(seed=1)
    mech = _mech(temperature=0.02, iterations=300)
    g = torch.Generator().manual_seed(0)
    perm = torch.nn.functional.one_hot(torch.randperm(8, generator=g), 8).to(torch.float64)
    r = 2 * perm + torch.rand(2, 2, 8, 8, generator=g, dtype=torch.float64) + 0.1  # a permutation plus noise
    monkeypatch.setattr(mech, "sortnet", lambda k, mask: r)
    assert (mech.sorting_matrix(k, Mask(61, 61)) - perm).abs().max() < 1e-3
    mech.options = type(mech.options)(block=8, max_length=64, temperature=1.0, iterations=300)
    assert (mech.sorting_matrix(k, Mask(61, 61)) - perm).abs().max() > 0.3  # soft at tau = 1


def test_causal_sorting_is_strictly_lower_triangular_and_from_past_blocks():
    _, k, _ = _qkv(seed=2)
    mech = _mech()
    s = mech.sorting_matrix(k, Mask(61, 61, causal=True))
    assert (s.triu() == 0).all() and (s[..., 1:, :].sum(-1) > 0).all()
    assert (s <= 1 + 1e-12).all()
    k2 = k.clone()
    k2[:, :, 32:] = 5 * torch.randn_like(k2[:, :, 32:])  # blocks 4.. change
    s2 = mech.sorting_matrix(k2, Mask(61, 61, causal=True))
    torch.testing.assert_close(s2[..., :5, :], s[..., :5, :])  # rows 0..4 read blocks 0..3 only
    assert not torch.allclose(s2[..., 5:, :], s[..., 5:, :])


def test_identity_sorting_is_block_local_attention(monkeypatch):
    q, k, v = _qkv(seed=3)
    mech = _mech()
    kpm = torch.zeros(2, 61, dtype=torch.bool)
    kpm[1, 45:] = True
    eye = torch.eye(8, dtype=torch.float64).expand(2, 2, 8, 8)
    monkeypatch.setattr(mech, "sorting_matrix", lambda k, mask: eye)
    out = mech.run(q, k, v, key_padding_mask=kpm)
    blk = torch.arange(61) // 8
    ref = fastattn.attention(q, k, v, "softmax", key_padding_mask=kpm, attn_mask=blk[:, None] != blk[None, :])
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


def test_gumbel_noise_in_training_only_reproducible_and_saved():
    q, k, v = _qkv(seed=4)
    a, b = _mech(seed=7), _mech(seed=7)
    torch.testing.assert_close(a.run(q, k, v), a.run(q, k, v))  # eval: no noise
    a.train(), b.train()
    a1, a2 = a.run(q, k, v), a.run(q, k, v)
    assert not torch.allclose(a1, a2)  # a fresh draw per training forward
    torch.testing.assert_close(b.run(q, k, v), a1)  # same seed, same stream
    c = _mech(seed=8).train()
    c.load_state_dict(a.state_dict())  # the stream's position travels with the module
    torch.testing.assert_close(c.run(q, k, v), a.run(q, k, v))


def test_sortnet_learns_and_bounds_the_length():
    q, k, v = _qkv(seed=5)
    mech = _mech()
    for causal in (False, True):
        mech.zero_grad()
        mech.run(q, k, v, is_causal=causal).square().sum().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mech.parameters())
    q, k, v = _qkv(n=65)
    with pytest.raises(ValueError, match="max_length"):
        mech.run(q, k, v)


def test_noncausal_needs_equal_lengths():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="Lq"):
        _mech().run(q[:, :, :5], k, v)
