"""Contract of ``fastattn.Attention2d``, parametrised over every registered mechanism of kind ``"vision"``
plus sequence mechanisms run over the flattened pixels: shapes at non-square sizes, the efficient path
equal to the literal reference (values and gradients), batch independence, save/load, dtypes, the
padding mask, and errors."""

from __future__ import annotations

import pytest
import torch

import fastattn
from fastattn.core.vision import VisionMechanism
from helpers import grads, through_bytes

C, B, HH, WW = 16, 2, 5, 7
# the feature-map modules (glimpse mechanisms, kind "vision" too, have their own facade and tests)
VISION = [s for s in fastattn.methods() if s.kind == "vision" and issubclass(s.cls, VisionMechanism)]
SEQUENCE = [fastattn.get_method(n) for n in ("softmax", "performer")]
SPECS = VISION + SEQUENCE
IDS = [s.name for s in SPECS]


def make(spec, seed: int = 0, dtype=torch.float64, channels: int = C, **options) -> fastattn.Attention2d:
    """A module with every parameter drawn at random (so zero-initialised gates such as ccnet's gamma
    do not make the block the identity and the tests trivial)."""
    opts = {**spec.cls.test_options, **options}
    g = torch.Generator().manual_seed(seed)
    kw = {"generator": torch.Generator().manual_seed(seed)} if spec.randomized else {}
    m = fastattn.Attention2d(channels, spec.name, dtype=dtype, **kw, **opts)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(0.4 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return m.eval()


def image(b: int = B, h: int = HH, w: int = WW, dtype=torch.float64, seed: int = 0, channels: int = C):
    return torch.randn(b, channels, h, w, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def pixel_mask(b: int = B, h: int = HH, w: int = WW) -> torch.Tensor:
    """Image 0 unpadded; image 1 padded to a (h - 2) x (w - 3) top-left region."""
    m = torch.zeros(b, h, w, dtype=torch.bool)
    m[1, h - 2:, :] = True
    m[1, :, w - 3:] = True
    return m


@pytest.mark.parametrize("spec", VISION, ids=[s.name for s in VISION])
def test_vision_metadata(spec):
    assert spec.kind == "vision" and not spec.functional and not spec.causal and not spec.decoding
    assert spec.title and spec.arxiv and spec.complexity.startswith("O(")
    assert spec.cls is not None and spec.cls.spec is spec


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
@pytest.mark.parametrize("size", [(HH, WW), (WW, HH), (1, 9), (6, 1)])
def test_shape_dtype_and_finite(spec, size):
    m = make(spec, dtype=torch.float32)
    x = image(h=size[0], w=size[1], dtype=torch.float32)
    y = m(x)
    assert y.shape == x.shape and y.dtype == torch.float32 and torch.isfinite(y).all()
    assert not torch.allclose(y, x), "the module must do something once its parameters are non-zero"


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_fast_path_equals_reference_values_and_grads(spec):
    m = make(spec)
    params = list(m.parameters())
    masks = [None, pixel_mask()] if spec.padding else [None]
    for mask in masks:
        x = image().requires_grad_(True)
        fast, ref = m(x, mask), m.reference(x, mask)
        torch.testing.assert_close(fast, ref, rtol=1e-9, atol=1e-10)
        for gf, gr in zip(grads(fast, [x, *params]), grads(ref, [x, *params])):
            torch.testing.assert_close(gf, gr, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_gradients_reach_the_input_and_every_parameter(spec):
    m = make(spec)
    x = image().requires_grad_(True)
    params = list(m.parameters())
    gs = grads(m(x), [x, *params])
    for g, t in zip(gs, [x, *params]):
        assert g is not None and g.shape == t.shape and torch.isfinite(g).all()
        assert g.abs().sum() > 0


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_batch_independence(spec):
    m = make(spec)
    x = image()
    x2 = x.clone()
    x2[1] = image(b=1, seed=5)[0]
    torch.testing.assert_close(m(x)[0], m(x2)[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(m(x[:1]), m(x)[:1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_save_and_load(spec):
    m, other = make(spec, seed=0), make(spec, seed=1)
    x = image()
    assert not torch.allclose(other(x), m(x))
    other.load_state_dict(through_bytes(m.state_dict()))
    torch.testing.assert_close(other(x), m(x), rtol=0, atol=0)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_float32_agrees_with_float64(spec):
    m64 = make(spec)
    m32 = make(spec, dtype=torch.float32)
    x = image()
    torch.testing.assert_close(m32(x.float()).double(), m64(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_padding_pixels_never_matter(spec):
    m = make(spec)
    mask = pixel_mask()
    if not spec.padding:
        with pytest.raises(ValueError, match="padding"):
            m(image(), mask)
        return
    x = image()
    x2 = torch.where(mask[:, None], image(seed=9), x)  # other values at the padding pixels only
    y, y2 = m(x, mask), m(x2, mask)
    real = ~mask[:, None].expand_as(y)
    torch.testing.assert_close(y[real], y2[real], rtol=1e-10, atol=1e-10)
    pad = mask[:, None].expand_as(y)
    assert torch.equal(y[pad], x[pad]) and torch.equal(y2[pad], x2[pad])  # padding pixels pass through
    # the padded image equals the cropped image on its real region
    crop = m(x[1:, :, :HH - 2, :WW - 3])
    torch.testing.assert_close(y[1:, :, :HH - 2, :WW - 3], crop, rtol=1e-10, atol=1e-10)
    # and the mask is not ignored: without it the real pixels of image 1 see the padding
    assert not torch.allclose(m(x2)[1][real[1]], y[1][real[1]])


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_bad_inputs_raise(spec):
    m = make(spec)
    with pytest.raises(ValueError, match="channels"):
        m(image(channels=C + 1))
    with pytest.raises(ValueError, match="4-D"):
        m(image()[0])
    if spec.padding:
        with pytest.raises(ValueError, match="mask"):
            m(image(), pixel_mask()[:, :, :-1])
        with pytest.raises(TypeError, match="bool"):
            m(image(), pixel_mask().double())
    with pytest.raises(ValueError, match="unknown option"):
        fastattn.Attention2d(C, spec.name, no_such_option=1)
    if not spec.randomized:
        with pytest.raises(ValueError, match="generator"):
            fastattn.Attention2d(C, spec.name, generator=torch.Generator())


def test_vision_mechanisms_take_no_inner_channels_and_other_kinds_are_refused():
    for spec in VISION:
        with pytest.raises(ValueError, match="inner_channels"):
            fastattn.Attention2d(C, spec.name, inner_channels=8)
    for spec in (s for s in fastattn.methods() if s.kind == "seq2seq"):
        with pytest.raises(ValueError, match="seq2seq"):
            fastattn.Attention2d(C, spec.name)
    with pytest.raises(ValueError, match="unknown attention method"):
        fastattn.Attention2d(C, "no_such_method")
    with pytest.raises(ValueError, match="num_heads"):
        fastattn.Attention2d(C, "softmax", num_heads=3)  # inner_channels = 8 is not a multiple of 3


def test_sequence_method_is_the_non_local_form():
    """``Attention2d(method="softmax")`` is, literally: flatten the pixels, project to q, k, v, softmax
    attention over all pixels (with the given scale), reproject, add the input."""
    m = make(fastattn.get_method("softmax"), num_heads=2, inner_channels=6, scale=1.0)
    blk = m.block
    x = image()
    t = x.flatten(2).transpose(1, 2)  # (B, HW, C), row-major pixels
    heads = lambda u: u.view(B, HH * WW, 2, 3).transpose(1, 2)  # noqa: E731
    q, k, v = heads(blk.q_proj(t)), heads(blk.k_proj(t)), heads(blk.v_proj(t))
    w = torch.softmax(q @ k.transpose(-1, -2), dim=-1)  # scale 1
    o = blk.out_proj((w @ v).transpose(1, 2).reshape(B, HH * WW, 6))
    torch.testing.assert_close(m(x), x + o.transpose(1, 2).reshape(B, C, HH, WW), rtol=1e-10, atol=1e-12)
    # the default scale is the mechanism's own (d ** -0.5), not 1
    m2 = make(fastattn.get_method("softmax"), num_heads=2, inner_channels=6)
    assert not torch.allclose(m2(x), m(x))
