"""Key log-scales in linear attention (``key_log_scale``): shifted key features ``k' exp(-c)`` with
per-token ``c``, the state kept in units of the running maximum of ``c``.

In float64 the shifted call equals the unshifted one (values, final states, every gradient), through the
dense reference and the tiled kernels, causal or not, with decay / gates, initial states in shifted
units, grouped-query heads, padding and a fused feature map. In float32 keys whose true features
underflow still give the float64 result; a huge future key changes no past output, bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from linear_scan import linear_inputs

from fastattn.core.masks import Mask
from fastattn.ops.linear.engine import LinearState, dense_kernel_attention, linear_attention

N, D, EV = 45, 6, 5


@pytest.fixture(params=[300, 1 << 18], ids=["tiny-tiles", "default-tiles"])
def tiles(request, monkeypatch):
    from fastattn.ops.linear import tiled

    monkeypatch.setattr(tiled, "_TILE_FLOATS", request.param)


def _inputs(h, hq, gates, seed=0, n=N, b=2, spread=20.0):
    """Features (``base``: the true key features), values, log-scales ``c`` (spread ``spread``), a true
    initial state and its log-scale, gates."""
    g = torch.Generator().manual_seed(seed)
    x = linear_inputs(b, h, hq, n, D, EV, gates, g)
    x["base"] = x.pop("fk")
    c = torch.randn(b, h, n, generator=g, dtype=torch.float64) * spread
    m0 = torch.randn(b, h, generator=g, dtype=torch.float64) * spread
    return x, c, m0


def _gate_kw(x):
    if "lam" in x:
        return {"decay": x["lam"]}
    if "logit" in x:
        return {"log_decay": F.logsigmoid(x["logit"])}
    return {}


def _grads(x, out, extra=(), seed=1):
    g = torch.Generator().manual_seed(seed)
    loss = (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum()
    for t in extra:
        loss = loss + (t * torch.randn(t.shape, generator=g, dtype=t.dtype)).sum()
    names = list(x)
    return dict(zip(names, torch.autograd.grad(loss, [x[k] for k in names], allow_unused=True, retain_graph=True)))


def _shifted_state(x, m0):
    return LinearState(x["s0"] * (-m0).exp()[..., None, None], x["z0"] * (-m0).exp()[..., None], 0, m0)


@pytest.mark.parametrize("hq,h", [(1, 1), (4, 2)], ids=["1head", "gqa4-2"])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("causal,gates", [(True, None), (True, "head"), (True, "token"), (False, None)])
@pytest.mark.parametrize("chunk", [4, 7])
def test_shifted_equals_unshifted_float64(tiles, hq, h, with_state, causal, gates, chunk):
    """Values, the final state (in true units) and all gradients; the reference with the shift too."""
    x, c, m0 = _inputs(h, hq, gates)
    mask = Mask(N, N, causal=causal)
    x["fk"] = (x.pop("base") * (-c).exp().unsqueeze(-1)).detach().requires_grad_()  # shifted features
    x["c"] = c = c.requires_grad_()  # gradients reach the log-scales: they are part of the features
    true_fk = x["fk"] * c.exp().unsqueeze(-1)
    fk = x["fk"]
    true_state = LinearState(x["s0"], x["z0"]) if with_state else None
    state = _shifted_state(x, m0) if with_state else None
    want, st_want = linear_attention(x["fq"], true_fk, x["v"], mask, chunk=chunk, state=true_state,
                                     return_state=True, **_gate_kw(x))
    got, st = linear_attention(x["fq"], fk, x["v"], mask, chunk=chunk, state=state, return_state=True,
                               key_log_scale=c, **_gate_kw(x))
    ref = dense_kernel_attention(x["fq"], fk, x["v"], mask, state=state, key_log_scale=c, **_gate_kw(x))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ref, want, rtol=1e-10, atol=1e-10)
    assert st.log_scale is not None and st_want.log_scale is None
    unit = st.log_scale.exp()
    kv, z = st.kv * unit[..., None, None], st.z * unit[..., None]
    torch.testing.assert_close(kv, st_want.kv, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(z, st_want.z, rtol=1e-10, atol=1e-10)
    g_want = _grads(x, want, (st_want.kv, st_want.z))
    g_got = _grads(x, got, (kv, z))
    g_ref = _grads(x, ref)
    g_want_out = _grads(x, want)
    for name in x:
        if g_want[name] is None:
            assert g_got[name] is None or not g_got[name].any(), name
            continue
        torch.testing.assert_close(g_got[name], g_want[name], rtol=1e-9, atol=1e-9, msg=name)
        if g_want_out[name] is not None:
            torch.testing.assert_close(g_ref[name], g_want_out[name], rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize("causal", [True, False])
def test_fewer_queries_padding_and_fused_feature_map(tiles, causal):
    """``Lq < Lk`` (keys before the first query folded into the state), key padding (a padded key's
    log-scale, however large, is ignored) and a token-wise ``phi`` applied inside the kernels."""
    x, c, _ = _inputs(2, 2, None, spread=25.0)
    c.requires_grad_()
    raw = torch.randn(2, 2, N, D, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    raw.requires_grad_()
    pad = torch.zeros(2, N, dtype=torch.bool)
    pad[1, 30:] = True
    c_pad = c.clone()
    c_pad[1, :, 35] = 1e4  # a padded key with a huge log-scale

    def phi(t, is_query):
        return F.softplus(t) + 0.05

    lq = 20
    fq = x["fq"][:, :, :lq]
    inputs = {"fq": fq, "raw": raw, "v": x["v"], "c": c}
    for padding in (None, pad):
        mask = Mask(lq, N, causal=causal, key_padding=padding)
        cs = c if padding is None else c_pad
        want = dense_kernel_attention(phi(fq, True), phi(raw, False) * c.exp().unsqueeze(-1), x["v"], mask)
        got = linear_attention(fq, raw, x["v"], mask, phi=phi, chunk=8, key_log_scale=cs)
        got_feat = linear_attention(phi(fq, True), phi(raw, False), x["v"], mask, chunk=8, key_log_scale=cs)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got_feat, want, rtol=1e-10, atol=1e-10)
        gw, gg, gf = _grads(inputs, want), _grads(inputs, got), _grads(inputs, got_feat)
        for name in inputs:
            torch.testing.assert_close(gg[name], gw[name], rtol=1e-9, atol=1e-9, msg=name)
            torch.testing.assert_close(gf[name], gw[name], rtol=1e-9, atol=1e-9, msg=name)


def test_split_sequence_and_partial():
    """A causal sequence in two calls through the state (carrying its log-scale) equals the whole;
    ``partial`` returns ``(num, den, M)``: ``num / den`` is the output and ``M`` each query's units."""
    x, c, _ = _inputs(2, 2, "token", spread=40.0)
    x = {k: t.detach() for k, t in x.items()}
    fk = x["base"] * (-c).exp().unsqueeze(-1)
    kw = _gate_kw(x)
    whole = linear_attention(x["fq"], fk, x["v"], Mask(N, N, causal=True), chunk=4, key_log_scale=c, **kw)
    cut = 17
    parts, state = [], None
    for a, b in ((0, cut), (cut, N)):
        gk = {"log_decay": kw["log_decay"][..., a:b]}
        o, state = linear_attention(x["fq"][:, :, a:b], fk[:, :, a:b], x["v"][:, :, a:b],
                                    Mask(b - a, b - a, causal=True), chunk=4, key_log_scale=c[..., a:b],
                                    state=state, return_state=True, **gk)
        parts.append(o)
        assert state.length == b
    torch.testing.assert_close(torch.cat(parts, 2), whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state.log_scale, c.cummax(-1).values[..., -1])
    num, den, m = linear_attention(x["fq"], fk, x["v"], Mask(N, N, causal=True), chunk=4, key_log_scale=c,
                                   partial=True, **kw)
    torch.testing.assert_close(num / den.unsqueeze(-1), whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m, c.cummax(-1).values)
    assert state.select([1, 0]).log_scale[0].equal(state.log_scale[1])


def test_float32_underflow_and_no_future_leak():
    """True key features ``exp(b)`` with ``b`` around -150 are all 0 in float32: unshifted, every row
    is 0 / 0; shifted, the float64 result. A FUTURE key with a huge log-scale (a global maximum's trap)
    changes no earlier output, bit for bit; with it the non-causal form still gives finite outputs."""
    g = torch.Generator().manual_seed(0)
    n = 300
    fq = torch.rand(1, 2, n, D, generator=g, dtype=torch.float64) + 0.1
    b = torch.randn(1, 2, n, D, generator=g, dtype=torch.float64) * 3 - 150  # log true features
    v = torch.randn(1, 2, n, EV, generator=g, dtype=torch.float64)
    c = b.amax(-1)
    fk = (b - c.unsqueeze(-1)).exp()
    for causal in (True, False):
        mask = Mask(n, n, causal=causal)
        want = dense_kernel_attention(fq, b.exp(), v, mask)  # float64: exp(-150) is representable
        plain = linear_attention(fq.float(), b.exp().float(), v.float(), mask, chunk=16)
        assert (plain.abs().sum(-1) == 0).all()  # the defect: everything underflowed
        got = linear_attention(fq.float(), fk.float(), v.float(), mask, chunk=16, key_log_scale=c.float())
        assert (got.double() - want).norm() / want.norm() < 1e-5
    mask = Mask(n, n, causal=True)
    fk2, c2 = fk.clone(), c.clone()
    fk2[..., -1, :] = torch.rand(D, generator=g, dtype=torch.float64)
    c2[..., -1] = 1e4
    for chunk in (16, 1000):
        a = linear_attention(fq.float(), fk.float(), v.float(), mask, chunk=chunk, key_log_scale=c.float())
        b2 = linear_attention(fq.float(), fk2.float(), v.float(), mask, chunk=chunk, key_log_scale=c2.float())
        assert torch.equal(a[..., :-1, :], b2[..., :-1, :]) and torch.isfinite(b2).all()
    full = linear_attention(fq.float(), fk2.float(), v.float(), Mask(n, n), key_log_scale=c2.float())
    torch.testing.assert_close(full, v[..., -1:, :].float().expand_as(full))  # the huge key dominates


def test_bad_calls():
    x, c, m0 = _inputs(1, 1, None)
    x = {k: t.detach() for k, t in x.items()}
    mask = Mask(N, N, causal=True)
    with pytest.raises(ValueError, match="normalize"):
        linear_attention(x["fq"], x["base"], x["v"], mask, normalize=False, key_log_scale=c)
    with pytest.raises(ValueError, match="key_log_scale must have shape"):
        linear_attention(x["fq"], x["base"], x["v"], mask, key_log_scale=c[..., :-1])
    with pytest.raises(ValueError, match="shifted units"):
        linear_attention(x["fq"], x["base"], x["v"], mask, state=_shifted_state(x, m0))
    with pytest.raises(ValueError, match="shifted units"):
        dense_kernel_attention(x["fq"], x["base"], x["v"], mask, state=_shifted_state(x, m0))
