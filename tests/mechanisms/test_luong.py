"""luong (Luong et al. 2015, arXiv:1508.04025): the defining properties.

Global dot attention is softmax attention with scale 1; general with ``W_a = I`` is dot; concat is
Bahdanau's additive score over the concatenated pair. local-p predicts ``p_t = S sigmoid(v_p^T tanh(W_p
h_t))`` from each example's real length ``S``, keeps the window ``|s - p_t| <= D`` and multiplies the
window softmax by an unrenormalised Gaussian (sigma = D / 2).
"""

from __future__ import annotations

import math

import pytest
import torch

import fastattn
from helpers import alignment, grads, onmt_global_attention

B, LQ, LK, D = 3, 6, 11, 5


def make(seed: int = 0, qd: int = D, kd: int = D, **options):
    return alignment("luong", qd, kd, seed=seed, **options)


def inputs(seed: int = 0, qd: int = D, kd: int = D, lq: int = LQ, requires_grad: bool = False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, lq, qd, generator=g, dtype=torch.float64, requires_grad=requires_grad)
    k = torch.randn(B, LK, kd, generator=g, dtype=torch.float64, requires_grad=requires_grad)
    return q, k


def padding() -> torch.Tensor:
    m = torch.zeros(B, LK, dtype=torch.bool)
    m[1, 7:] = True
    m[2, 3:] = True
    return m


def test_global_dot_is_softmax_attention_with_scale_one():
    a = make(score="dot")
    q, k = inputs(requires_grad=True)
    kpm = padding()
    ctx, w = a(q, k, key_padding_mask=kpm)
    ref = fastattn.attention(q[:, None], k[:, None], k[:, None], "softmax", key_padding_mask=kpm, scale=1.0)[:, 0]
    torch.testing.assert_close(ctx, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w, torch.softmax((q @ k.transpose(1, 2)).masked_fill(kpm[:, None], -math.inf), -1))
    for g1, g2 in zip(grads(ctx, [q, k]), grads(ref, [q, k])):
        torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)
    # scale is applied only when asked: 1/sqrt(d) gives the library's default softmax attention
    scaled, _ = make(score="dot", scale=D ** -0.5)(q, k, key_padding_mask=kpm)
    default = fastattn.attention(q[:, None], k[:, None], k[:, None], "softmax", key_padding_mask=kpm)[:, 0]
    torch.testing.assert_close(scaled, default, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(ctx, default)


def test_general_with_identity_is_dot_and_dot_needs_equal_widths():
    a, dot = make(score="general"), make(score="dot")
    with torch.no_grad():
        a.attn.w_a.weight.copy_(torch.eye(D, dtype=torch.float64))
    q, k = inputs()
    for x, y in zip(a(q, k), dot(q, k)):
        torch.testing.assert_close(x, y, rtol=1e-13, atol=1e-14)
    with pytest.raises(ValueError, match="query_dim == key_dim"):
        fastattn.AlignmentAttention(4, 6, "luong", score="dot")
    with pytest.raises(ValueError, match="score"):
        fastattn.AlignmentAttention(4, 6, "luong", score="location")


def test_concat_is_the_additive_score():
    luong = make(qd=4, kd=6, score="concat", attention_dim=3, chunk_bytes=200)
    add = fastattn.AlignmentAttention(4, 6, "additive", attention_dim=3, dtype=torch.float64)
    with torch.no_grad():
        add.attn.w_a.weight.copy_(luong.attn.w_a.weight[:, :4])
        add.attn.u_a.weight.copy_(luong.attn.w_a.weight[:, 4:])
        add.attn.v_a.weight.copy_(luong.attn.v_a.weight)
    q, k = inputs(qd=4, kd=6)
    for x, y in zip(luong(q, k, key_padding_mask=padding()), add(q, k, key_padding_mask=padding())):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("score", ["dot", "general", "concat"])
@pytest.mark.parametrize("causal", [False, True])
def test_local_p_fast_path_equals_reference_values_and_grads(score, causal):
    a = make(score=score, align="local-p", window=2, attention_dim=4)
    params = list(a.parameters())
    for kpm in (None, padding()):
        q, k = inputs(requires_grad=True)
        v = torch.randn(B, LK, D, dtype=torch.float64, requires_grad=True)
        (cf, wf), (cr, wr) = (a(q, k, v, kpm, is_causal=causal), a.reference(q, k, v, kpm, is_causal=causal))
        torch.testing.assert_close(wf, wr, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(cf, cr, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(cf, wf @ v, rtol=1e-10, atol=1e-12)
        out, ref = torch.cat([cf.flatten(), wf.flatten()]), torch.cat([cr.flatten(), wr.flatten()])
        for g1, g2 in zip(grads(out, [q, k, v, *params]), grads(ref, [q, k, v, *params])):
            if g2 is None:
                assert g1 is None or (g1 == 0).all()
            else:
                torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-11)


def test_local_p_window_gaussian_and_real_source_length():
    window = 2
    a = make(score="general", align="local-p", window=window)
    q, k = inputs()
    kpm = padding()
    _, w = a(q, k, key_padding_mask=kpm)
    s_len = (~kpm).sum(-1).double()
    from fastattn.core.masks import Mask

    p = a.attn.positions(q, Mask(lq=LQ, lk=LK, key_padding=kpm))  # (B, Lq)
    assert ((p >= 0) & (p <= s_len[:, None])).all()  # p_t in [0, S] with S the REAL length
    s = torch.arange(LK, dtype=torch.float64)
    outside = (s - p[..., None]).abs() > window
    assert (w[outside] == 0).all() and (w[kpm[:, None].expand_as(w)] == 0).all()
    assert (w[~outside & ~kpm[:, None].expand_as(w)] > 0).all()
    # the Gaussian is not renormalised: a row sums to less than 1, and dividing it back gives the window softmax
    assert (w.sum(-1) < 1).all()
    g = torch.exp(-(s - p[..., None]) ** 2 / (2 * (window / 2) ** 2))
    soft = torch.where(w > 0, w / g, torch.zeros_like(w))
    torch.testing.assert_close(soft.sum(-1), torch.ones(B, LQ, dtype=w.dtype))
    # S really is the per-example length: the same query against the unpadded prefix alone
    p_alone = a.attn.positions(q[2:3], Mask(lq=LQ, lk=3))
    torch.testing.assert_close(p[2:3], p_alone)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(p[2:3], a.attn.positions(q[2:3], Mask(lq=LQ, lk=LK)))


def test_local_p_trains_the_position_predictor_through_the_gaussian():
    a = make(score="dot", align="local-p", window=3)
    q, k = inputs()
    ctx, _ = a(q, k, key_padding_mask=padding())
    g_vp, g_wp = torch.autograd.grad(ctx.square().sum(), [a.attn.v_p.weight, a.attn.w_p.weight])
    assert g_vp.abs().sum() > 0 and g_wp.abs().sum() > 0


def test_local_p_steps_equal_the_forward():
    a = make(score="concat", align="local-p", window=2, attention_dim=4)
    q, k = inputs()
    kpm = padding()
    ctx, w = a(q, k, key_padding_mask=kpm)
    state = None
    for t in range(LQ):
        c_t, w_t, state = a.step(q[:, t], k, state, kpm)
        torch.testing.assert_close(c_t, ctx[:, t], rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(w_t, w[:, t], rtol=1e-12, atol=1e-13)


def test_bad_options():
    for bad in ({"align": "local-m"}, {"window": 0}, {"attention_dim": 0}, {"chunk_bytes": 0}):
        with pytest.raises(ValueError):
            fastattn.AlignmentAttention(4, 4, "luong", **bad)


# ---- peers (numerical cross-checks; skipped when the package is absent) ------------------------------
def like_peer(peer, score: str):
    """Our layer with the peer's ``general`` matrix: both score ``linear_in(q) . k`` (``W_a = linear_in.weight^T``)."""
    a = make(score=score)
    if score == "general":
        with torch.no_grad():
            a.attn.w_a.weight.copy_(peer.linear_in.weight.T)
    return a


@pytest.mark.parametrize("score", ["dot", "general"])
def test_peer_pytorch_nlp_attention(score):
    """``torchnlp.nn.Attention`` (pytorch-nlp 0.5.0): its weights, and its ``tanh(linear_out([c; q']))``
    (``q'`` the transformed query) rebuilt from our context."""
    peer = pytest.importorskip("torchnlp.nn").Attention(D, attention_type=score).double()
    a = like_peer(peer, score)
    q, k = inputs()
    out, w_peer = peer(q, k)
    ctx, w = a(q, k)
    torch.testing.assert_close(w, w_peer, rtol=1e-12, atol=1e-13)
    q_used = peer.linear_in(q) if score == "general" else q
    torch.testing.assert_close(torch.tanh(peer.linear_out(torch.cat([ctx, q_used], -1))), out, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("score", ["dot", "general"])
def test_peer_opennmt_global_attention(score):
    """``onmt.modules.GlobalAttention`` (OpenNMT-py 3.5.1) with source lengths: its weights, and its
    ``tanh(linear_out([c; h_t]))`` rebuilt from our context."""
    peer = onmt_global_attention().GlobalAttention(D, attn_type=score).double()
    a = like_peer(peer, score)
    q, k = inputs()
    kpm = padding()
    attn_h, w_peer = peer(q, k, src_len=(~kpm).sum(-1))
    ctx, w = a(q, k, key_padding_mask=kpm)
    torch.testing.assert_close(w, w_peer, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(torch.tanh(peer.linear_out(torch.cat([ctx, q], -1))), attn_h, rtol=1e-12, atol=1e-13)
