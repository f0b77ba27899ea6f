"""The paper's layers of three sequence ids (issue 17 item 14): rfa's gate from the layer input
``x_t``, transnormer's output gate ``U = X W_u``, interlaced's two attention modules with their own
projections. The layer contract suite (``tests/kinds/test_layer_contract.py``) checks each layer form's
fast path against its reference, decoding, left padding and the rest; these tests pin the formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn.mechanisms.kernel.rfa import RFALayer
from fastattn.mechanisms.kernel.transnormer import TransNormerLayer
from fastattn.mechanisms.sparse.interlaced import InterlacedLayer

D, H, L = 24, 4, 13
E = D // H


def _x(b=2, n=L, seed=1):
    return torch.randn(b, n, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _heads(t):
    return t.view(t.shape[0], t.shape[1], H, E).transpose(1, 2)


def _merge(t):
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], D)


# ---- rfa: g_t = sigmoid(w_g . x_t + b_g) ----------------------------------------------------------
def _rfa_layer(seed=0):
    torch.manual_seed(seed)
    layer = fastattn.MultiheadAttention(D, H, "rfa", gate=True, num_features=8, chunk=4, batch_first=True,
                                        dtype=torch.float64).eval()
    with torch.no_grad():
        layer.mechanism.gate_proj.weight.normal_(0.0, 0.5)
        layer.mechanism.gate_proj.bias.normal_(0.0, 1.0)
    return layer


def test_rfa_gated_layer_is_the_papers_recurrence_on_the_layer_input():
    """Token by token: ``S_t = g_t S_{t-1} + (1 - g_t) phi(k_t) v_t^T`` (and ``z``), ``g_t`` from ``x_t``."""
    layer = _rfa_layer()
    m = layer.mechanism
    assert isinstance(m, RFALayer)
    x = _x()
    out, _ = layer(x, is_causal=True)
    q, k, v = _heads(m.q_proj(x)), _heads(m.k_proj(x)), _heads(m.v_proj(x))

    def unit(t):
        return t / t.norm(dim=-1, keepdim=True)

    fq, fk = m.core.feature_map(unit(q)), m.core.feature_map(unit(k))
    g = torch.sigmoid(x @ m.gate_proj.weight.t() + m.gate_proj.bias).transpose(1, 2)  # (B, H, L)
    s = torch.zeros(2, H, fk.shape[-1], E, dtype=torch.float64)
    z = torch.zeros(2, H, fk.shape[-1], dtype=torch.float64)
    rows = []
    for t in range(L):
        gt = g[:, :, t, None]
        s = gt[..., None] * s + (1 - gt)[..., None] * fk[:, :, t, :, None] * v[:, :, t, None, :]
        z = gt * z + (1 - gt) * fk[:, :, t]
        num = torch.einsum("bhf,bhfe->bhe", fq[:, :, t], s)
        rows.append(num / torch.einsum("bhf,bhf->bh", fq[:, :, t], z)[..., None])
    expect = m.out_proj(_merge(torch.stack(rows, 2)))
    torch.testing.assert_close(out, expect, rtol=1e-10, atol=1e-12)


def test_rfa_gate_depends_on_x_not_on_k(monkeypatch):
    """The gate logits the operator receives are ``w_g . x_t + b_g``: changing the keys (``W_k``) but not
    ``x`` leaves them unchanged; changing ``x`` changes them."""
    layer = _rfa_layer()
    m = layer.mechanism
    seen = []
    real = m.core.run_gated
    monkeypatch.setattr(m.core, "run_gated", lambda q, k, v, logits, **kw: seen.append(logits) or real(q, k, v, logits, **kw))
    x = _x()
    layer(x, is_causal=True)
    with torch.no_grad():
        m.k_proj.weight.mul_(-3.0)
    layer(x, is_causal=True)
    layer(x + 0.1, is_causal=True)
    torch.testing.assert_close(seen[0], (x @ m.gate_proj.weight.t() + m.gate_proj.bias).transpose(1, 2))
    torch.testing.assert_close(seen[1], seen[0], rtol=0, atol=0)
    assert not torch.allclose(seen[2], seen[0])


def test_rfa_cross_attention_gates_from_the_context():
    torch.manual_seed(0)
    layer = fastattn.MultiheadAttention(D, H, "rfa", gate=True, num_features=8, kdim=10, vdim=7,
                                        batch_first=True, dtype=torch.float64).eval()
    assert layer.mechanism.gate_proj.in_features == 10
    out, _ = layer(_x(n=5), torch.randn(2, 9, 10, dtype=torch.float64), torch.randn(2, 9, 7, dtype=torch.float64),
                   is_causal=True)
    assert out.shape == (2, 5, D) and torch.isfinite(out).all()


def test_rfa_ungated_stays_functional_and_the_standard_layer():
    spec = fastattn.get_method("rfa")
    assert spec.functional and spec.level == "sequence"
    q, k, v = (torch.randn(1, 2, 9, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    g = torch.Generator().manual_seed(3)
    assert fastattn.attention(q, k, v, method="rfa", is_causal=True, generator=g).shape == (1, 2, 9, 8)
    layer = fastattn.MultiheadAttention(D, H, "rfa", batch_first=True)
    assert layer.mechanism.gate_proj is None and not layer.mechanism.requires_causal
    assert not any("gate" in n for n, _ in layer.named_parameters())


# ---- transnormer: O = [SRMSNorm((Q K^T * M) V) * (X W_u)] W_o --------------------------------------
@pytest.mark.parametrize("causal", [False, True])
def test_transnormer_output_is_gated_elementwise_by_x_wu(causal):
    torch.manual_seed(0)
    layer = fastattn.MultiheadAttention(D, H, "transnormer", chunk=4, batch_first=True, dtype=torch.float64).eval()
    m = layer.mechanism
    assert isinstance(m, TransNormerLayer)
    x = _x()
    out, _ = layer(x, is_causal=causal)
    q, k, v = _heads(m.q_proj(x)), _heads(m.k_proj(x)), _heads(m.v_proj(x))
    inner = fastattn.attention(q, k, v, method="transnormer", is_causal=causal, chunk=4)  # the operator
    u = x @ m.u_proj.weight.t() + m.u_proj.bias
    torch.testing.assert_close(out, m.out_proj(_merge(inner) * u), rtol=1e-10, atol=1e-12)
    # the gate is elementwise and linear in W_u: doubling it doubles the pre-projection output
    with torch.no_grad():
        m.u_proj.weight.mul_(2.0)
        m.u_proj.bias.mul_(2.0)
        m.out_proj.bias.zero_()
    a, _ = layer(x, is_causal=causal)
    with torch.no_grad():
        m.u_proj.weight.mul_(0.5)
        m.u_proj.bias.mul_(0.5)
    b, _ = layer(x, is_causal=causal)
    torch.testing.assert_close(a, 2.0 * b, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        m.u_proj.weight.zero_()
        m.u_proj.bias.zero_()
    assert layer(x, is_causal=causal)[0].abs().max() == 0


def test_transnormer_gate_reads_the_query_side_in_cross_attention():
    torch.manual_seed(0)
    layer = fastattn.MultiheadAttention(D, H, "transnormer", chunk=4, kdim=10, vdim=10, batch_first=True,
                                        dtype=torch.float64).eval()
    x, c = _x(n=5), torch.randn(2, 9, 10, dtype=torch.float64)
    a, _ = layer(x, c, c)
    y = x.clone()
    y[:, 2] += 1.0  # the query side changes at token 2 only: u_2 (and q_2) change, nothing else does
    b, _ = layer(y, c, c)
    assert not torch.allclose(a[:, 2], b[:, 2])
    torch.testing.assert_close(a[:, [0, 1, 3, 4]], b[:, [0, 1, 3, 4]], rtol=1e-12, atol=1e-12)


# ---- interlaced: two modules, each with its own projections -----------------------------------------
def _interlaced_masks(n, p, causal):
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    long = (i - j) % p == 0
    short = i // p == j // p
    if causal:
        long = long & (j <= i)
        short = (short & (j <= i)) | (i // p - j // p == 1)  # previous_block: the whole previous block
    return long, short


@pytest.mark.parametrize("causal", [False, True])
def test_interlaced_layer_is_two_self_attention_modules(causal):
    n, p = 24, 4
    torch.manual_seed(0)
    layer = fastattn.MultiheadAttention(D, H, "interlaced", group=p, batch_first=True, dtype=torch.float64).eval()
    m = layer.mechanism
    assert isinstance(m, InterlacedLayer)
    x = _x(n=n)
    out, _ = layer(x, is_causal=causal)
    long, short = _interlaced_masks(n, p, causal)

    def module(stage, inp, allowed):
        q, k, v = _heads(stage.q_proj(inp)), _heads(stage.k_proj(inp)), _heads(stage.v_proj(inp))
        return stage.out_proj(_merge(F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)))

    z = module(m.long, x, long)
    torch.testing.assert_close(out, module(m.short, z, short), rtol=1e-10, atol=1e-12)


def test_interlaced_stages_have_their_own_projections():
    torch.manual_seed(0)
    layer = fastattn.MultiheadAttention(D, H, "interlaced", group=4, batch_first=True, dtype=torch.float64).eval()
    m = layer.mechanism
    names = {n for n, _ in layer.named_parameters()}
    for stage in ("long", "short"):
        assert {f"mechanism.{stage}.{p}_proj.weight" for p in "qkvo" if p != "o"} <= names
    assert m.long.q_proj.weight.data_ptr() != m.short.q_proj.weight.data_ptr()
    x = _x(n=16)
    a, _ = layer(x)
    with torch.no_grad():  # the long-range step's own queries matter (the operator uses the keys instead)
        m.long.q_proj.weight.add_(torch.randn_like(m.long.q_proj.weight))
    b, _ = layer(x)
    assert not torch.allclose(a, b)


def test_interlaced_operator_stages_and_layer_refuses_a_stage():
    q, k, v = (torch.randn(1, 2, 16, 8, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
               for i in range(3))
    long, short = _interlaced_masks(16, 4, False)
    sdpa = F.scaled_dot_product_attention
    torch.testing.assert_close(fastattn.attention(q, k, v, "interlaced", group=4, stage="long"),
                               sdpa(q, k, v, attn_mask=long), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fastattn.attention(q, k, v, "interlaced", group=4, stage="short"),
                               sdpa(q, k, v, attn_mask=short), rtol=1e-10, atol=1e-12)
    assert fastattn.get_method("interlaced").functional
    with pytest.raises(ValueError, match="stage"):
        fastattn.MultiheadAttention(D, H, "interlaced", stage="long")
    with pytest.raises(ValueError, match="stage must be"):
        fastattn.attention(q, k, v, "interlaced", stage="middle")


# ---- transnormer's LRPE: a_ts = sum_d phi(q_t)_d phi(k_s)_d cos(theta_d (t - s)) lambda^(t - s) --------
def _lrpe(scale=40.0):
    from helpers import make_mech

    m = make_mech(fastattn.get_method("transnormer"), lrpe=True).double()
    with torch.no_grad():
        m.theta.mul_(scale)  # angles of order 1 per step: the rotation matters
    return m


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lk", [21, 29])
def test_transnormer_lrpe_fast_path_equals_the_cosine_form(causal, lk):
    from helpers import qkv

    m = _lrpe()
    q, k, v = qkv(lq=21, lk=lk, requires_grad=True)
    kpm = torch.zeros(q.shape[0], lk, dtype=torch.bool)
    kpm[1, 15:] = True
    fast = m.run(q, k, v, is_causal=causal, key_padding_mask=kpm)
    ref = m.run(q, k, v, is_causal=causal, key_padding_mask=kpm, reference=True)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(torch.autograd.grad(fast.square().sum(), (q, k, v, m.theta)),
                    torch.autograd.grad(ref.square().sum(), (q, k, v, m.theta))):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_transnormer_lrpe_rotation_matters_decodes_and_is_learned():
    from helpers import make_mech, qkv

    m = _lrpe()
    plain = make_mech(fastattn.get_method("transnormer")).double()
    q, k, v = qkv(lq=23)
    full = m.run(q, k, v, is_causal=True)
    assert not torch.allclose(full, plain.run(q, k, v, is_causal=True))
    outs, state = [], None
    for a, b in ((0, 1), (1, 9), (9, 23)):  # decoding rotates the new tokens at their absolute positions
        o, state = m.step(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], state, 0.25)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 2), full, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        m.theta.zero_()  # no rotation: LRPE-d is the decay alone
    torch.testing.assert_close(m.run(q, k, v, is_causal=True), plain.run(q, k, v, is_causal=True))
    with pytest.raises(ValueError, match="learned parameters"):
        fastattn.attention(q, k, v, method="transnormer", lrpe=True)
    assert fastattn.get_method("transnormer").functional  # lrpe is off by default


def test_from_torch_refuses_the_two_module_interlaced_layer():
    mha = torch.nn.MultiheadAttention(D, H)
    with pytest.raises(ValueError, match="from_torch"):
        fastattn.MultiheadAttention.from_torch(mha, "interlaced", group=4)
    layer = fastattn.MultiheadAttention.from_torch(mha, "transnormer")  # one set of projections, plus W_u
    torch.testing.assert_close(layer.q_proj.weight, mha.in_proj_weight[:D])


def test_interlaced_layer_state_selects_beams():
    """The two modules' states travel together (StackedState): select reorders both."""
    torch.manual_seed(0)
    layer = fastattn.MultiheadAttention(D, H, "interlaced", group=4, batch_first=True, dtype=torch.float64).eval()
    x = _x(b=3, n=11)
    full, _ = layer(x, is_causal=True)
    _, state = layer.step(x[:, :7], None)
    assert state.length == 7 and state.batch_size == 3
    beams = torch.tensor([2, 0, 2])
    out, state = layer.step(x[beams, 7:], state.select(beams).to("cpu"))
    torch.testing.assert_close(out, full[beams, 7:], rtol=1e-10, atol=1e-12)
    assert state.length == 11
