"""The shared linear-attention engine against its dense formula: chunk sizes, decay, state, padding."""

from __future__ import annotations

import pytest
import torch

from fastattn.core.masks import Mask
from fastattn.ops.linear.engine import dense_kernel_attention, linear_attention


def _inputs(lq=61, lk=61, h=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    fq = torch.rand(2, h, lq, 8, generator=g, dtype=torch.float64) + 0.1
    fk = torch.rand(2, h, lk, 8, generator=g, dtype=torch.float64) + 0.1
    v = torch.randn(2, h, lk, 5, generator=g, dtype=torch.float64)
    return fq, fk, v


@pytest.mark.parametrize("chunk", [1, 7, 16, 61, 200])
@pytest.mark.parametrize("decay", [None, "heads"])
@pytest.mark.parametrize("normalize", [True, False])
def test_chunked_scan_equals_dense(chunk, decay, normalize):
    fq, fk, v = _inputs()
    lam = torch.tensor([0.5, 0.9, 1.0], dtype=torch.float64) if decay else None
    pad = torch.zeros(2, 61, dtype=torch.bool)
    pad[1, 50:] = True
    for lq in (61, 9):
        mask = Mask(lq=lq, lk=61, causal=True, key_padding=pad)
        out = linear_attention(fq[:, :, -lq:], fk, v, mask, decay=lam, normalize=normalize, chunk=chunk)
        ref = dense_kernel_attention(fq[:, :, -lq:], fk, v, mask, decay=lam, normalize=normalize)
        torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("decay", [None, "heads"])
def test_state_continuation_equals_one_pass(decay):
    fq, fk, v = _inputs()
    lam = torch.tensor([0.5, 0.9, 1.0], dtype=torch.float64) if decay else None
    full = linear_attention(fq, fk, v, Mask(61, 61, causal=True), decay=lam, chunk=8)
    outs, state, t = [], None, 0
    for n in (1, 5, 20, 1, 34):
        m = Mask(n, n, causal=True)
        o, state = linear_attention(fq[:, :, t:t + n], fk[:, :, t:t + n], v[:, :, t:t + n], m,
                                    decay=lam, chunk=8, state=state, return_state=True)
        outs.append(o)
        t += n
    torch.testing.assert_close(torch.cat(outs, dim=2), full)


def test_decay_really_forgets():
    fq, fk, v = _inputs(h=1)
    lam = torch.tensor([0.01], dtype=torch.float64)
    out = linear_attention(fq, fk, v, Mask(61, 61, causal=True), decay=lam)
    v2 = v.clone()
    v2[:, :, :30] += 100.0  # far past: weight <= 0.01^10
    out2 = linear_attention(fq, fk, v2, Mask(61, 61, causal=True), decay=lam)
    assert (out[:, :, 45:] - out2[:, :, 45:]).abs().max() < 1e-10
    assert (out[:, :, 30] - out2[:, :, 30]).abs().max() > 1e-6


def test_attn_mask_rejected_and_noncausal_decay_rejected():
    fq, fk, v = _inputs()
    with pytest.raises(ValueError, match="attn_mask"):
        linear_attention(fq, fk, v, Mask(61, 61, bias=torch.zeros(61, 61)))
    with pytest.raises(ValueError, match="causal form"):
        linear_attention(fq, fk, v, Mask(61, 61), decay=torch.ones(3))


def test_no_overflow_long_sequence_fp16():
    g = torch.Generator().manual_seed(0)
    n = 65536
    fq = torch.rand(1, 1, n, 16, generator=g).half()
    fk = torch.rand(1, 1, n, 16, generator=g).half()
    v = torch.randn(1, 1, n, 16, generator=g).half()
    for causal in (False, True):
        out = linear_attention(fq, fk, v, Mask(n, n, causal=causal), chunk=256)
        assert out.dtype == torch.float16 and torch.isfinite(out).all()


def _gates(h=3, n=61, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, h, n, generator=g, dtype=torch.float64) * 0.5 + 0.5


@pytest.mark.parametrize("chunk", [1, 7, 16, 200])
@pytest.mark.parametrize("normalize", [True, False])
def test_per_token_gates_equal_dense_and_recurrence(chunk, normalize):
    fq, fk, v = _inputs()
    gates = _gates()
    pad = torch.zeros(2, 61, dtype=torch.bool)
    pad[1, 50:] = True
    for lq in (61, 9):
        mask = Mask(lq=lq, lk=61, causal=True, key_padding=pad)
        out = linear_attention(fq[:, :, -lq:], fk, v, mask, decay=gates, normalize=normalize, chunk=chunk)
        ref = dense_kernel_attention(fq[:, :, -lq:], fk, v, mask, decay=gates, normalize=normalize)
        torch.testing.assert_close(out, ref)
    # the literal recurrence S_t = g_t S_{t-1} + k_t v_t^T (no padding)
    s = torch.zeros(2, 3, 8, 5, dtype=torch.float64)
    z = torch.zeros(2, 3, 8, dtype=torch.float64)
    outs = []
    for t in range(61):
        s = gates[:, :, t, None, None] * s + fk[:, :, t, :, None] * v[:, :, t, None, :]
        z = gates[:, :, t, None] * z + fk[:, :, t]
        num = torch.einsum("bhd,bhde->bhe", fq[:, :, t], s)
        outs.append(num / torch.einsum("bhd,bhd->bh", fq[:, :, t], z)[..., None] if normalize else num)
    out = linear_attention(fq, fk, v, Mask(61, 61, causal=True), decay=gates, normalize=normalize, chunk=chunk)
    torch.testing.assert_close(out, torch.stack(outs, dim=2))


def test_per_token_gates_state_continuation():
    fq, fk, v = _inputs()
    gates = _gates()
    full = linear_attention(fq, fk, v, Mask(61, 61, causal=True), decay=gates, chunk=8)
    state, outs = None, []
    for a, b in ((0, 20), (20, 21), (21, 61)):
        o, state = linear_attention(fq[:, :, a:b], fk[:, :, a:b], v[:, :, a:b], Mask(b - a, b - a, causal=True),
                                    decay=gates[:, :, a:b], chunk=8, state=state, return_state=True)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, dim=2), full)


# --- the tiled kernels (fastattn.ops.linear.tiled): many tiles, a fused feature map, hand-written backward ---

def _phi_exp(x: torch.Tensor, is_query: bool) -> torch.Tensor:
    """A token-wise feature map with a different query/key form and a width != the input's."""
    w = torch.linspace(-1, 1, 11 * x.shape[-1], dtype=x.dtype).view(11, x.shape[-1])
    a = x @ w.t()
    return torch.exp(a - a.amax(-1, keepdim=True)) if is_query else torch.exp(a.clamp(max=5))


@pytest.fixture(params=[200, 1000, 5000])
def small_tiles(request, monkeypatch):
    """Tiles of one to a dozen chunks, so every call runs many tiles with carried states."""
    from fastattn.ops.linear import tiled

    monkeypatch.setattr(tiled, "_TILE_FLOATS", request.param)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("phi", [None, "elu", "exp"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("layout", ["BHLE", "BLHE"])
def test_tiled_equals_dense_values_and_grads(small_tiles, causal, phi, normalize, layout):
    from fastattn.ops.features import elu_plus_one

    fmap = {None: None, "elu": lambda x, is_query: elu_plus_one(x), "exp": _phi_exp}[phi]
    calls = []

    def recorded(x, is_query):
        calls.append(x.shape[:-1].numel())  # rows x tokens
        return fmap(x, is_query)

    g = torch.Generator().manual_seed(1)
    lq = 61 if causal else 23
    q = torch.randn(2, lq, 3, 6, generator=g, dtype=torch.float64)
    k = torch.randn(2, 61, 3, 6, generator=g, dtype=torch.float64)
    v = torch.randn(2, 61, 3, 5, generator=g, dtype=torch.float64)
    if phi is None:  # positive features given directly
        q, k = q.abs() + 0.1, k.abs() + 0.1
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, L, E) views of a projection's layout
    if layout == "BHLE":
        q, k, v = (x.contiguous() for x in (q, k, v))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    mask = Mask(lq=lq, lk=61, causal=causal)
    out = linear_attention(q, k, v, mask, phi=None if fmap is None else recorded, normalize=normalize, chunk=4)
    fq, fk = (q, k) if fmap is None else (fmap(q, True), fmap(k, False))
    ref = dense_kernel_attention(fq, fk, v, mask, normalize=normalize)
    torch.testing.assert_close(out, ref)
    go = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, (q, k, v), go), torch.autograd.grad(ref, (q, k, v), go))
    if fmap is not None:  # the feature map only ever saw one tile at a time
        from fastattn.ops.linear import tiled

        width = max(fq.shape[-1], 5, 4)
        assert calls and max(calls) * width <= max(tiled._TILE_FLOATS, 4 * width)


@pytest.mark.parametrize("causal", [True, False])
def test_tiled_zero_denominator_rows(small_tiles, causal):
    """Queries whose features are orthogonal to every visible key have den = 0: output (the numerator)
    and gradients match the reference and are finite."""
    fq, fk, v = (x.requires_grad_() for x in _inputs())
    with torch.no_grad():
        fq[:, :, :10, :4] = 0
        fk[:, :, :, 4:] = 0
        fk[:, :, :12, :4] = 0  # causal: queries 0..9 see keys 0..9 only: den = 0
        if not causal:
            fq[:, :, :10] = 0
    mask = Mask(lq=61, lk=61, causal=causal)
    out = linear_attention(fq, fk, v, mask, chunk=4)
    ref = dense_kernel_attention(fq, fk, v, mask)
    assert (out[:, :, :10] == 0).all()
    torch.testing.assert_close(out, ref)
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, (fq, fk, v), go)
    torch.testing.assert_close(grads, torch.autograd.grad(ref, (fq, fk, v), go))
    assert all(torch.isfinite(g_).all() for g_ in grads)


def test_elu_plus_one_equals_elu():
    from fastattn.ops.features import elu_plus_one

    x = torch.cat([torch.linspace(-80, 80, 1001, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    x.requires_grad_()
    y, ref = elu_plus_one(x), torch.nn.functional.elu(x) + 1
    torch.testing.assert_close(y, ref)
    assert (y > 0).all()
    go = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, go)[0], torch.autograd.grad(ref, x, go)[0])


def _tokenwise_specs():
    import fastattn
    from fastattn.mechanisms.kernel.base import KernelMechanism

    return [s for s in fastattn.methods() if issubclass(s.cls, KernelMechanism) and s.cls.tokenwise]


@pytest.mark.parametrize("spec", _tokenwise_specs(), ids=lambda s: s.name)
def test_tokenwise_feature_maps_are_tokenwise(spec):
    """A mechanism declaring ``tokenwise`` has its features computed per tile of (rows, tokens): the
    map of a slice must equal the slice of the map, and it may hold no trainable parameter."""
    from helpers import make_mech

    mech = make_mech(spec, h=3, hkv=3, e=8).double()
    x = torch.randn(2, 3, 13, 8, dtype=torch.float64)
    mask = Mask(lq=13, lk=13, causal=True)
    for is_query in (True, False):
        full = mech.features(x, is_query=is_query, scale=8 ** -0.5, mask=mask)
        part = mech.features(x.flatten(0, 1)[1:4, 5:11], is_query=is_query, scale=8 ** -0.5, mask=mask)
        torch.testing.assert_close(full.flatten(0, 1)[1:4, 5:11], part)
    for is_query in (True, False):  # x needs no grad: a grad here would come from a trainable parameter
        assert not mech.features(x, is_query=is_query, scale=1.0, mask=mask).requires_grad
