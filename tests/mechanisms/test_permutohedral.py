"""permutohedral (PAM, arXiv:1907.00641): the defining properties.

The exact block is softmax attention with ``q = k = f``, scale 1 and key bias ``-||f_j||^2 / 2`` (the
Gaussian kernel, normalised); the lattice block is close to it and closer as the lattice refines;
constant values give a constant update; the zero-initialised output conv makes the block the identity;
pixel coordinates enter the embedding.
"""

from __future__ import annotations

import pytest
import torch

import fastattn
from fastattn.ops.permutohedral import gaussian_filter_dense
from helpers import feature_map, pixel_mask, randomized

C, B, HH, WW = 8, 2, 5, 7


def make(seed: int = 0, std: float = 0.4, **options) -> fastattn.Attention2d:
    m = fastattn.Attention2d(C, "permutohedral", dtype=torch.float64, **{"feature_dim": 2, **options})
    return randomized(m, seed, std)


@pytest.mark.parametrize("masked", [False, True])
def test_exact_block_is_the_normalised_gaussian_kernel(masked):
    m = make()
    blk = m.block
    x = feature_map(channels=C)
    mask = pixel_mask() if masked else None
    f, g1 = blk.embed(x)
    keep = None if mask is None else ~mask.flatten(1)
    filt = gaussian_filter_dense(f, g1, keep)
    y = filt[..., :-1] / filt[..., -1:]
    want = x + blk.out(y.transpose(1, 2).reshape(B, C, HH, WW))
    got = blk.exact(x, mask)
    real = torch.ones_like(x, dtype=torch.bool) if mask is None else ~mask[:, None].expand_as(x)
    torch.testing.assert_close(got[real], want[real], rtol=1e-12, atol=1e-12)


def test_lattice_block_approaches_the_exact_block_as_the_lattice_refines():
    x = feature_map(channels=C, h=6, w=6, seed=2)
    errs = []
    for refine in (1, 3):
        m = make(refine=refine, std=0.3)
        exact = m.block.exact(x) - x
        errs.append(((m(x) - x - exact).norm() / exact.norm()).item())
    assert errs[0] < 0.2 and errs[1] < 0.5 * errs[0], errs


def test_constant_values_give_the_same_update_everywhere():
    m = make()
    blk = m.block
    with torch.no_grad():
        blk.values.weight.zero_()  # g_j = bias, the same at every pixel
    x = feature_map(channels=C)
    d = (m(x) - x).flatten(2)
    torch.testing.assert_close(d, d[:, :, :1].expand_as(d), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d[:, :, 0], blk.out(blk.values.bias[None, :, None, None]).flatten(1).expand(B, -1),
                               rtol=1e-12, atol=1e-12)


def test_zero_initialised_output_is_the_identity_and_positions_matter():
    m = fastattn.Attention2d(C, "permutohedral", dtype=torch.float64)
    x = feature_map(channels=C)
    torch.testing.assert_close(m(x), x, rtol=0, atol=0)
    assert m.block.features.in_channels == C + 2
    assert fastattn.Attention2d(C, "permutohedral", position_scale=0.0).block.features.in_channels == C
    a, b = make(), make(position_scale=0.5)
    assert not torch.allclose(a(x), b(x))


def test_errors():
    for bad, word in (({"feature_dim": 9}, "feature_dim"), ({"refine": 0}, "refine"),
                      ({"position_scale": -1.0}, "position_scale"), ({"value_channels": 0}, "value_channels")):
        with pytest.raises(ValueError, match=word):
            fastattn.Attention2d(C, "permutohedral", **bad)
    with pytest.raises(ValueError, match="num_heads"):
        fastattn.Attention2d(C, "permutohedral", num_heads=2)
