"""gcnet (global context block, arXiv:1904.11492): the defining properties.

The pooling weights are a softmax over the (real) positions and sum to 1; the context is the
softmax-weighted average of the features; with fusion "add" the output is ``x + transform(context)``,
the same vector added at every pixel (query-independent); fusion "scale" multiplies by its sigmoid; the
transform is conv, LayerNorm, ReLU, conv; the zero-initialised last conv makes the block the identity.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastattn
from helpers import feature_map, pixel_mask, randomized

C, B, HH, WW = 16, 2, 5, 7


def make(seed: int = 0, **options) -> fastattn.Attention2d:
    return randomized(fastattn.Attention2d(C, "gcnet", dtype=torch.float64, **{"reduction": 4, **options}), seed)


def test_pooling_weights_are_a_softmax_over_real_positions_summing_to_one():
    m = make()
    x, mask = feature_map(channels=C), pixel_mask()
    alpha = m.block.pooling_weights(x, mask)
    assert alpha.shape == (B, HH * WW) and (alpha >= 0).all()
    torch.testing.assert_close(alpha.sum(-1), torch.ones(B, dtype=torch.float64), rtol=1e-14, atol=1e-14)
    assert (alpha[1][mask[1].flatten()] == 0).all() and (alpha[1][~mask[1].flatten()] > 0).all()
    logits = (m.block.key.weight[0, :, 0, 0] @ x.flatten(2))  # (B, HW): W_k x
    torch.testing.assert_close(m.block.pooling_weights(x), torch.softmax(logits, -1), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("masked", [False, True])
def test_output_is_x_plus_the_transformed_weighted_average_everywhere(masked):
    m = make()
    blk = m.block
    x = feature_map(channels=C)
    mask = pixel_mask() if masked else None
    alpha = blk.pooling_weights(x, mask)
    context = (x.flatten(2) * alpha[:, None]).sum(-1)  # the softmax-weighted average of the features
    w1, ln, w2 = blk.transform[0], blk.transform[1], blk.transform[3]
    t = F.linear(torch.relu(F.layer_norm(F.linear(context, w1.weight, w1.bias), (C // 4,), ln.weight, ln.bias)),
                 w2.weight, w2.bias)
    y = m(x, mask)
    real = torch.ones(B, HH, WW, dtype=torch.bool) if mask is None else ~mask
    diff = (y - x).permute(0, 2, 3, 1)  # (B, H, W, C)
    for n in range(B):
        d = diff[n][real[n]]  # (real pixels, C): the same vector at every real pixel
        torch.testing.assert_close(d, t[n].expand_as(d), rtol=1e-12, atol=1e-12)


def test_scale_fusion_multiplies_by_the_sigmoid():
    m = make(fusion="scale")
    blk = m.block
    x = feature_map(channels=C)
    context = (x.flatten(2) * blk.pooling_weights(x)[:, None]).sum(-1)
    want = x * torch.sigmoid(blk.transform(context))[:, :, None, None]
    torch.testing.assert_close(m(x), want, rtol=1e-12, atol=1e-12)


def test_zero_initialised_last_conv_is_the_identity():
    m = fastattn.Attention2d(C, "gcnet", dtype=torch.float64)
    assert m.block.transform[3].weight.abs().sum() == 0
    x = feature_map(channels=C)
    torch.testing.assert_close(m(x), x, rtol=0, atol=0)


def test_layer_norm_is_per_image_over_the_bottleneck():
    """A batch of one image equals that image in a batch (no batch statistics), and the LayerNorm
    spans the C / r bottleneck channels."""
    m = make()
    assert m.block.transform[1].normalized_shape == (C // 4,)
    x = feature_map(channels=C)
    torch.testing.assert_close(m(x[1:]), m(x)[1:], rtol=1e-13, atol=1e-13)


def test_errors():
    with pytest.raises(ValueError, match="fusion"):
        fastattn.Attention2d(C, "gcnet", fusion="concat")
    with pytest.raises(ValueError, match="reduction"):
        fastattn.Attention2d(8, "gcnet")
    with pytest.raises(ValueError, match="num_heads"):
        fastattn.Attention2d(C, "gcnet", num_heads=2)
