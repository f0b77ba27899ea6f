"""nonlocal (the non-local block, arXiv:1711.07971): the defining properties.

The embedded Gaussian is softmax attention of theta over phi, g with scale 1 (no 1/sqrt(d)) on the
flattened pixels; the dot form divides by the number of (sub-sampled, real) keys; sub-sampling is a 2x2
max pool of phi and g; zero initialisation makes the block the identity; the efficient path equals the
dense formula in every variant (values and gradients, with and without padding) and stores no HW x HW
tensor.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastattn
from helpers import feature_map, grads, largest_saved_tensor, pixel_mask, randomized

C, B, HH, WW = 8, 2, 5, 7


def make(seed: int = 0, channels: int = C, **options) -> fastattn.Attention2d:
    return randomized(fastattn.Attention2d(channels, "nonlocal", dtype=torch.float64, **{"block": 8, **options}), seed)


def image(b=B, h=HH, w=WW, seed=0, channels=C, requires_grad=False):
    return feature_map(b, channels, h, w, seed, requires_grad=requires_grad)


def flat(t):  # (B, C, H, W) -> (B, 1, HW, C): one head over the pixels
    return t.flatten(2).transpose(1, 2)[:, None]


def test_default_method_of_attention2d_is_the_non_local_block_and_starts_as_identity():
    m = fastattn.Attention2d(C, dtype=torch.float64)
    assert m.method == "nonlocal"
    x = image()
    torch.testing.assert_close(m(x), x, rtol=0, atol=0)  # W_z zero-initialised
    mb = fastattn.Attention2d(C, norm="batch", dtype=torch.float64).eval()
    assert mb.block.bn.weight.abs().sum() == 0
    torch.testing.assert_close(mb(x), x, rtol=0, atol=0)  # the paper's zero-scale BN


def test_embedded_gaussian_is_softmax_attention_with_scale_one():
    m = make()
    blk = m.block
    x = image()
    theta, phi, g = flat(blk.theta(x)), flat(blk.phi(x)), flat(blk.g(x))
    y = fastattn.attention(theta, phi, g, method="softmax", scale=1.0)
    want = x + blk.w_z(y[:, 0].transpose(1, 2).reshape(B, C // 2, HH, WW))
    torch.testing.assert_close(m(x), want, rtol=1e-10, atol=1e-12)
    # and not the scaled dot-product default d ** -0.5
    y2 = fastattn.attention(theta, phi, g, method="softmax")
    assert not torch.allclose(m(x), x + blk.w_z(y2[:, 0].transpose(1, 2).reshape(B, C // 2, HH, WW)))
    # scale= overrides
    m_half = make(scale=0.5)
    y3 = fastattn.attention(theta, phi, g, method="softmax", scale=0.5)
    torch.testing.assert_close(m_half(x), x + blk.w_z(y3[:, 0].transpose(1, 2).reshape(B, C // 2, HH, WW)))


def test_gaussian_uses_the_input_itself():
    m = make(f="gaussian")
    assert not hasattr(m.block, "theta")
    x = image()
    w = torch.softmax(flat(x) @ flat(x).transpose(-1, -2), dim=-1)
    y = (w @ flat(m.block.g(x)))[:, 0]
    want = x + m.block.w_z(y.transpose(1, 2).reshape(B, C // 2, HH, WW))
    torch.testing.assert_close(m(x), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("subsample", [False, True])
def test_dot_divides_by_the_number_of_keys(subsample):
    m = make(f="dot", subsample=subsample)
    blk = m.block
    x = image()
    theta, phi, g = blk.theta(x), blk.phi(x), blk.g(x)
    if subsample:
        phi = F.max_pool2d(phi, 2, ceil_mode=True)
        g = F.max_pool2d(g, 2, ceil_mode=True)
    n = phi.shape[2] * phi.shape[3]
    assert n == (3 * 4 if subsample else HH * WW)
    y = ((flat(theta) @ flat(phi).transpose(-1, -2)) / n @ flat(g))[:, 0]
    want = x + blk.w_z(y.transpose(1, 2).reshape(B, C // 2, HH, WW))
    torch.testing.assert_close(m(x), want, rtol=1e-10, atol=1e-12)


def test_subsample_is_a_2x2_max_pool_of_phi_and_g():
    m = make(subsample=True)
    blk = m.block
    x = image()
    phi, g = F.max_pool2d(blk.phi(x), 2, ceil_mode=True), F.max_pool2d(blk.g(x), 2, ceil_mode=True)
    y = fastattn.attention(flat(blk.theta(x)), flat(phi), flat(g), method="softmax", scale=1.0)
    want = x + blk.w_z(y[:, 0].transpose(1, 2).reshape(B, C // 2, HH, WW))
    torch.testing.assert_close(m(x), want, rtol=1e-10, atol=1e-12)


VARIANTS = [
    {}, {"f": "gaussian"}, {"f": "dot"}, {"subsample": True}, {"f": "dot", "subsample": True},
    {"norm": "batch"}, {"num_heads": 2}, {"scale": 0.3},
]


@pytest.mark.parametrize("opts", VARIANTS, ids=[str(v) for v in VARIANTS])
@pytest.mark.parametrize("masked", [False, True])
def test_fast_equals_reference_in_every_variant(opts, masked):
    m = make(**opts)
    mask = pixel_mask() if masked else None
    params = list(m.parameters())
    x = image(requires_grad=True)
    fast, ref = m(x, mask), m.reference(x, mask)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)
    for gf, gr in zip(grads(fast, [x, *params]), grads(ref, [x, *params])):
        torch.testing.assert_close(gf, gr, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("opts", [{"subsample": True}, {"f": "dot", "subsample": True}, {"f": "dot"}])
def test_padding_with_subsampling_equals_the_cropped_image(opts):
    m = make(**opts)
    mask = pixel_mask()
    x = image()
    x2 = torch.where(mask[:, None], image(seed=9), x)
    y, y2 = m(x, mask), m(x2, mask)
    torch.testing.assert_close(y[~mask[:, None].expand_as(y)], y2[~mask[:, None].expand_as(y)])
    torch.testing.assert_close(y[1:, :, :HH - 2, :WW - 3], m(x[1:, :, :HH - 2, :WW - 3]), rtol=1e-10, atol=1e-12)


def test_batch_norm_in_training_refuses_a_mask():
    m = make(norm="batch").train()
    m(image())  # fine without a mask
    with pytest.raises(ValueError, match="padding mask"):
        m(image(), pixel_mask())


def test_bad_options_raise():
    with pytest.raises(ValueError, match="f must be"):
        fastattn.Attention2d(C, "nonlocal", f="concat")
    with pytest.raises(ValueError, match="norm"):
        fastattn.Attention2d(C, "nonlocal", norm="layer")
    with pytest.raises(ValueError, match="num_heads"):
        fastattn.Attention2d(C, "nonlocal", num_heads=3)


def test_no_hw_by_hw_tensor_is_saved_for_backward():
    h, w = 24, 20
    m = make(channels=8, block=64)
    x = image(b=1, h=h, w=w, channels=8, requires_grad=True)
    assert largest_saved_tensor(m, x) <= 8 * h * w < (h * w) ** 2 / 10
    assert largest_saved_tensor(m.reference, x) >= (h * w) ** 2
