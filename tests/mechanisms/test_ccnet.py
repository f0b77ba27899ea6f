"""ccnet (criss-cross attention, arXiv:1811.11721): the defining properties.

One pass is one softmax over the pixel's row and column with the pixel counted once; it equals dense
attention under the explicit criss-cross mask and a per-pixel loop over the paper's formula (values and
gradients, non-square maps, float64); one pass reaches exactly the row and the column, two passes every
pixel; padding pixels never matter; no ``HW x HW`` tensor is formed.
"""

from __future__ import annotations

import pytest
import torch

import fastattn
from fastattn.mechanisms.vision.ccnet import criss_cross_mask
from fastattn.ops.sparse.engine import block_sparse_attention
from fastattn.ops.sparse.patterns import Pattern, SameBlock, Strided
from fastattn.core.masks import Mask
from helpers import grads, largest_saved_tensor

C, B, HH, WW = 16, 2, 5, 7


def make(seed: int = 0, channels: int = C, **options) -> fastattn.Attention2d:
    """A ccnet module in float64 with random weights and a non-zero gamma (gamma = 0, the paper's
    initialisation, would make every test below trivially pass)."""
    m = fastattn.Attention2d(channels, "ccnet", dtype=torch.float64, **options)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(0.4 * torch.randn(p.shape, generator=g, dtype=torch.float64))
        m.block.gamma.fill_(0.7)
    return m


def image(b=B, h=HH, w=WW, seed=0, channels=C, requires_grad=False):
    x = torch.randn(b, channels, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x.requires_grad_(requires_grad)


def loop_pass(m: fastattn.Attention2d, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The paper's pass written per pixel: Omega_u = row(u) + column(u) minus u itself, one softmax."""
    blk = m.block
    q, k, v = blk.query(x), blk.key(x), blk.value(x)
    out = torch.zeros_like(x)
    b, _, hh, ww = x.shape
    for n in range(b):
        for i in range(hh):
            for j in range(ww):
                path = [(i, c) for c in range(ww)] + [(r, j) for r in range(hh) if r != i]
                if mask is not None:
                    path = [p for p in path if not mask[n, p[0], p[1]]]
                if not path:
                    continue
                keys = torch.stack([k[n, :, r, c] for r, c in path])  # (|Omega|, C')
                vals = torch.stack([v[n, :, r, c] for r, c in path])  # (|Omega|, C)
                a = torch.softmax(keys @ q[n, :, i, j], dim=0)  # no score scale in the paper
                out[n, :, i, j] = a @ vals
    return x + blk.gamma * out


@pytest.mark.parametrize("size", [(HH, WW), (WW, HH), (1, 6), (4, 1)])
@pytest.mark.parametrize("recurrence", [1, 2])
def test_equals_dense_masked_reference_values_and_grads(size, recurrence):
    m = make(recurrence=recurrence)
    params = list(m.parameters())
    x = image(h=size[0], w=size[1], requires_grad=True)
    fast, ref = m(x), m.reference(x)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)
    for gf, gr in zip(grads(fast, [x, *params]), grads(ref, [x, *params])):
        torch.testing.assert_close(gf, gr, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("masked", [False, True])
def test_one_pass_equals_the_per_pixel_formula(masked):
    m = make(recurrence=1)
    x = image(requires_grad=True)
    mask = None
    if masked:
        mask = torch.zeros(B, HH, WW, dtype=torch.bool)
        mask[1, 3:, :] = True
        mask[1, :, 4:] = True
    lit = loop_pass(m, x, mask)
    fast = m.block(x, mask)  # the module without the façade's pass-through of padding pixels
    torch.testing.assert_close(fast, lit, rtol=1e-10, atol=1e-12)
    for gf, gl in zip(grads(fast, [x]), grads(lit, [x])):
        torch.testing.assert_close(gf, gl, rtol=1e-9, atol=1e-11)


def test_recurrence_shares_weights():
    m1, m2 = make(recurrence=1), make(recurrence=2)
    x = image()
    torch.testing.assert_close(m2(x), m1(m1(x)), rtol=1e-12, atol=1e-12)
    assert sum(p.numel() for p in m1.parameters()) == sum(p.numel() for p in m2.parameters())


def test_self_is_counted_once():
    """With constant scores the weights are uniform over the path: 1 / (H + W - 1) each, the pixel
    itself included once (counted twice it would weigh 2 / (H + W))."""
    m = make(recurrence=1)
    with torch.no_grad():
        m.block.query.weight.zero_()
        m.block.query.bias.zero_()
    x = image()
    v = m.block.value(x)
    row = v.sum(dim=3, keepdim=True)  # sum over the row, self included
    col = v.sum(dim=2, keepdim=True)  # sum over the column, self included
    want = x + m.block.gamma * (row + col - v) / (HH + WW - 1)
    torch.testing.assert_close(m(x), want, rtol=1e-12, atol=1e-12)


def test_criss_cross_mask_has_h_plus_w_minus_one_keys_per_pixel():
    allowed = criss_cross_mask(HH, WW)
    assert allowed.shape == (HH * WW, HH * WW)
    assert (allowed.sum(-1) == HH + WW - 1).all() and allowed.diagonal().all()


def test_one_pass_equals_the_block_sparse_engine_row_plus_column_pattern():
    """Cross-check with another implementation: the sparse engine's same-row part plus strided column
    part on the flattened grid is also one softmax over row and column with self once."""
    m = make(recurrence=1)
    x = image()
    blk = m.block
    q, k, v = (t.flatten(2).transpose(1, 2)[:, None] for t in (blk.query(x), blk.key(x), blk.value(x)))
    attn = block_sparse_attention(q, k, v, Mask(HH * WW, HH * WW), 1.0, Pattern(WW, (SameBlock(WW),), column=Strided(WW)))
    want = x + blk.gamma * attn[:, 0].transpose(1, 2).reshape(B, C, HH, WW)
    torch.testing.assert_close(m(x), want, rtol=1e-10, atol=1e-12)


def _reach(m: fastattn.Attention2d, x: torch.Tensor, i: int, j: int) -> torch.Tensor:
    """Bool (H, W): input pixels whose change moves output pixel (i, j) of image 0."""
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(m(x)[0, :, i, j].pow(2).sum(), x)
    return g[0].abs().sum(0) > 0


@pytest.mark.parametrize("pixel", [(0, 0), (2, 3), (4, 6), (1, 5)])
def test_one_pass_reaches_exactly_the_row_and_column(pixel):
    i, j = pixel
    reach = _reach(make(recurrence=1), image(), i, j)
    rows = torch.arange(HH)[:, None].expand(HH, WW)
    cols = torch.arange(WW)[None, :].expand(HH, WW)
    assert torch.equal(reach, (rows == i) | (cols == j))


@pytest.mark.parametrize("pixel", [(0, 0), (2, 3), (4, 6)])
def test_two_passes_reach_every_pixel(pixel):
    assert _reach(make(recurrence=2), image(), *pixel).all()


def test_padding_pixels_never_matter_even_through_two_passes():
    m = make(recurrence=2)
    mask = torch.zeros(B, HH, WW, dtype=torch.bool)
    mask[0, 0, 0] = True  # a single padding pixel, reachable from every pixel in two passes
    mask[1, :, 5:] = True
    x = image()
    reach = _reach(make(recurrence=2), x, 4, 6)
    assert reach[0, 0]  # without a mask, pixel (0, 0) does matter to pixel (4, 6)
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad((m(x, mask) * torch.randn_like(x)).sum(), x)
    real = ~mask[:, None].expand_as(x)
    y = m(x, mask)
    # d(real outputs)/d(padding inputs) = 0: perturbing padding pixels changes no real output
    x2 = torch.where(mask[:, None], x + 3.0, x).detach()
    torch.testing.assert_close(m(x2, mask)[real], y[real], rtol=1e-12, atol=1e-12)
    assert torch.isfinite(g).all()


def test_gamma_zero_is_the_identity_as_initialised_in_the_paper():
    m = fastattn.Attention2d(C, "ccnet", dtype=torch.float64)
    assert m.block.gamma.item() == 0.0
    x = image()
    torch.testing.assert_close(m(x), x, rtol=0, atol=0)


def test_scale_default_is_one_and_can_be_overridden():
    m = make(recurrence=1)
    m_half = make(recurrence=1, scale=0.5)
    with torch.no_grad():
        m.block.query.weight.mul_(0.5)
        m.block.query.bias.mul_(0.5)
    x = image()
    torch.testing.assert_close(m_half(x), m(x), rtol=1e-12, atol=1e-12)


def test_heads_split_the_channels_each_with_its_own_softmax():
    m = make(num_heads=2, recurrence=1)
    x = image(requires_grad=True)
    torch.testing.assert_close(m(x), m.reference(x), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="num_heads"):
        fastattn.Attention2d(C, "ccnet", num_heads=3)
    with pytest.raises(ValueError, match="reduction"):
        fastattn.Attention2d(4, "ccnet")  # 4 // 8 = 0 query/key channels
    with pytest.raises(ValueError, match="recurrence"):
        fastattn.Attention2d(C, "ccnet", recurrence=0)


def test_no_hw_by_hw_tensor_is_saved_for_backward():
    """The efficient path keeps O(HW (H + W)) per pass: no saved tensor has HW * HW elements."""
    h, w = 24, 20
    m = make(channels=8, recurrence=2)
    x = image(b=1, h=h, w=w, channels=8, requires_grad=True)
    y = m(x)
    bound = max(h * w * (h + w), 8 * h * w)  # one pass's row and column scores, or a feature map
    assert largest_saved_tensor(m, x) <= bound < (h * w) ** 2 / 10
    assert largest_saved_tensor(m.reference, x) >= (h * w) ** 2  # the hook sees the dense HW x HW scores
    assert torch.isfinite(y).all()
