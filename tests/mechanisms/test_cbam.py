"""cbam (Convolutional Block Attention Module, arXiv:1807.06521): the defining properties.

Channel attention (shared MLP over the average- and max-pooled descriptors, summed, sigmoid) then
spatial attention (channel-wise average and max maps, k x k convolution, sigmoid), in that order;
gates in (0, 1); the output is ``x * M_c * M_s``; the paper's ``[avg; max]`` order equals the authors'
``[max; mean]`` with the convolution's input channels swapped; pooling over real pixels only.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastattn
from helpers import feature_map, pixel_mask, randomized

C, B, HH, WW = 16, 2, 5, 7


def make(seed: int = 0, **options) -> fastattn.Attention2d:
    return randomized(fastattn.Attention2d(C, "cbam", dtype=torch.float64, **{"reduction": 4, **options}), seed)


def channel(blk, f):
    mc = torch.sigmoid(blk.mlp(f.mean(dim=(2, 3))) + blk.mlp(f.amax(dim=(2, 3))))[:, :, None, None]
    return mc, mc * f


def spatial(blk, f, order=("avg", "max")):
    maps = {"avg": f.mean(dim=1, keepdim=True), "max": f.amax(dim=1, keepdim=True)}
    ms = torch.sigmoid(blk.spatial(torch.cat([maps[o] for o in order], dim=1)))
    return ms, ms * f


def test_channel_then_spatial_not_the_reverse():
    m = make()
    blk, x = m.block, feature_map(channels=C)
    mc, f1 = channel(blk, x)
    ms, f2 = spatial(blk, f1)
    torch.testing.assert_close(m(x), f2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m(x), x * mc * ms, rtol=1e-12, atol=1e-12)
    assert ((mc > 0) & (mc < 1)).all() and ((ms > 0) & (ms < 1)).all()
    _, g1 = spatial(blk, x)
    _, reversed_order = channel(blk, g1)
    assert not torch.allclose(m(x), reversed_order)


def test_paper_order_avg_max_equals_code_order_with_swapped_weights():
    m = make()
    x = feature_map(channels=C)
    code = make()
    with torch.no_grad():
        code.block.spatial.weight.copy_(m.block.spatial.weight.flip(1))  # input channels [max, mean]
    _, f1 = channel(code.block, x)
    _, want = spatial(code.block, f1, order=("max", "avg"))
    torch.testing.assert_close(m(x), want, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(code(x), m(x))  # the order matters


def test_pooling_runs_over_real_pixels_only():
    m = make()
    mask = pixel_mask()
    x = feature_map(channels=C)
    y = m(x, mask)
    crop = x[1:, :, :HH - 2, :WW - 3]
    torch.testing.assert_close(y[1:, :, :HH - 2, :WW - 3], m(crop), rtol=1e-12, atol=1e-12)
    # the mask is honoured by the channel gate too: a huge padding value would win the max pool
    x2 = torch.where(mask[:, None], torch.full_like(x, 100.0), x)
    torch.testing.assert_close(m(x2, mask)[0], y[0])
    torch.testing.assert_close(m(x2, mask)[1, :, :HH - 2, :WW - 3], y[1, :, :HH - 2, :WW - 3])


def test_the_spatial_convolution_sees_zero_maps_at_padding_pixels():
    m = make(spatial_kernel=7)
    mask = pixel_mask()
    x = feature_map(channels=C)
    blk = m.block
    mc = torch.sigmoid(blk.mlp(x[1:, :, :3, :4].mean(dim=(2, 3))) + blk.mlp(x[1:, :, :3, :4].amax(dim=(2, 3))))
    f = mc[:, :, None, None] * x[1:]
    maps = torch.cat([f.mean(1, keepdim=True), f.amax(1, keepdim=True)], 1) * (~mask[1:, None]).double()
    want = torch.sigmoid(F.conv2d(maps, blk.spatial.weight, blk.spatial.bias, padding=3)) * f
    torch.testing.assert_close(m(x, mask)[1:, :, :3, :4], want[:, :, :3, :4], rtol=1e-12, atol=1e-12)


def test_batch_norm_option_and_errors():
    m = make(spatial_bn=True)
    assert m.block.spatial.bias is None and isinstance(m.block.bn, torch.nn.BatchNorm2d)
    x = feature_map(channels=C)
    torch.testing.assert_close(m(x), m.reference(x))
    m.train()
    with pytest.raises(ValueError, match="padding mask"):
        m(x, pixel_mask())
    assert make(mlp_bias=False).block.mlp[0].bias is None
    with pytest.raises(ValueError, match="reduction"):
        fastattn.Attention2d(8, "cbam")  # 8 // 16 = 0 hidden units
    with pytest.raises(ValueError, match="odd"):
        fastattn.Attention2d(C, "cbam", spatial_kernel=4)
    with pytest.raises(ValueError, match="scale"):
        fastattn.Attention2d(C, "cbam", scale=1.0)
