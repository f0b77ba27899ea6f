"""efficient2d (the efficient attention module, arXiv:1812.01243): the defining properties.

Softmax normalisation written out per head (queries over channels, keys over positions), reprojection
and residual; with ``normalization="scaling"`` it *is* the non-local block's dot-product form (float64,
same weights); its core is the sequence ``efficient`` mechanism on the flattened pixels, and
``Attention2d(method="efficient")`` gives the same output with the same weights; zero reprojection is
the identity; no ``HW x HW`` tensor is stored.
"""

from __future__ import annotations

import pytest
import torch

import fastattn
from helpers import feature_map, grads, largest_saved_tensor, pixel_mask, randomized

C, B, HH, WW = 8, 2, 5, 7


def make(seed: int = 0, channels: int = C, **options) -> fastattn.Attention2d:
    return randomized(fastattn.Attention2d(channels, "efficient2d", dtype=torch.float64, **options), seed)


def image(b=B, h=HH, w=WW, seed=0, channels=C, requires_grad=False):
    return feature_map(b, channels, h, w, seed, requires_grad=requires_grad)


def literal(m: fastattn.Attention2d, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The module written as in the paper, head by head on (channels, positions) matrices."""
    blk, h = m.block, m.block.num_heads
    b, _, hh, ww = x.shape
    keys = blk.keys(x).reshape(b, blk.key_channels, hh * ww)
    queries = blk.queries(x).reshape(b, blk.key_channels, hh * ww)
    values = blk.values(x).reshape(b, blk.value_channels, hh * ww)
    hk, hv = blk.key_channels // h, blk.value_channels // h
    heads = []
    for i in range(h):
        key = keys[:, i * hk:(i + 1) * hk]
        if mask is not None:
            key = key.masked_fill(mask.flatten(1)[:, None], float("-inf"))
        key = torch.softmax(key, dim=2)  # over positions
        query = torch.softmax(queries[:, i * hk:(i + 1) * hk], dim=1)  # over channels
        value = values[:, i * hv:(i + 1) * hv]
        context = key @ value.transpose(1, 2)  # (hk, hv)
        heads.append((context.transpose(1, 2) @ query).reshape(b, hv, hh, ww))
    return x + blk.reprojection(torch.cat(heads, dim=1))


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("masked", [False, True])
def test_equals_the_paper_written_head_by_head(heads, masked):
    m = make(num_heads=heads, key_channels=4, value_channels=6)
    mask = pixel_mask() if masked else None
    x = image(requires_grad=True)
    fast, lit = m.block(x, mask), literal(m, x, mask)
    torch.testing.assert_close(fast, lit, rtol=1e-10, atol=1e-12)
    for gf, gl in zip(grads(fast, [x]), grads(lit, [x])):
        torch.testing.assert_close(gf, gl, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("masked", [False, True])
def test_scaling_normalization_is_the_non_local_dot_product_form(heads, masked):
    """The defining property of the paper: efficient attention with scaling normalisation equals
    dot-product attention (C(x) = N) exactly -- here against the non-local block's dot form."""
    m = make(num_heads=heads, normalization="scaling")
    nl = fastattn.Attention2d(C, "nonlocal", f="dot", num_heads=heads, dtype=torch.float64).eval()
    e, n = m.block, nl.block
    with torch.no_grad():
        for src, dst in ((e.queries, n.theta), (e.keys, n.phi), (e.values, n.g), (e.reprojection, n.w_z)):
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)
    mask = pixel_mask() if masked else None
    x = image()
    torch.testing.assert_close(m(x, mask), nl(x, mask), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m(x, mask), nl.reference(x, mask), rtol=1e-12, atol=1e-12)
    # and softmax normalisation is not that
    soft = make(num_heads=heads)
    soft.load_state_dict(m.state_dict())
    assert not torch.allclose(soft(x, mask), nl(x, mask))


def test_core_is_the_sequence_efficient_mechanism_and_method_efficient_agrees():
    m = make(num_heads=2)
    blk = m.block
    x = image()
    heads = lambda t: t.flatten(2).transpose(1, 2).unflatten(2, (2, -1)).transpose(1, 2)  # noqa: E731
    core = fastattn.attention(heads(blk.queries(x)), heads(blk.keys(x)), heads(blk.values(x)), method="efficient")
    want = x + blk.reprojection(core.transpose(1, 2).flatten(2).transpose(1, 2).reshape(B, C // 2, HH, WW))
    torch.testing.assert_close(m(x), want, rtol=1e-12, atol=1e-12)
    # Attention2d(method="efficient"): the sequence mechanism over pixels, same output with the same weights
    seq = fastattn.Attention2d(C, "efficient", num_heads=2, dtype=torch.float64)
    s = seq.block
    with torch.no_grad():
        for src, dst in ((blk.queries, s.q_proj), (blk.keys, s.k_proj), (blk.values, s.v_proj),
                         (blk.reprojection, s.out_proj)):
            dst.weight.copy_(src.weight[:, :, 0, 0])
            dst.bias.copy_(src.bias)
    mask = pixel_mask()
    torch.testing.assert_close(seq(x, mask), m(x, mask), rtol=1e-12, atol=1e-12)


def test_zero_reprojection_is_the_identity():
    m = make()
    with torch.no_grad():
        m.block.reprojection.weight.zero_()
        m.block.reprojection.bias.zero_()
    x = image()
    torch.testing.assert_close(m(x), x, rtol=0, atol=0)


def test_options_and_errors():
    m = fastattn.Attention2d(12, "efficient2d", num_heads=3, key_channels=6, value_channels=9)
    assert m(torch.randn(1, 12, 4, 3)).shape == (1, 12, 4, 3)
    with pytest.raises(ValueError, match="num_heads"):
        fastattn.Attention2d(C, "efficient2d", num_heads=3)
    with pytest.raises(ValueError, match="normalization"):
        fastattn.Attention2d(C, "efficient2d", normalization="l2")
    with pytest.raises(ValueError, match="scale"):
        fastattn.Attention2d(C, "efficient2d", scale=0.5)
    with pytest.raises(ValueError, match="key_channels"):
        fastattn.Attention2d(C, "efficient2d", key_channels=0)


def test_linear_memory_no_hw_by_hw_tensor():
    h, w = 24, 20
    m = make(channels=8)
    x = image(b=1, h=h, w=w, channels=8, requires_grad=True)
    assert largest_saved_tensor(m, x) <= 8 * h * w < (h * w) ** 2 / 10
    assert largest_saved_tensor(m.reference, x) >= (h * w) ** 2
