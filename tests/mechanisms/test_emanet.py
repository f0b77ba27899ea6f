"""emanet (EM attention, arXiv:1907.13426): the defining properties.

Responsibilities are a softmax over the K bases (rows sum to 1); the bases stay unit-norm, after every
forward and in the moving-average buffer; the reconstruction ``mu Z^T`` has rank ``<= K``; the result
equals a plain soft-EM written here from the equations; the buffer follows the batch-mean moving
average in training only and survives save/load; the gradient policy (last step / none, the authors'
code) decides whether ``conv1`` learns; padding pixels never shape the bases.
"""

from __future__ import annotations

import pytest
import torch

import fastattn
from helpers import feature_map, grads, pixel_mask, randomized, through_bytes

C, B, HH, WW, K = 16, 2, 5, 7, 4


def make(seed: int = 0, **options) -> fastattn.Attention2d:
    return randomized(fastattn.Attention2d(C, "emanet", dtype=torch.float64, **{"bases": K, **options}), seed)


def soft_em(e: torch.Tensor, mu: torch.Tensor, stages: int, keep: torch.Tensor | None = None):
    """Soft k-means on the unit sphere: ``e (C, N)``, ``mu (C, K)``."""
    w = torch.ones(e.shape[1], dtype=e.dtype) if keep is None else keep.to(e.dtype)
    for _ in range(stages):
        z = torch.softmax(e.T @ mu, dim=1)
        zw = z * w[:, None]
        mu = e @ zw / (1e-6 + zw.sum(0))
        mu = mu / (1e-6 + mu.norm(dim=0))
    return mu, z


@pytest.mark.parametrize("masked", [False, True])
def test_em_is_soft_em_with_unit_bases_and_stochastic_responsibilities(masked):
    m = make(stages=4)
    x = feature_map(channels=C)
    mask = pixel_mask() if masked else None
    mu, z = m.block.em(x, mask)
    assert mu.shape == (B, C, K) and z.shape == (B, HH * WW, K)
    torch.testing.assert_close(z.sum(-1), torch.ones(B, HH * WW, dtype=torch.float64), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(mu.norm(dim=1), torch.ones(B, K, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    e = m.block.conv1(x).flatten(2)
    for n in range(B):
        keep = None if mask is None else ~mask[n].flatten()
        mu_n, z_n = soft_em(e[n], m.block.mu[0], 4, keep)
        torch.testing.assert_close(mu[n], mu_n, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(z[n], z_n, rtol=1e-12, atol=1e-12)


def test_output_is_the_rank_k_reconstruction_through_conv2_bn_and_residual():
    m = make()
    blk = m.block
    x = feature_map(channels=C)
    mu, z = blk.em(x)
    rebuilt = mu @ z.transpose(1, 2)  # (B, C, N)
    assert all(torch.linalg.matrix_rank(rebuilt[n]).item() <= K for n in range(B))
    want = torch.relu(blk.bn(blk.conv2(torch.relu(rebuilt.view(B, C, HH, WW)))) + x)
    torch.testing.assert_close(m(x), want, rtol=1e-12, atol=1e-12)


def test_bases_buffer_moving_average_in_training_only_and_unit_norm():
    m = make()
    blk = m.block
    x = feature_map(channels=C)
    before = blk.mu.clone()
    m(x)
    assert torch.equal(blk.mu, before), "eval mode must not touch the bases"
    mu_t, _ = blk.em(x)
    m.train()
    m(x)
    want = 0.9 * before + 0.1 * mu_t.mean(0, keepdim=True)
    torch.testing.assert_close(blk.mu, want / (1e-6 + want.norm(dim=1, keepdim=True)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(blk.mu.norm(dim=1), torch.ones(1, K, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    assert "mu" in blk.state_dict()
    other = make(seed=3)
    other.load_state_dict(through_bytes(m.state_dict()))
    assert torch.equal(other.block.mu, blk.mu)


def test_gradient_policy():
    x = feature_map(channels=C)
    for policy, conv1_learns in (("last", True), ("none", False)):
        m = make(gradient=policy)
        g1, g2 = grads(m(x), [m.block.conv1.weight, m.block.conv2.weight])
        assert (g1 is not None and g1.abs().sum() > 0) == conv1_learns, policy
        assert g2.abs().sum() > 0  # conv2 learns either way


def test_more_bases_than_pixels():
    m = make(bases=HH * WW + 5)
    x = feature_map(channels=C)
    y = m(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, m.block.reference(x), rtol=1e-10, atol=1e-10)


def test_errors():
    for bad in ({"bases": 0}, {"stages": 0}, {"momentum": 1.5}, {"gradient": "all"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            fastattn.Attention2d(C, "emanet", **bad)
    m = make()
    m.train()
    before = m.block.mu.clone()
    with pytest.raises(ValueError, match="padding"):
        m(feature_map(channels=C), pixel_mask())
    assert torch.equal(m.block.mu, before)  # a refused call leaves the bases alone
