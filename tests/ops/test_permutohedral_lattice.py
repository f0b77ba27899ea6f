"""The permutohedral-lattice Gaussian filter (fastattn/ops/permutohedral.py).

Chain of trust: the enclosing simplex and barycentric weights are checked from their definition; the
scatter/gather filter equals the dense splat-blur-slice matrices (values and gradients); the normalised
filter approaches exact Gaussian filtering as the lattice refines; excluded points and other batch
elements never interact; constant values pass through a normalised filter unchanged.
"""

from __future__ import annotations

import pytest
import torch

from fastattn.ops.permutohedral import (
    _enclosing_simplex, build_lattice, gaussian_filter_dense, lattice_filter, lattice_filter_dense,
)

B, N, C = 2, 23, 3


def inputs(dim: int, seed: int = 0, spread: float = 1.5, n: int = N):
    g = torch.Generator().manual_seed(seed)
    f = spread * torch.randn(B, n, dim, generator=g, dtype=torch.float64)
    v = torch.randn(B, n, C, generator=g, dtype=torch.float64)
    return f, v


def normalised(out: torch.Tensor) -> torch.Tensor:
    return out[..., :-1] / out[..., -1:]


def with_ones(v: torch.Tensor) -> torch.Tensor:
    return torch.cat([v, torch.ones_like(v[..., :1])], -1)


@pytest.mark.parametrize("dim", [1, 2, 4])
def test_enclosing_simplex_and_barycentric_weights(dim):
    d1 = dim + 1
    g = torch.Generator().manual_seed(dim)
    x = 3.0 * torch.randn(200, d1, generator=g, dtype=torch.float64)
    x = x - x.mean(-1, keepdim=True)  # on the hyperplane sum = 0
    keys, w = _enclosing_simplex(x)
    assert (w >= -1e-12).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(200, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close((w[..., None] * keys.to(x.dtype)).sum(1), x, rtol=1e-12, atol=1e-10)
    assert (keys.sum(-1) == 0).all()  # lattice points lie on the hyperplane
    rem = keys % d1
    assert (rem == rem[..., :1]).all()  # all coordinates of a lattice point agree mod d + 1
    assert (rem[..., 0] == torch.arange(d1)).all()  # vertex k has remainder k: d + 1 distinct vertices


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("masked", [False, True])
def test_scatter_gather_equals_dense_matrices_values_and_grads(dim, masked):
    f, v = inputs(dim)
    keep = None
    if masked:
        keep = torch.ones(B, N, dtype=torch.bool)
        keep[1, 15:] = False
    f.requires_grad_(True)
    v.requires_grad_(True)
    fast, ref = lattice_filter(f, v, keep), lattice_filter_dense(f, v, keep)
    torch.testing.assert_close(fast, ref, rtol=1e-11, atol=1e-12)
    w = torch.randn(fast.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gf = torch.autograd.grad((fast * w).sum(), [f, v])
    gr = torch.autograd.grad((ref * w).sum(), [f, v])
    for a, b in zip(gf, gr):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)
    assert gf[0].abs().sum() > 0  # the positions get a gradient through the barycentric weights


def test_position_gradient_is_the_derivative_of_the_filter():
    f, v = inputs(2, n=6)
    f.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p: lattice_filter(p, v), (f,), eps=1e-7, atol=1e-6)


def test_approaches_exact_gaussian_filtering_as_the_lattice_refines():
    f, v = inputs(2, seed=3)
    vv = with_ones(v)
    exact = normalised(gaussian_filter_dense(f, vv))
    errs = []
    for refine in (1, 2, 3):
        y = normalised(lattice_filter(f, vv, refine=refine))
        errs.append(((y - exact).norm() / exact.norm()).item())
    assert errs[0] < 0.15, errs  # the standard lattice: a few percent
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < 0.4 * errs[0], errs


def test_normalised_filter_keeps_constants_and_is_a_weighted_mean():
    f, v = inputs(3)
    const = torch.full((B, N, 1), 2.5, dtype=torch.float64)
    out = lattice_filter(f, torch.cat([const, torch.ones_like(const)], -1))
    torch.testing.assert_close(normalised(out), const, rtol=1e-12, atol=1e-12)
    ones = lattice_filter(f, torch.ones(B, N, 1, dtype=torch.float64))
    assert (ones > 0).all()
    y = normalised(lattice_filter(f, with_ones(v)))  # a convex combination: inside the values' range
    assert (y <= v.amax(1, keepdim=True) + 1e-12).all() and (y >= v.amin(1, keepdim=True) - 1e-12).all()


def test_excluded_points_and_other_batch_elements_never_interact():
    f, v = inputs(2)
    keep = torch.ones(B, N, dtype=torch.bool)
    keep[0, ::3] = False
    out = lattice_filter(f, v, keep)
    f2, v2 = f.clone(), v.clone()
    f2[~keep] += 0.7
    v2[~keep] = 5.0
    f2[1] = inputs(2, seed=9)[0][1]  # another image in slot 1
    v2[1] = 1.0
    out2 = lattice_filter(f2, v2, keep)
    torch.testing.assert_close(out2[0], out[0], rtol=0, atol=1e-13)
    assert (out[~keep] == 0).all()
    alone = lattice_filter(f[:1, keep[0]], v[:1, keep[0]])  # the kept points of image 0 on their own
    torch.testing.assert_close(out[0, keep[0]], alone[0], rtol=1e-12, atol=1e-13)


def test_every_point_excluded_and_bad_arguments():
    f, v = inputs(2)
    out = lattice_filter(f, v, torch.zeros(B, N, dtype=torch.bool))
    assert torch.equal(out, torch.zeros_like(out))
    with pytest.raises(ValueError, match="refine"):
        build_lattice(f, refine=0)
    with pytest.raises(ValueError, match="positions"):
        build_lattice(f[0])
