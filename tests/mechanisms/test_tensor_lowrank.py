"""tensor_lowrank (RecoNet, arXiv:2008.00490): the defining properties.

The attention tensor is a sum of ``r`` rank-1 tensors (its channel unfolding has rank ``<= r``, an outer
product at ``r = 1``), non-negative when the weights ``lambda`` are; each factor is the sigmoid of a 1x1
conv of one global pooling; the output is ``X * A`` (fusion multiply) or the 1x1 conv of ``[X; X * A]``;
other sizes are pooled and interpolated, ``strict=True`` refuses them.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastattn
from helpers import feature_map, randomized

C, B, HH, WW = 16, 2, 5, 7


def make(seed: int = 0, **options) -> fastattn.Attention2d:
    opts = {"rank": 3, "size": (HH, WW), **options}
    return randomized(fastattn.Attention2d(C, "tensor_lowrank", dtype=torch.float64, **opts), seed)


@pytest.mark.parametrize("rank, size", [(1, (HH, WW)), (3, (HH, WW)), (2, (3, 4))])
def test_attention_tensor_has_cp_rank_at_most_r(rank, size):
    m = make(rank=rank, size=size)
    x = feature_map(channels=C)
    a = m.block.attention_tensor(x)
    assert a.shape == x.shape
    for n in range(B):
        for unfold in (a[n].reshape(C, -1), a[n].permute(1, 0, 2).reshape(HH, -1), a[n].permute(2, 0, 1).reshape(WW, -1)):
            assert torch.linalg.matrix_rank(unfold).item() <= rank
    if rank == 1:  # one outer product: every (c, h) slice is proportional to the same row over w
        a0 = a[0]
        torch.testing.assert_close(a0 * a0.sum(), a0.sum(dim=(1, 2), keepdim=True) * a0.sum(dim=(0, 2), keepdim=True)
                                   * a0.sum(dim=(0, 1), keepdim=True) / a0.sum(), rtol=1e-10, atol=1e-12)


def test_factors_are_sigmoids_of_the_three_global_poolings_and_nonnegative():
    m = make()
    blk = m.block
    with torch.no_grad():
        blk.weights.abs_()
    x = feature_map(channels=C)
    v_c, v_h, v_w = blk.generators(x)
    torch.testing.assert_close(v_c, torch.sigmoid(blk.channel_gen(x.mean(dim=(2, 3)))).view(B, 3, C))
    torch.testing.assert_close(v_h, torch.sigmoid(blk.height_gen(x.mean(dim=(1, 3)))).view(B, 3, HH))
    torch.testing.assert_close(v_w, torch.sigmoid(blk.width_gen(x.mean(dim=(1, 2)))).view(B, 3, WW))
    a = blk.attention_tensor(x)
    want = sum(blk.weights[i] * torch.einsum("bc,bh,bw->bchw", v_c[:, i], v_h[:, i], v_w[:, i]) for i in range(3))
    torch.testing.assert_close(a, want, rtol=1e-12, atol=1e-14)
    assert (a >= 0).all()


def test_fusions():
    m = make(fusion="multiply")
    x = feature_map(channels=C)
    torch.testing.assert_close(m(x), x * m.block.attention_tensor(x), rtol=0, atol=0)
    m = make(fusion="concat")
    fuse = m.block.fuse
    want = F.conv2d(torch.cat([x, x * m.block.attention_tensor(x)], 1), fuse.weight, fuse.bias)
    torch.testing.assert_close(m(x), want, rtol=1e-12, atol=1e-12)


def test_other_sizes_are_pooled_and_interpolated_or_refused_when_strict():
    m = make(size=(3, 4))
    x = feature_map(channels=C)
    a = m.block.attention_tensor(x)
    small = m.block.attention_tensor(F.adaptive_avg_pool2d(x, (3, 4)))  # the tensor at (h, w) itself
    torch.testing.assert_close(a, F.interpolate(small, size=(HH, WW), mode="bilinear", align_corners=False),
                               rtol=1e-12, atol=1e-12)
    strict = make(size=(3, 4), strict=True)
    with pytest.raises(ValueError, match="size"):
        strict(x)
    strict(F.adaptive_avg_pool2d(x, (3, 4)))


def test_errors():
    with pytest.raises(ValueError, match="rank"):
        fastattn.Attention2d(C, "tensor_lowrank", rank=0)
    with pytest.raises(ValueError, match="size"):
        fastattn.Attention2d(C, "tensor_lowrank", size=(0, 3))
    with pytest.raises(ValueError, match="fusion"):
        fastattn.Attention2d(C, "tensor_lowrank", fusion="add")
    with pytest.raises(ValueError, match="num_heads"):
        fastattn.Attention2d(C, "tensor_lowrank", num_heads=2)
