"""autonl (LightNL, arXiv:2004.01961): the defining properties.

Query and key are channel slices of the input (no projections), keys and values strided; both
multiplication orders agree; the divisor is ``H W`` of the full map even when sub-sampled; the output is
``x + DWConv3x3(f)``; zero initialisation gives the identity; the cost rule picks the cheaper order.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastattn
from helpers import feature_map, grads, pixel_mask, randomized

C, B, HH, WW = 16, 2, 5, 7


def make(seed: int = 0, **options) -> fastattn.Attention2d:
    return randomized(fastattn.Attention2d(C, "autonl", dtype=torch.float64, **options), seed)


def code_formula(m: fastattn.Attention2d, x: torch.Tensor, ratio: float, stride: int) -> torch.Tensor:
    """The authors' non_local_op in channels-last einsum form, then the depthwise conv and the residual."""
    l = x.permute(0, 2, 3, 1)  # (B, H, W, C)  # noqa: E741
    r = int(ratio * C)
    ls = l[:, ::stride, ::stride]
    theta, phi, g = l[..., :r], ls[..., :r], ls
    f = torch.einsum("nabi,ncdi->nabcd", theta, phi)
    f = torch.einsum("nabcd,ncdi->nabi", f, g) / (HH * WW)
    f = f.permute(0, 3, 1, 2)
    return x + F.conv2d(f, m.block.dwconv.weight, padding=1, groups=C)


@pytest.mark.parametrize("ratio,stride", [(0.25, 1), (0.5, 2), (1.0, 2), (0.25, 3)])
def test_equals_the_authors_formula_with_the_full_map_divisor(ratio, stride):
    m = make(ratio=ratio, stride=stride)
    x = feature_map(channels=C)
    torch.testing.assert_close(m(x), code_formula(m, x, ratio, stride), rtol=1e-12, atol=1e-12)
    if stride > 1:  # dividing by the sub-sampled count instead would be another block
        keys = len(range(0, HH, stride)) * len(range(0, WW, stride))
        wrong = x + (code_formula(m, x, ratio, stride) - x) * (HH * WW) / keys
        assert not torch.allclose(m(x), wrong)


@pytest.mark.parametrize("masked", [False, True])
def test_both_multiplication_orders_agree(masked):
    lin, quad = make(order="linear", stride=2), make(order="quadratic", stride=2)
    mask = pixel_mask() if masked else None
    x = feature_map(channels=C, requires_grad=True)
    a, b = lin(x, mask), quad(x, mask)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for ga, gb in zip(grads(a, [x, *lin.parameters()]), grads(b, [x, *quad.parameters()])):
        torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-12)


def test_auto_order_follows_the_cost_rule():
    m = make()
    assert m.block.quadratic_is_cheaper(2, 2)  # few pixels: (theta phi^T) g
    assert not m.block.quadratic_is_cheaper(64, 64)  # many pixels: theta (phi^T g)
    x = feature_map(channels=C, h=2, w=2)
    torch.testing.assert_close(m(x), make(order="quadratic")(x), rtol=0, atol=0)


def test_no_projections_only_the_depthwise_conv():
    m = fastattn.Attention2d(C, "autonl", dtype=torch.float64)
    assert [n for n, _ in m.named_parameters()] == ["block.dwconv.weight"]
    assert m.block.dwconv.weight.shape == (C, 1, 3, 3)
    x = feature_map(channels=C)
    torch.testing.assert_close(m(x), x, rtol=0, atol=0)  # zero init: the identity
    mb = fastattn.Attention2d(C, "autonl", norm="batch", dtype=torch.float64).eval()
    torch.testing.assert_close(mb(x), x, rtol=0, atol=0)  # the code's nl_zero_init on the BN scale
    assert fastattn.Attention2d(C, "autonl", zero_init=False).block.dwconv.weight.abs().sum() > 0


def test_batch_norm_in_training_refuses_a_mask_and_bad_options_raise():
    m = make(norm="batch").train()
    with pytest.raises(ValueError, match="padding mask"):
        m(feature_map(channels=C), pixel_mask())
    with pytest.raises(ValueError, match="ratio"):
        fastattn.Attention2d(C, "autonl", ratio=0.0)
    with pytest.raises(ValueError, match="channels"):
        fastattn.Attention2d(2, "autonl", ratio=0.25)
    with pytest.raises(ValueError, match="order"):
        fastattn.Attention2d(C, "autonl", order="fast")
