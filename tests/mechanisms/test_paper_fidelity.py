"""Issue 17's fidelity defects: one test (or a few) per item, each failing on the code before its fix."""

from __future__ import annotations

import pytest
import torch

import fastattn
from helpers import make_mech, qkv, rel_err, sequence_specs


def _spec(name):
    return fastattn.get_method(name)


# ---- item 1: jukebox with every length <= width, and its first decoding steps -----------------------
@pytest.mark.parametrize("causal", [False, True])
def test_jukebox_short_sequences_give_the_reference(causal):
    q = torch.randn(2, 4, 128, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = fastattn.attention(q, q, q, method="jukebox", is_causal=causal)
    mech = make_mech(_spec("jukebox"), h=4, hkv=4, width=128, kinds=("row", "column", "previous_row")).double()
    ref = mech.run(q, q, q, is_causal=causal, reference=True)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    # the previous_row heads (the last group) see nothing in the first row: zeros
    assert out[:, 3].abs().max() == 0


def test_jukebox_decoding_starts_and_equals_the_forward():
    torch.manual_seed(0)
    layer = fastattn.MultiheadAttention(64, 4, "jukebox", width=4, batch_first=True).double().eval()
    x = torch.randn(2, 11, 64, dtype=torch.float64)
    full, _ = layer(x, x, x, is_causal=True)
    state, outs = None, []
    for t in range(x.shape[1]):
        o, state = layer.step(x[:, t:t + 1], state)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-9, atol=1e-10)


def test_jukebox_test_options_cover_previous_row():
    assert "previous_row" in _spec("jukebox").cls.test_options["kinds"]


# ---- item 3: gated rfa where a gate underflows to 0 -----------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rfa_gate_underflow_stays_finite(dtype):
    """A gate of (numerically) 0 forgets everything before the current token: out_t = v_t exactly."""
    mech = make_mech(_spec("rfa"), gate=True).to(dtype)
    q, k, v = qkv(dtype=dtype)
    logits = torch.full((q.shape[0], q.shape[1], k.shape[2]), -1000.0, dtype=dtype)
    for reference in (False, True):
        out = mech.run_gated(q, k, v, logits, reference=reference)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, fastattn.core.base.repeat_kv(v, 2), rtol=1e-4, atol=1e-4)
    out, state = mech.step_gated(q[:, :, :5], k[:, :, :5], v[:, :, :5], logits[..., :5], None)
    out2, _ = mech.step_gated(q[:, :, 5:6], k[:, :, 5:6], v[:, :, 5:6], logits[..., 5:6], state)
    assert torch.isfinite(out).all() and torch.isfinite(out2).all()


def test_rfa_gated_forward_equals_reference_with_strong_gates():
    mech = make_mech(_spec("rfa"), gate=True).double()
    q, k, v = qkv(requires_grad=True)
    bias = torch.tensor([-40.0, 0.0, 3.0, -800.0], dtype=torch.float64)
    logits = (bias[:, None] + torch.randn(q.shape[0], 4, k.shape[2], dtype=torch.float64)).requires_grad_(True)
    fast = mech.run_gated(q, k, v, logits)
    ref = mech.run_gated(q, k, v, logits, reference=True)
    torch.testing.assert_close(fast, ref, rtol=1e-7, atol=1e-9)
    g1 = torch.autograd.grad(fast.sum(), (q, k, v, logits))
    g2 = torch.autograd.grad(ref.sum(), (q, k, v, logits))
    for a, b in zip(g1, g2):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


# ---- item 11: causal calls with fewer queries than keys return contiguous outputs -----------------
_CAUSAL = [s for s in sequence_specs() if s.causal]


@pytest.mark.parametrize("spec", _CAUSAL, ids=[s.name for s in _CAUSAL])
def test_causal_short_query_output_is_contiguous(spec):
    mech = make_mech(spec).double()
    q, k, v = qkv(lq=5, lk=61)
    assert mech.run(q, k, v, is_causal=True).is_contiguous()


# ---- item 10: gmat, star, hat honour a user-given scale when reading their nodes ------------------
@pytest.mark.parametrize("name,params", [
    ("gmat", ("memory.query", "memory.key")), ("star", ("relay.query", "relay.key")), ("hat", ("segment_query",)),
])
def test_node_reads_honour_scale(name, params):
    """Every score of these layers is ``scale * (query . key)`` with the learned node vectors on one side,
    so scaling q, k and the learned vectors by ``a`` and ``scale`` by ``1 / a^2`` changes nothing --
    unless some score ignores ``scale``."""
    a, scale = 3.0, 0.1
    mech = make_mech(_spec(name)).double()
    other = make_mech(_spec(name)).double()
    other.load_state_dict(mech.state_dict())
    with torch.no_grad():
        for p in params:
            other.get_parameter(p).mul_(a)
    q, k, v = qkv()
    for reference in (False, True):
        want = mech.run(q, k, v, scale=scale, reference=reference)
        got = other.run(q * a, k * a, v, scale=scale / a ** 2, reference=reference)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


# ---- items 8, 9: padding equals truncation for star (its ring) and sac (its LSTM) ----------------
@pytest.mark.parametrize("name", ["star", "sac"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_equals_truncation(name, side):
    mech = make_mech(_spec(name)).double()
    q, k, v = qkv()
    n, lk = 40, k.shape[2]
    kpm = torch.zeros(2, lk, dtype=torch.bool)
    real = slice(0, n) if side == "right" else slice(lk - n, lk)
    kpm[1] = True
    kpm[1, real] = False
    for causal in [False, True] if _spec(name).causal else [False]:
        for reference in (False, True):
            padded = mech.run(q, k, v, key_padding_mask=kpm, is_causal=causal, reference=reference)[1:, :, real]
            alone = mech.run(q[1:, :, real], k[1:, :, real], v[1:, :, real], is_causal=causal, reference=reference)
            torch.testing.assert_close(padded, alone, rtol=1e-10, atol=1e-12)


def test_star_short_sequences_forward_equals_reference():
    mech = make_mech(_spec("star"), radius=2, block=4).double()
    for n in range(1, 12):
        q, k, v = qkv(lq=n, requires_grad=True)
        kpm = torch.zeros(2, n, dtype=torch.bool)
        kpm[1, max(1, n - 3):] = True
        for m in (None, kpm):
            fast = mech.run(q, k, v, key_padding_mask=m)
            ref = mech.run(q, k, v, key_padding_mask=m, reference=True)
            torch.testing.assert_close(fast, ref, rtol=1e-9, atol=1e-11)
            for a, b in zip(torch.autograd.grad(fast.sum(), (q, k, v)), torch.autograd.grad(ref.sum(), (q, k, v))):
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


# ---- item 7: bigbird's random graph survives dtype casts; Lq > Lk is refused; authors' layout ------
@pytest.mark.parametrize("cast", ["half", "bfloat16"])
def test_bigbird_graph_survives_dtype_casts(cast):
    mech = make_mech(_spec("bigbird"), block=4, max_blocks=64)
    before = mech.dense_mask(256, 256)
    getattr(mech, cast)()
    assert torch.equal(mech.dense_mask(256, 256), before)
    assert not mech.random_table.is_floating_point()


def test_bigbird_more_queries_than_keys_is_a_clear_error():
    mech = make_mech(_spec("bigbird")).double()
    q, _, _ = qkv(lq=61)
    _, k, v = qkv(lq=40)
    with pytest.raises(ValueError, match="query length <= key length"):
        mech.run(q, k, v)


def test_bigbird_default_layout_follows_the_authors():
    """Global blocks are the first and the last; random blocks differ between heads; forward equals
    the reference per head (float64, values and gradients)."""
    mech = make_mech(_spec("bigbird"), block=4, global_blocks=2, random_blocks=2, max_blocks=64)
    assert mech.options.global_at == "ends" and mech.options.per_head
    m = mech.dense_mask(64, 64)  # (H, L, L)
    assert m.shape == (4, 64, 64)
    assert m[:, :4].all() and m[:, -4:].all() and m[:, :, :4].all() and m[:, :, -4:].all()
    assert not all(torch.equal(m[0], m[h]) for h in range(1, 4))
    mech = mech.double()
    q, k, v = qkv(lq=64, requires_grad=True)
    fast, ref = mech.run(q, k, v), mech.run(q, k, v, reference=True)
    torch.testing.assert_close(fast, ref, rtol=1e-9, atol=1e-11)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q, fastattn.core.base.repeat_kv(k, 2), fastattn.core.base.repeat_kv(v, 2), attn_mask=m)
    torch.testing.assert_close(fast, dense, rtol=1e-9, atol=1e-11)


def test_bigbird_loads_an_old_float_table():
    mech = make_mech(_spec("bigbird"), per_head=False, global_at="start")
    state = mech.state_dict()
    u = torch.rand(state["random_table"].shape[1:], generator=torch.Generator().manual_seed(0))
    state["random_table"] = u
    mech.load_state_dict(state)
    want = (u.double() * 2 ** 31).long()
    assert torch.equal(mech.random_table[0], want)


# ---- item 4: lightning / transnormer decay rates and output norm follow the authors' code ----------
def test_alibi_slopes_of_the_authors():
    from fastattn.mechanisms.kernel.decayed import alibi_slopes
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -(h + 1) for h in range(8)], dtype=torch.float64))
    six = [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3]  # ALiBi's interleaving
    torch.testing.assert_close(alibi_slopes(6), torch.tensor(six, dtype=torch.float64))


@pytest.mark.parametrize("name", ["lightning", "transnormer"])
@pytest.mark.parametrize("layer_ratio", [0.0, 0.5])
def test_decayed_default_is_the_authors_form(name, layer_ratio):
    """lambda_h = exp(-2^(-8(h+1)/H) (1 - l/(L-1) + 1e-5)); SRMSNorm over the concatenated heads."""
    spec = _spec(name)
    mech = make_mech(spec, hkv=4, layer_ratio=layer_ratio).double()
    assert mech.options.decay == "slopes" and mech.options.norm == "srms_concat"
    lam = torch.exp(-torch.tensor([2.0 ** -(2 * (h + 1)) for h in range(4)], dtype=torch.float64)
                    * (1 - layer_ratio + 1e-5))
    torch.testing.assert_close(mech.lambdas.double(), lam, rtol=1e-6, atol=0)
    q, k, v = qkv(hkv=4, requires_grad=True)
    act = (lambda x: x) if name == "lightning" else torch.nn.functional.silu
    t = torch.arange(q.shape[2])
    dist = (t[:, None] - t[None, :]).double()
    m = torch.where(dist >= 0, lam.view(-1, 1, 1) ** dist.clamp_min(0), torch.zeros((), dtype=torch.float64))
    raw = (act(q) @ act(k).transpose(-1, -2) * m) @ v  # (B, H, L, Ev)
    want = raw / raw.pow(2).mean(dim=(1, 3), keepdim=True).add(1e-6).sqrt()
    out = mech.run(q, k, v, is_causal=True)
    torch.testing.assert_close(out, want, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", ["lightning", "transnormer"])
def test_decay_that_underflows_to_zero_is_exact(name):
    """decay_base in the hundreds: lambda underflows (float32 and float64); each token then sees only
    itself, with no NaN."""
    mech = make_mech(_spec(name), hkv=4, decay="paper", decay_base=5000.0, norm="none")
    act = (lambda x: x) if name == "lightning" else torch.nn.functional.silu
    for dtype in (torch.float32, torch.float64):
        q, k, v = qkv(hkv=4, dtype=dtype)
        own = (act(q) * act(k)).sum(-1, keepdim=True) * v
        for reference in (False, True):
            out = mech.to(dtype).run(q, k, v, is_causal=True, reference=reference)
            assert torch.isfinite(out).all()
            torch.testing.assert_close(out[:, 1:], own[:, 1:], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="decay_base"):
        make_mech(_spec(name), decay="paper", decay_base=float("inf"))
    with pytest.raises(ValueError, match="decay must be"):
        make_mech(_spec(name), decay="alibi")


# ---- item 5: hedgehog's feature map is a softmax per half, as in the authors' code -----------------
def test_hedgehog_feature_map_is_a_softmax_per_half():
    mech = make_mech(_spec("hedgehog"), hkv=4).double()
    with torch.no_grad():
        for p in (mech.q_weight, mech.k_weight):
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1), dtype=p.dtype))
    assert mech.options.softmax == "halves"
    q, k, v = qkv(hkv=4)

    def phi(x, w, b):
        z = torch.einsum("bhld,hed->bhle", x, w) + b[:, None]
        return torch.cat([z.softmax(-1), (-z).softmax(-1)], -1)

    fq, fk = phi(q, mech.q_weight, mech.q_bias), phi(k, mech.k_weight, mech.k_bias)
    for causal in (False, True):
        a = fq @ fk.transpose(-1, -2)
        if causal:
            a = a.tril()
        want = (a @ v) / a.sum(-1, keepdim=True)
        torch.testing.assert_close(mech.run(q, k, v, is_causal=causal), want, rtol=1e-9, atol=1e-11)
    joint = make_mech(_spec("hedgehog"), hkv=4, softmax="joint").double()
    joint.load_state_dict(mech.state_dict())
    assert rel_err(joint.run(q, k, v), mech.run(q, k, v)) > 1e-3  # the old form is another kernel


# ---- item 6: fastmax normalisation: the paper's per-token form, or the authors' scaled dot product --
@pytest.mark.parametrize("causal", [False, True])
def test_fastmax_scaled_is_the_authors_default_form(causal):
    mech = make_mech(_spec("fastmax"), normalize="scaled").double()
    q, k, v = qkv()
    for scale in (None, 0.1):
        s = q @ fastattn.core.base.repeat_kv(k, 2).transpose(-1, -2) * (16 ** -0.5 if scale is None else scale)
        a = 1 + s + s * s / 2
        if causal:
            a = a.tril()
        want = a @ fastattn.core.base.repeat_kv(v, 2) / a.sum(-1, keepdim=True)
        for reference in (False, True):
            out = mech.run(q, k, v, is_causal=causal, scale=scale, reference=reference)
            torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-11)
    assert make_mech(_spec("fastmax")).options.normalize == "token"
    with pytest.raises(ValueError, match="order=2"):
        make_mech(_spec("fastmax"), normalize="scaled", order=1)


# ---- item 12: causal axial / interlaced reach every earlier position ---------------------------------
def _reach(name, n=48, **options):
    """Bool (n, n): does output i depend on value j (one call, float64 Jacobian)?"""
    mech = make_mech(_spec(name), h=1, hkv=1, **options).double()
    q, k, v = qkv(b=1, h=1, hkv=1, lq=n)
    v.requires_grad_(True)
    out = mech.run(q, k, v, is_causal=True)
    rows = []
    for i in range(n):
        (g,) = torch.autograd.grad(out[0, 0, i].sum(), v, retain_graph=True)
        rows.append(g[0, 0].abs().sum(-1) > 0)
    return torch.stack(rows)


@pytest.mark.parametrize("name,options", [("axial", {"width": 8}), ("interlaced", {"group": 8})])
def test_causal_axial_and_interlaced_reach_every_earlier_position(name, options):
    reach = _reach(name, **options)
    past = torch.ones(48, 48, dtype=torch.bool).tril()
    assert torch.equal(reach, past)  # everything in the past, nothing in the future


def test_causal_axial_upper_context_equals_its_definition():
    rows, w = 6, 8
    q, k, v = qkv(h=4, hkv=4, lq=rows * w)
    out = fastattn.attention(q, k, v, "axial", width=w, is_causal=True)
    F = torch.nn.functional
    grid = lambda x: x.reshape(*x.shape[:2], rows, w, x.shape[-1])  # noqa: E731
    row = F.scaled_dot_product_attention(grid(q), grid(k), grid(v), is_causal=True)
    u = F.scaled_dot_product_attention(grid(k), grid(k), grid(v))  # every column of each row
    earlier = torch.ones(rows, rows, dtype=torch.bool).tril(-1)  # r' < r
    s = torch.einsum("bhrce,bhsce->bhcrs", grid(q), grid(k)) * 16 ** -0.5
    p = torch.softmax(s.masked_fill(~earlier, float("-inf")), -1).nan_to_num(0.0)  # row 0: no earlier row
    upper = torch.einsum("bhcrs,bhsce->bhrce", p, u)
    torch.testing.assert_close(out, (row + upper).reshape(out.shape), rtol=1e-10, atol=1e-10)


def test_causal_interlaced_previous_block_equals_its_definition():
    n, p = 48, 8
    q, k, v = qkv(h=4, hkv=4, lq=n)
    out = fastattn.attention(q, k, v, "interlaced", group=p, is_causal=True)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    long = ((i - j) % p == 0) & (j <= i)
    short = ((i // p == j // p) & (j <= i)) | (i // p - j // p == 1)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    v_long = sdpa(k, k, v, attn_mask=long)
    torch.testing.assert_close(out, sdpa(q, k, v_long, attn_mask=short), rtol=1e-10, atol=1e-10)


# ---- item 13: diet's dilation follows the layer (authors: 2 ** layer) ------------------------------
def test_diet_dilation_follows_the_layer():
    n = 64
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    for layer in (0, 1, 3):
        m = make_mech(_spec("diet"), mode="dilated", window=3, layer=layer, block=8, dilation=None).dense_mask(n, n)
        d = 2 ** layer
        assert torch.equal(m, ((i - j).abs() <= 3 * d) & ((i - j) % d == 0))
    m = make_mech(_spec("diet"), mode="dilated", window=3, layer=3, dilation=4, block=8).dense_mask(n, n)
    assert torch.equal(m, ((i - j).abs() <= 12) & ((i - j) % 4 == 0))  # an explicit dilation wins


# ---- deviations: recorded on the classes, listed in the README -------------------------------------
def test_deviations_are_short_sentences_and_in_the_readme():
    from pathlib import Path

    from fastattn.docs import DEV_BEGIN, DEV_END, deviations_section

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    assert DEV_BEGIN in readme and DEV_END in readme
    assert deviations_section() in readme, "README deviations section is stale: run `fastattn readme`"
    assert fastattn.core.base.Mechanism.deviations == ()
    for s in fastattn.methods():
        devs = s.cls.deviations
        assert isinstance(devs, tuple) and all(isinstance(d, str) and d.strip() for d in devs), s.name
        for d in devs:
            assert f"`{s.name}`" in deviations_section() and d in readme
    kept = {s.name for s in fastattn.methods() if s.cls.deviations}
    # the decisions of issue 17 (items 4-6, 12, 13) are each recorded
    assert {"lightning", "transnormer", "hedgehog", "fastmax", "axial", "interlaced", "diet", "longformer",
            "gmat", "star", "bp_transformer", "flatten"} <= kept


# ---- item 13: longformer dilations per head (the paper dilates only some heads) ---------------------
def test_longformer_per_head_dilation():
    spec = _spec("longformer")
    opts = {"window": 3, "dilation": (1, 2, 1, 3), "global_tokens": (0, 30), "block": 8}
    mech = make_mech(spec, **opts).double()
    q, k, v = qkv(requires_grad=True)
    kpm = torch.zeros(2, 61, dtype=torch.bool)
    kpm[1, 40:] = True
    for causal in (False, True):
        m = mech.dense_mask(61, 61, causal=causal)
        assert m.shape == (4, 61, 61)
        for h, d in enumerate(opts["dilation"]):  # each head is the single-dilation layer's head
            single = make_mech(spec, **{**opts, "dilation": d}).dense_mask(61, 61, causal=causal)
            assert torch.equal(m[h], single)
        fast = mech.run(q, k, v, is_causal=causal, key_padding_mask=kpm)
        ref = mech.run(q, k, v, is_causal=causal, key_padding_mask=kpm, reference=True)
        torch.testing.assert_close(fast, ref, rtol=1e-9, atol=1e-11)
        allowed = m[None] & ~kpm[:, None, None, :]
        dense = torch.nn.functional.scaled_dot_product_attention(
            q, fastattn.core.base.repeat_kv(k, 2), fastattn.core.base.repeat_kv(v, 2), attn_mask=allowed)
        torch.testing.assert_close(fast, dense, rtol=1e-9, atol=1e-11)
        for a, b in zip(torch.autograd.grad(fast.sum(), (q, k, v)), torch.autograd.grad(ref.sum(), (q, k, v))):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    # decoding equals the causal forward, with a bounded cache
    q, k, v = qkv()
    state, outs = None, []
    for t in range(0, 61, 3):
        o, state = mech.step(q[:, :, t:t + 3], k[:, :, t:t + 3], v[:, :, t:t + 3], state, 16 ** -0.5)
        outs.append(o)
    assert state.k.shape[2] <= 3 * 3 + 2  # past the last global query: the widest window and the globals
    torch.testing.assert_close(torch.cat(outs, 2), mech.run(q, k, v, is_causal=True), rtol=1e-9, atol=1e-11)
    with pytest.raises(ValueError, match="per-head dilations"):
        make_mech(spec, dilation=(1, 2))
