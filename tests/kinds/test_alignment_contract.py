"""Contract of ``fastattn.AlignmentAttention``, parametrised over every registered mechanism of kind
``"seq2seq"``: weight rows are distributions over the real keys, padding and batch independence,
efficient path equal to the literal reference (values and gradients, float64 gradcheck), the 2-D query
form, decoding steps, causal use, save/load and errors."""

from __future__ import annotations

import pytest
import torch

import fastattn
from helpers import grads, through_bytes

B, LQ, LK, DQ, DK, DV = 3, 5, 9, 6, 7, 4
SPECS = [s for s in fastattn.methods() if s.kind == "seq2seq"]
IDS = [s.name for s in SPECS]
DECODING = [s for s in SPECS if s.decoding]


class QueryFree:
    """A query-free mechanism (``structured``: it learns its ``r = LQ`` queries, API section 3.3) under
    the contract: the contract's query is dropped and ``query=None`` passed instead."""

    def __init__(self, a: fastattn.AlignmentAttention) -> None:
        self.a = a

    def __getattr__(self, name):
        return getattr(self.a, name)

    def __call__(self, q, k, v=None, key_padding_mask=None, **kw):
        return self.a(None, k, v, key_padding_mask, **kw)

    def reference(self, q, k, v=None, key_padding_mask=None, **kw):
        return self.a.reference(None, k, v, key_padding_mask, **kw)


def make(spec, seed: int = 0, value_dim: int | None = DV, dtype=torch.float64, **options) -> fastattn.AlignmentAttention:
    opts = {**spec.cls.test_options, **options}
    a = fastattn.AlignmentAttention(DQ, DK, spec.name, value_dim=value_dim, dtype=dtype, **opts)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in a.parameters():
            p.copy_(0.6 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    if a.attn.query_free:
        assert a.attn.num_queries == LQ, "a query-free mechanism's test_options must give LQ learned queries"
        return QueryFree(a)
    return a


def inputs(b=B, lq=LQ, lk=LK, seed=0, requires_grad=False, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, lq, DQ, generator=g, dtype=dtype)
    k = torch.randn(b, lk, DK, generator=g, dtype=dtype)
    v = torch.randn(b, lk, DV, generator=g, dtype=dtype)
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    return q, k, v


def key_padding(b=B, lk=LK) -> torch.Tensor:
    """Sequence 0 unpadded, 1 right-padded to 5 keys, 2 to a single key."""
    m = torch.zeros(b, lk, dtype=torch.bool)
    m[1, 5:] = True
    m[2, 1:] = True
    return m


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_seq2seq_metadata(spec):
    assert spec.kind == "seq2seq" and not spec.functional
    assert spec.title and spec.arxiv and spec.complexity.startswith("O(")
    assert spec.cls is not None and spec.cls.spec is spec


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_shapes_and_weight_rows_are_distributions_over_real_keys(spec):
    a = make(spec)
    q, k, v = inputs()
    kpm = key_padding()
    ctx, w = a(q, k, v, key_padding_mask=kpm)
    assert ctx.shape == (B, LQ, DV) and w.shape == (B, LQ, LK)
    assert torch.isfinite(ctx).all() and (w >= 0).all()
    if a.attn.normalized:
        torch.testing.assert_close(w.sum(-1), torch.ones(B, LQ, dtype=w.dtype))
    else:  # unnormalised by design (its own tests check what its rows are); not secretly normalised
        assert not torch.allclose(w.sum(-1), torch.ones(B, LQ, dtype=w.dtype))
    assert (w.masked_select(kpm[:, None, :].expand_as(w)) == 0).all()
    torch.testing.assert_close(ctx, w @ v)  # the context is the weighted sum of the values
    # values default to the keys
    a2 = make(spec, value_dim=None)
    ctx2, w2 = a2(q, k)
    assert ctx2.shape == (B, LQ, DK)
    torch.testing.assert_close(ctx2, w2 @ k)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_two_dimensional_query(spec):
    a = make(spec)
    q, k, v = inputs()
    kpm = key_padding()
    if a.attn.query_free:  # a query is refused, and query=None is refused by the others
        with pytest.raises(ValueError, match="query=None"):
            a.a(q[:, 2], k, v, key_padding_mask=kpm)
        return
    ctx, w = a(q[:, 2], k, v, key_padding_mask=kpm)
    assert ctx.shape == (B, DV) and w.shape == (B, LK)
    # a 2-D query is a one-query call: row 2 of the full call, or (query-recurrent mechanisms, whose
    # query t depends on the queries before it) the only row of the one-query sequence
    full_ctx, full_w = a(q[:, 2:3] if a.attn.recurrent else q, k, v, key_padding_mask=kpm)
    row = 0 if a.attn.recurrent else 2
    torch.testing.assert_close(ctx, full_ctx[:, row], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w, full_w[:, row], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_padding_keys_never_matter(spec):
    a = make(spec)
    q, k, v = inputs()
    kpm = key_padding()
    _, k2, v2 = inputs(seed=7)
    k2 = torch.where(kpm[..., None], k2 * 5, k)
    v2 = torch.where(kpm[..., None], v2 * 5, v)
    ctx, w = a(q, k, v, key_padding_mask=kpm)
    ctx2, w2 = a(q, k2, v2, key_padding_mask=kpm)
    torch.testing.assert_close(ctx, ctx2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w, w2, rtol=1e-12, atol=1e-12)
    # equal to running each sequence on its real keys only
    c1, w1 = a(q[1:2], k[1:2, :5], v[1:2, :5])
    torch.testing.assert_close(ctx[1:2], c1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w[1:2, :, :5], w1, rtol=1e-12, atol=1e-12)
    # the mask is not ignored
    assert not torch.allclose(a(q, k2, v2)[0], ctx)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_all_padding_rows_are_zero_not_nan(spec):
    a = make(spec)
    q, k, v = inputs()
    kpm = key_padding()
    kpm[0] = True
    ctx, w = a(q, k, v, key_padding_mask=kpm)
    assert torch.isfinite(ctx).all() and (ctx[0] == 0).all() and (w[0] == 0).all()


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_batch_independence(spec):
    a = make(spec)
    q, k, v = inputs()
    q2, k2, v2 = (t.clone() for t in (q, k, v))
    q2[1:], k2[1:], v2[1:] = inputs(seed=3)[0][1:], inputs(seed=3)[1][1:], inputs(seed=3)[2][1:]
    torch.testing.assert_close(a(q, k, v)[0][0], a(q2, k2, v2)[0][0], rtol=0, atol=1e-13)
    torch.testing.assert_close(a(q[:1], k[:1], v[:1])[0], a(q, k, v)[0][:1], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
@pytest.mark.parametrize("lq", [1, LQ])
def test_fast_path_equals_reference_values_and_grads(spec, lq):
    a = make(spec)
    params = list(a.parameters())
    causal_flags = [False, True] if spec.causal else [False]
    for causal in causal_flags:
        for kpm in (None, key_padding()):
            q, k, v = inputs(lq=lq, requires_grad=True)
            (cf, wf), (cr, wr) = a(q, k, v, kpm, is_causal=causal), a.reference(q, k, v, kpm, is_causal=causal)
            torch.testing.assert_close(cf, cr, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(wf, wr, rtol=1e-10, atol=1e-12)
            out = torch.cat([cf.flatten(), wf.flatten()])
            ref = torch.cat([cr.flatten(), wr.flatten()])
            for gf, gr in zip(grads(out, [q, k, v, *params]), grads(ref, [q, k, v, *params])):
                torch.testing.assert_close(gf, gr, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_gradcheck_float64(spec):
    a = make(spec)
    q, k, v = inputs(b=2, lq=3, lk=4, requires_grad=True)
    kpm = torch.tensor([[False] * 4, [False, False, True, True]])

    def fn(q, k, v):
        return a(q, k, v, key_padding_mask=kpm)

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("spec", DECODING, ids=[s.name for s in DECODING])
def test_steps_equal_the_forward(spec):
    a = make(spec)
    q, k, v = inputs()
    kpm = key_padding()
    ctx, w = a(q, k, v, key_padding_mask=kpm)
    state = None
    for t in range(LQ):
        c_t, w_t, state = a.step(q[:, t], k, state, kpm, values=v)
        assert c_t.shape == (B, DV) and w_t.shape == (B, LK)
        torch.testing.assert_close(c_t, ctx[:, t], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(w_t, w[:, t], rtol=1e-12, atol=1e-12)
    assert state.length == LQ
    # beam search: select reorders the batch of the state
    idx = torch.tensor([2, 0])
    c_sel, _, _ = a.step(q[idx, 0], k[idx], state.select(idx), kpm[idx], values=v[idx])
    c_next, _, _ = a.step(q[:, 0], k, state, kpm, values=v)  # the same step on the whole batch
    torch.testing.assert_close(c_sel, c_next[idx], rtol=1e-12, atol=1e-12)
    if not a.attn.recurrent:  # no position state: any step is a one-query forward
        torch.testing.assert_close(c_sel, ctx[idx, 0], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="state was made for keys"):
        a.step(q[:, 0], k[:, :4], state, values=v[:, :4])


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_causal_use_never_sees_the_future(spec):
    a = make(spec)
    q, k, v = inputs(lq=LK, lk=LK)
    if not spec.causal:
        with pytest.raises(ValueError, match="causal"):
            a(q, k, v, is_causal=True)
        return
    ctx, w = a(q, k, v, is_causal=True)
    t = 4
    k2, v2 = k.clone(), v.clone()
    k2[:, t + 1:] += 3.0
    v2[:, t + 1:] -= 2.0
    ctx2, w2 = a(q, k2, v2, is_causal=True)
    torch.testing.assert_close(ctx[:, :t + 1], ctx2[:, :t + 1], rtol=0, atol=1e-13)
    assert (w.triu(1) == 0).all()
    assert not torch.allclose(ctx[:, t + 1:], ctx2[:, t + 1:])
    if a.attn.recurrent:
        # query t depends on the queries before it: a suffix call is not a slice of the square call; the
        # causal call is the non-causal one with the future keys' weights zeroed
        _, w_all = a(q, k, v)
        torch.testing.assert_close(w, w_all.tril(), rtol=1e-12, atol=1e-13)
        _, w_last = a(q[:, -3:], k, v, is_causal=True)
        _, w_last_all = a(q[:, -3:], k, v)
        torch.testing.assert_close(w_last, w_last_all.tril(LK - 3), rtol=1e-12, atol=1e-13)
    else:
        # bottom-right alignment: the last Lq queries over Lk keys are the last rows of the square call
        c_last, _ = a(q[:, -3:], k, v, is_causal=True)
        torch.testing.assert_close(c_last, ctx[:, -3:], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="query length <= key length"):
        a(q, k[:, :3], v[:, :3], is_causal=True)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_save_and_load(spec):
    a, b = make(spec, seed=0), make(spec, seed=1)
    q, k, v = inputs()
    assert not torch.allclose(b(q, k, v)[0], a(q, k, v)[0])
    b.load_state_dict(through_bytes(a.state_dict()))
    torch.testing.assert_close(b(q, k, v)[0], a(q, k, v)[0], rtol=0, atol=0)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_float32_agrees_with_float64(spec):
    a64, a32 = make(spec), make(spec, dtype=torch.float32)
    q, k, v = inputs()
    c64, w64 = a64(q, k, v)
    c32, w32 = a32(q.float(), k.float(), v.float())
    assert c32.dtype == torch.float32
    torch.testing.assert_close(c32.double(), c64, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w32.double(), w64, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_bad_inputs_raise(spec):
    a = make(spec)
    q, k, v = inputs()
    if a.attn.query_free:
        with pytest.raises(ValueError, match="query=None"):
            a.a(q, k, v)
    else:
        with pytest.raises(ValueError, match="query has"):
            a(q[..., :-1], k, v)
        with pytest.raises(ValueError, match="batch"):
            a(q[:-1], k, v)
        with pytest.raises(ValueError, match="query is required"):
            a(None, k, v)
    with pytest.raises(ValueError, match="keys has"):
        a(q, k[..., :-1], v)
    with pytest.raises(ValueError, match="values has"):
        a(q, k, v[..., :-1])
    with pytest.raises(ValueError, match="same length"):
        a(q, k, v[:, :-1])
    with pytest.raises(ValueError, match="batch"):
        a(q, k, v[:-1])
    with pytest.raises(ValueError, match="keys must be"):
        a(q, k[0], v)
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        a(q, k, v, key_padding_mask=key_padding()[:, :-1])
    with pytest.raises(TypeError, match="bool"):
        a(q, k, v, key_padding_mask=key_padding().float())
    with pytest.raises(TypeError, match="dtype"):
        a(q.float(), k.float(), v) if a.attn.query_free else a(q.float(), k, v)
    with pytest.raises(ValueError, match="values default to the keys"):
        a(q, k)  # value_dim (4) != key_dim (7)
    with pytest.raises(ValueError, match="unknown option"):
        fastattn.AlignmentAttention(DQ, DK, spec.name, no_such_option=1)
    with pytest.raises(ValueError, match="seq2seq"):
        fastattn.AlignmentAttention(DQ, DK, "softmax")
    with pytest.raises(ValueError, match="seq2seq"):
        fastattn.MultiheadAttention(8, 2, spec.name)


def test_other_kinds_point_to_their_facade():
    q = k = v = torch.randn(1, 1, 4, 8)
    for spec in SPECS:
        with pytest.raises(ValueError, match="AlignmentAttention"):
            fastattn.attention(q, k, v, spec.name)
    for spec in (s for s in fastattn.methods() if s.kind == "vision"):
        with pytest.raises(ValueError, match=getattr(spec.cls, "facade", "Attention2d")):
            fastattn.attention(q, k, v, spec.name)
        with pytest.raises(ValueError, match="vision"):
            fastattn.AlignmentAttention(DQ, DK, spec.name)
