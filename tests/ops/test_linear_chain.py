"""The chain of trust of linear attention: the dense formula -> the chunked scan (tests/ops/linear_scan.py)
-> the tiled kernels (through ``linear_attention``). Values, final states and every gradient (q, k, v,
initial state, decay / gates) agree in float64 at awkward sizes, with many tiles; a causal sequence split
in two equals the whole; gates of exactly 0 and 1 are finite; partial results combine."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from linear_scan import linear_inputs, scan_linear_attention

from fastattn.core.masks import Mask
from fastattn.ops.linear.engine import (
    LinearState,
    dense_kernel_attention,
    linear_attention,
    linear_state,
    log_gates,
)

N, D, EV = 61, 6, 5


@pytest.fixture(params=[300, 1 << 18], ids=["tiny-tiles", "default-tiles"])
def tiles(request, monkeypatch):
    from fastattn.ops.linear import tiled

    monkeypatch.setattr(tiled, "_TILE_FLOATS", request.param)


def _inputs(h, gates, seed=0, n=N, b=2, hq=None):
    """Features, values, an initial state and gates with ``h`` key/value heads (``hq`` query heads)."""
    return linear_inputs(b, h, hq or h, n, D, EV, gates, torch.Generator().manual_seed(seed))


def _gate_kw(x):
    if "lam" in x:
        return {"decay": x["lam"]}
    if "logit" in x:
        return {"log_decay": F.logsigmoid(x["logit"])}
    return {}


def _loss_grads(x, out, kv, z, seed=1):
    g = torch.Generator().manual_seed(seed)
    loss = (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum()
    loss = loss + (kv * torch.randn(kv.shape, generator=g, dtype=kv.dtype)).sum()
    if z is not None:
        loss = loss + (z * torch.randn(z.shape, generator=g, dtype=z.dtype)).sum()
    names = [k for k, t in x.items() if k != "z0" or z is not None]
    return dict(zip(names, torch.autograd.grad(loss, [x[k] for k in names], allow_unused=True, retain_graph=True)))


@pytest.mark.parametrize("hq,h", [(1, 1), (3, 3), (4, 2)], ids=["1head", "3heads", "gqa4-2"])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("causal,gates", [(True, None), (True, "head"), (True, "token"), (False, None)])
@pytest.mark.parametrize("chunk", [4, 7])
def test_dense_scan_tiled_agree(tiles, hq, h, with_state, normalize, causal, gates, chunk):
    """Grouped-query inputs (``gqa4-2``) run natively: states and gates per key/value head."""
    x = _inputs(h, gates, hq=hq)
    fq, fk, v = x["fq"], x["fk"], x["v"]
    if not with_state:
        del x["s0"], x["z0"]
    state = LinearState(x["s0"], x["z0"] if normalize else None) if with_state else None
    mask = Mask(N, N, causal=causal)
    kw = _gate_kw(x)

    out, st = linear_attention(fq, fk, v, mask, normalize=normalize, chunk=chunk, state=state,
                               return_state=True, **kw)
    tiled = (out, st.kv, st.z)
    assert st.length == N
    ref_out = dense_kernel_attention(fq, fk, v, mask, normalize=normalize, state=state, **kw)
    log_g, _ = log_gates(kw.get("decay"), kw.get("log_decay"), fk)
    ref_kv, ref_z = linear_state(fk, v, log_g=log_g, s0=None if state is None else state.kv,
                                 z0=None if state is None else state.z, normalize=normalize)
    dense = (ref_out, ref_kv, ref_z)
    chain = [dense, tiled]
    if causal:  # the scan knows no grouped-query heads: expanded, its states are copies per query head
        grp = hq // h
        rep = (lambda t: t if t is None or grp == 1 else t.repeat_interleave(grp, dim=1))
        s_out, _, s_kv, s_z = scan_linear_attention(fq, rep(fk), rep(v), log_g=rep(log_g), normalize=normalize,
                                                    chunk=chunk, s0=None if state is None else rep(state.kv),
                                                    z0=None if state is None else rep(state.z))
        chain.insert(1, (s_out, s_kv[:, ::grp], None if s_z is None else s_z[:, ::grp]))
    grads = [_loss_grads(x, *vals) for vals in chain]
    for vals, gr in zip(chain[1:], grads[1:]):
        torch.testing.assert_close(vals, dense)
        assert gr.keys() == grads[0].keys()
        for name in gr:
            torch.testing.assert_close(gr[name], grads[0][name], msg=lambda m, n=name: f"d{n}: {m}")
    for name, g_ in grads[-1].items():
        assert g_ is not None and torch.isfinite(g_).all() and g_.abs().sum() > 0, name


@pytest.mark.parametrize("gates", [None, "head", "token"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("split", [1, 27, 32])
def test_split_in_two_equals_whole(tiles, gates, normalize, split):
    """The second half started from the first half's returned state: values, final state and every
    gradient equal one pass over the whole sequence."""
    x = _inputs(3, gates, seed=3)
    del x["s0"], x["z0"]
    fq, fk, v = x["fq"], x["fk"], x["v"]
    kw = _gate_kw(x)
    whole, st = linear_attention(fq, fk, v, Mask(N, N, causal=True), normalize=normalize, chunk=8,
                                 return_state=True, **kw)

    def part(a, b, state):
        kw_p = {k: (t if t.dim() == 1 else t[:, :, a:b]) for k, t in kw.items()}
        return linear_attention(fq[:, :, a:b], fk[:, :, a:b], v[:, :, a:b], Mask(b - a, b - a, causal=True),
                                normalize=normalize, chunk=8, state=state, return_state=True, **kw_p)

    o1, s1 = part(0, split, None)
    o2, s2 = part(split, N, s1)
    assert (s1.length, s2.length) == (split, N)
    halves = torch.cat([o1, o2], dim=2)
    torch.testing.assert_close(halves, whole)
    torch.testing.assert_close((s2.kv, s2.z), (st.kv, st.z))
    assert (halves[:, :, split:] - linear_attention(fq[:, :, split:], fk[:, :, split:], v[:, :, split:],
            Mask(N - split, N - split, causal=True), normalize=normalize,
            **{k: (t if t.dim() == 1 else t[:, :, split:]) for k, t in kw.items()})).abs().max() > 1e-3
    torch.testing.assert_close(_loss_grads(x, halves, s2.kv, s2.z), _loss_grads(x, whole, st.kv, st.z))


@pytest.mark.parametrize("gates", [None, "head", "token"])
def test_fewer_queries_than_keys_with_state(gates):
    """Bottom-right causal alignment: the keys before the first query are folded into the state."""
    x = _inputs(3, gates, seed=4)
    fq, fk, v = x["fq"], x["fk"], x["v"]
    state = LinearState(x["s0"], x["z0"])
    kw = _gate_kw(x)
    pad = torch.zeros(2, N, dtype=torch.bool)
    pad[1, 40:] = True
    for lq in (1, 9, 60):
        mask = Mask(lq, N, causal=True, key_padding=pad)
        out, st = linear_attention(fq[:, :, -lq:], fk, v, mask, chunk=4, state=state, return_state=True, **kw)
        ref = dense_kernel_attention(fq[:, :, -lq:], fk, v, mask, state=state, **kw)
        torch.testing.assert_close(out, ref)
        keep = mask.key_keep(fk.dtype)
        log_g = log_gates(kw.get("decay"), kw.get("log_decay"), fk, keep)[0]
        ref_kv, ref_z = linear_state(fk * keep, v * keep, log_g=log_g, s0=state.kv, z0=state.z)
        torch.testing.assert_close((st.kv, st.z), (ref_kv, ref_z))
        assert st.length == N
        go = torch.randn_like(out)
        names = list(x)
        torch.testing.assert_close(
            torch.autograd.grad(out, [x[k] for k in names], go, allow_unused=True, retain_graph=True),
            torch.autograd.grad(ref, [x[k] for k in names], go, allow_unused=True, retain_graph=True))


def _recurrence(fq, fk, v, gates, normalize=True):
    """The literal recurrence ``S_t = g_t S_{t-1} + k_t v_t^T``, token by token."""
    b, h, n, d = fq.shape
    s = fq.new_zeros(b, h, d, v.shape[-1])
    z = fq.new_zeros(b, h, d)
    outs = []
    for t in range(n):
        s = gates[:, :, t, None, None] * s + fk[:, :, t, :, None] * v[:, :, t, None, :]
        z = gates[:, :, t, None] * z + fk[:, :, t]
        num = torch.einsum("bhd,bhde->bhe", fq[:, :, t], s)
        outs.append(num / torch.einsum("bhd,bhd->bh", fq[:, :, t], z)[..., None] if normalize else num)
    return torch.stack(outs, dim=2), s


@pytest.mark.parametrize("form", ["decay", "log_decay"])
def test_gates_of_exactly_zero_and_one(form):
    """A gate of 0 resets the state (the literal recurrence), a gate of 1 keeps it; values and every
    gradient are finite."""
    x = _inputs(2, None, seed=6)
    fq, fk, v = x["fq"], x["fk"], x["v"]
    gates = torch.rand(2, 2, N, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    gates[:, :, ::5] = 0.0
    gates[:, :, 1::3] = 1.0
    leaf = (gates if form == "decay" else gates.log()).requires_grad_()  # log 0 = -inf is allowed
    kw = {form: leaf}
    for normalize in (True, False):
        out, st = linear_attention(fq, fk, v, Mask(N, N, causal=True), normalize=normalize, chunk=4,
                                   return_state=True, **kw)
        ref, s_ref = _recurrence(fq, fk, v, gates.detach(), normalize)
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(st.kv, s_ref)
        grads = torch.autograd.grad((out.sum() + st.kv.sum()), [fq, fk, v, leaf])
        assert all(torch.isfinite(g_).all() for g_ in grads)
    lam = torch.tensor([0.0, 1.0], dtype=torch.float64, requires_grad=True)
    out = linear_attention(fq, fk, v, Mask(N, N, causal=True), decay=lam, chunk=4)
    ref, _ = _recurrence(fq, fk, v, lam.detach().view(1, 2, 1).expand(2, 2, N))
    torch.testing.assert_close(out, ref)
    assert all(torch.isfinite(g_).all() for g_ in torch.autograd.grad(out.sum(), [fq, fk, v, lam]))


@pytest.mark.parametrize("causal", [True, False])
def test_partial_results_combine(tiles, causal):
    """``partial=True`` gives ``(num, den)``: ``num / den`` is the output; non-causal partials over two
    key blocks add up; a causal second half's partials equal the whole's rows."""
    x = _inputs(3, None, seed=8)
    fq, fk, v = x["fq"], x["fk"], x["v"]
    mask = Mask(N, N, causal=causal)
    num, den = linear_attention(fq, fk, v, mask, chunk=4, partial=True)
    out = linear_attention(fq, fk, v, mask, chunk=4)
    torch.testing.assert_close(num / den.unsqueeze(-1), out)
    assert linear_attention(fq, fk, v, mask, normalize=False, partial=True)[1] is None
    if not causal:
        parts = [linear_attention(fq, fk[:, :, a:b], v[:, :, a:b], Mask(N, b - a), partial=True)
                 for a, b in ((0, 20), (20, N))]
        torch.testing.assert_close(parts[0][0] + parts[1][0], num)
        torch.testing.assert_close(parts[0][1] + parts[1][1], den)
    else:
        (_, st) = linear_attention(fq[:, :, :20], fk[:, :, :20], v[:, :, :20], Mask(20, 20, causal=True),
                                   partial=True, return_state=True)
        (n2, d2), st2 = linear_attention(fq[:, :, 20:], fk[:, :, 20:], v[:, :, 20:], Mask(N - 20, N - 20, causal=True),
                                         partial=True, state=st, return_state=True)
        torch.testing.assert_close((n2, d2), (num[:, :, 20:], den[:, :, 20:]))
        full = linear_attention(fq, fk, v, mask, return_state=True)[1]
        torch.testing.assert_close((st2.kv, st2.z), (full.kv, full.z))
    num_ref = dense_kernel_attention(fq, fk, v, mask, normalize=False)
    den_ref = dense_kernel_attention(fq, fk, torch.ones_like(v[..., :1]), mask, normalize=False)[..., 0]
    go, gd = torch.randn_like(num), torch.randn_like(den)
    torch.testing.assert_close(torch.autograd.grad((num * go).sum() + (den * gd).sum(), [fq, fk, v]),
                               torch.autograd.grad((num_ref * go).sum() + (den_ref * gd).sum(), [fq, fk, v]))


def test_linear_state_protocol():
    x = _inputs(2, None)
    st = LinearState(x["s0"].detach(), x["z0"].detach(), length=7)
    sel = st.select(torch.tensor([1, 1, 0]))
    assert sel.kv.shape[0] == 3 and sel.length == 7
    torch.testing.assert_close(sel.kv[2], st.kv[0])
    torch.testing.assert_close(sel.z[0], st.z[1])
    one = st.select(1)
    assert one.kv.shape[0] == 1 and one.z.shape[0] == 1
    moved = st.to("cpu")
    assert moved.length == 7 and moved.kv.device.type == "cpu"
    assert LinearState(st.kv).select(0).z is None


def test_bad_inputs_raise():
    x = _inputs(2, None)
    fq, fk, v = (x[k].detach() for k in ("fq", "fk", "v"))
    with pytest.raises(ValueError, match="Lq <= Lk"):
        linear_attention(fq, fk[:, :, :5], v[:, :, :5], Mask(N, 5, causal=True))
    with pytest.raises(ValueError, match="not both"):
        linear_attention(fq, fk, v, Mask(N, N, causal=True), decay=torch.ones(2), log_decay=torch.zeros(2))
    with pytest.raises(ValueError, match="normaliser"):
        linear_attention(fq, fk, v, Mask(N, N, causal=True), state=LinearState(x["s0"].detach()))
    with pytest.raises(ValueError, match="the state is for"):
        linear_attention(fq, fk, v, Mask(N, N, causal=True), state=LinearState(x["s0"].detach()[:1], x["z0"][:1]))
    with pytest.raises(ValueError, match="per-token decay"):
        linear_attention(fq, fk, v, Mask(N, N, causal=True), decay=torch.ones(2, 2, 5))


@pytest.mark.parametrize("layout", ["BHLE", "BLHE"])
@pytest.mark.parametrize("causal,gates", [(True, None), (True, "token"), (False, None)])
def test_grouped_query_heads_with_a_fused_feature_map(tiles, causal, layout, gates):
    """4 query heads on 2 key/value heads, features computed tile by tile: equals the dense formula on
    expanded heads (values, final state per key/value head, gradients), and a split sequence continues
    from the per-key/value-head state."""
    from fastattn.ops.features import elu_plus_one

    g = torch.Generator().manual_seed(9)
    q = torch.randn(2, N, 4, D, generator=g, dtype=torch.float64)
    k = torch.randn(2, N, 2, D, generator=g, dtype=torch.float64)
    v = torch.randn(2, N, 2, EV, generator=g, dtype=torch.float64)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if layout == "BHLE":
        q, k, v = (t.contiguous() for t in (q, k, v))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    logit = torch.randn(2, 2, N, generator=g, dtype=torch.float64, requires_grad=True)
    kw = {"log_decay": F.logsigmoid(logit)} if gates else {}
    phi = lambda x, is_query: elu_plus_one(x)
    mask = Mask(N, N, causal=causal)
    out, st = linear_attention(q, k, v, mask, phi=phi, chunk=4, return_state=True, **kw)
    assert st.kv.shape == (2, 2, D, EV)
    ref = dense_kernel_attention(elu_plus_one(q), elu_plus_one(k), v, mask, **kw)
    torch.testing.assert_close(out, ref)
    log_g = log_gates(None, kw.get("log_decay"), k)[0]
    torch.testing.assert_close(st.kv, linear_state(elu_plus_one(k), v, log_g=log_g)[0])
    go = torch.randn_like(out)
    inputs = (q, k, v, logit) if gates else (q, k, v)
    torch.testing.assert_close(torch.autograd.grad(out, inputs, go, retain_graph=True),
                               torch.autograd.grad(ref, inputs, go, retain_graph=True))
    if causal:
        o1, s1 = linear_attention(q[:, :, :30], k[:, :, :30], v[:, :, :30], Mask(30, 30, causal=True), phi=phi,
                                  chunk=4, return_state=True, **{n: t[..., :30] for n, t in kw.items()})
        o2 = linear_attention(q[:, :, 30:], k[:, :, 30:], v[:, :, 30:], Mask(N - 30, N - 30, causal=True), phi=phi,
                              chunk=4, state=s1, **{n: t[..., 30:] for n, t in kw.items()})
        torch.testing.assert_close(torch.cat([o1, o2], dim=2), out)


def _native_gqa_specs():
    from helpers import make_mech

    import fastattn
    from fastattn.mechanisms.kernel.base import KernelMechanism

    return [s for s in fastattn.methods() if issubclass(s.cls, KernelMechanism) and make_mech(s).native_gqa]


@pytest.mark.parametrize("spec", _native_gqa_specs(), ids=lambda s: s.name)
@pytest.mark.parametrize("causal", [True, False])
def test_native_gqa_mechanisms_equal_expanded_heads(spec, causal, monkeypatch):
    """Kernel mechanisms that take grouped-query heads natively hand the op 2 key/value heads (not 4)
    and equal the run on expanded heads, values and gradients."""
    from helpers import make_mech, qkv

    from fastattn.core.checks import repeat_kv
    from fastattn.ops.linear import tiled

    seen = []
    real = tiled._forward

    def spy(q, k, *rest):
        seen.append((q.shape[1], k.shape[1]))
        return real(q, k, *rest)

    monkeypatch.setattr(tiled, "_forward", spy)
    mech = make_mech(spec, h=4, hkv=2).double()
    wide = make_mech(spec, h=4, hkv=4).double()
    wide.load_state_dict(mech.state_dict())
    q, k, v = qkv(h=4, hkv=2, requires_grad=True)
    out = mech.run(q, k, v, is_causal=causal)
    assert seen == [(4, 2)]
    ref = wide.run(q, repeat_kv(k, 2), repeat_kv(v, 2), is_causal=causal)
    torch.testing.assert_close(out, ref)
    go = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, (q, k, v), go), torch.autograd.grad(ref, (q, k, v), go))
