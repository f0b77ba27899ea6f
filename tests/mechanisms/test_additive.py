"""additive (Bahdanau attention, arXiv:1409.0473): the defining properties.

``e_ij = v_a^T tanh(W_a s_i + U_a h_j)``, a softmax over the keys, the context a weighted sum of the
values. The efficient path projects the keys once per source (also across decoder steps) and evaluates
the energies in query chunks bounded by ``chunk_bytes``.
"""

from __future__ import annotations

import pytest
import torch

import fastattn
from helpers import grads, onmt_global_attention

B, LQ, LK, DQ, DK, A = 2, 6, 8, 5, 7, 4


def make(seed: int = 0, **options) -> fastattn.AlignmentAttention:
    opts = {"attention_dim": A, **options}
    a = fastattn.AlignmentAttention(DQ, DK, "additive", dtype=torch.float64, **opts)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in a.parameters():
            p.copy_(0.7 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return a


def inputs(seed: int = 0, requires_grad: bool = False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, LQ, DQ, generator=g, dtype=torch.float64, requires_grad=requires_grad)
    k = torch.randn(B, LK, DK, generator=g, dtype=torch.float64, requires_grad=requires_grad)
    return q, k


def concat_form(a: fastattn.AlignmentAttention, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The same energies written as Luong's ``concat`` score: ``v_a^T tanh(W [s_i; h_j])`` with
    ``W = [W_a, U_a]`` (one matrix over the concatenated pair)."""
    m = a.attn
    w = torch.cat([m.w_a.weight, m.u_a.weight], dim=1)  # (A, Dq + Dk)
    pair = torch.cat([q[:, :, None, :].expand(-1, -1, k.shape[1], -1),
                      k[:, None, :, :].expand(-1, q.shape[1], -1, -1)], dim=-1)
    pre = pair @ w.T
    if m.w_a.bias is not None:
        pre = pre + m.w_a.bias
    return torch.tanh(pre) @ m.v_a.weight[0]


@pytest.mark.parametrize("bias", [False, True])
def test_equals_the_concat_form_values_and_grads(bias):
    a = make(bias=bias)
    q, k = inputs(requires_grad=True)
    kpm = torch.zeros(B, LK, dtype=torch.bool)
    kpm[1, 5:] = True
    ctx, w = a(q, k, key_padding_mask=kpm)
    e = concat_form(a, q, k).masked_fill(kpm[:, None, :], float("-inf"))
    w_ref = torch.softmax(e, dim=-1)
    torch.testing.assert_close(w, w_ref, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(ctx, w_ref @ k, rtol=1e-12, atol=1e-13)
    params = list(a.parameters())
    for g1, g2 in zip(grads(ctx, [q, k, *params]), grads(w_ref @ k, [q, k, *params])):
        torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)


def test_w_a_zero_makes_the_weights_independent_of_the_query_and_u_a_zero_makes_them_uniform():
    a = make()
    q, k = inputs()
    with torch.no_grad():
        a.attn.w_a.weight.zero_()
    _, w = a(q, k)
    torch.testing.assert_close(w, w[:, :1].expand_as(w), rtol=0, atol=1e-15)
    assert not torch.allclose(w, torch.full_like(w, 1 / LK))  # still depends on the keys
    with torch.no_grad():
        a.attn.u_a.weight.zero_()
    kpm = torch.zeros(B, LK, dtype=torch.bool)
    kpm[1, 3:] = True
    _, w = a(q, k, key_padding_mask=kpm)
    torch.testing.assert_close(w[0], torch.full((LQ, LK), 1 / LK, dtype=w.dtype))
    torch.testing.assert_close(w[1, :, :3], torch.full((LQ, 3), 1 / 3, dtype=w.dtype))


def test_keys_are_projected_once_for_all_decoder_steps():
    a = make()
    q, k = inputs()
    calls = []
    a.attn.u_a.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape))
    ctx, w = a(q, k)
    assert len(calls) == 1  # once for all LQ queries
    calls.clear()
    state = None
    for t in range(LQ):
        c_t, w_t, state = a.step(q[:, t], k, state)
        torch.testing.assert_close(c_t, ctx[:, t], rtol=1e-13, atol=1e-14)
        torch.testing.assert_close(w_t, w[:, t], rtol=1e-13, atol=1e-14)
    assert len(calls) == 1 and state.length == LQ  # the projected keys rode in the state
    torch.testing.assert_close(state.keys, a.attn.u_a(k))
    # several queries per step (T > 1) work the same
    c2, w2, _ = a.step(q[:, 2:5], k, None)
    torch.testing.assert_close(c2, ctx[:, 2:5], rtol=1e-13, atol=1e-14)


def test_query_chunks_follow_the_byte_budget_and_change_nothing():
    q, k = inputs(requires_grad=True)
    big = make(chunk_bytes=1 << 30)
    rows_per_chunk = 2
    small = make(chunk_bytes=rows_per_chunk * B * LK * A * 8)  # float64: 8 bytes
    seen = []
    small.attn.v_a.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape))
    with torch.no_grad():
        small(q, k)
    assert [s[2] for s in seen] == [2, 2, 2]  # (B, 1, chunk, Lk, A): LQ = 6 queries in chunks of 2
    assert all(s[3:] == (LK, A) for s in seen)
    (c1, w1), (c2, w2) = big(q, k), small(q, k)
    torch.testing.assert_close(c1, c2, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(w1, w2, rtol=1e-13, atol=1e-14)
    out1, out2 = torch.cat([c1.flatten(), w1.flatten()]), torch.cat([c2.flatten(), w2.flatten()])
    for g1, g2 in zip(grads(out1, [q, k]), grads(out2, [q, k])):
        torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-13)


def test_no_batch_by_queries_by_keys_by_width_tensor_is_saved_for_backward():
    lq, lk, a_dim = 40, 50, 16
    a = fastattn.AlignmentAttention(DQ, DK, "additive", dtype=torch.float64, attention_dim=a_dim,
                                    chunk_bytes=4 * B * lk * a_dim * 8)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, lq, DQ, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, lk, DK, generator=g, dtype=torch.float64, requires_grad=True)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ctx, _ = a(q, k)
    assert max(sizes) < B * lq * lk * a_dim / 4
    ctx.sum().backward()
    assert torch.isfinite(q.grad).all()


def test_attention_dim_defaults_to_the_query_width_as_in_the_paper():
    a = fastattn.AlignmentAttention(DQ, DK, "additive")
    assert a.attn.w_a.weight.shape == (DQ, DQ) and a.attn.u_a.weight.shape == (DQ, DK)
    assert a.attn.w_a.bias is None  # the paper's equation has no bias
    assert a.attn.v_a.weight.shape == (1, DQ)
    with pytest.raises(ValueError, match="attention_dim"):
        fastattn.AlignmentAttention(DQ, DK, "additive", attention_dim=0)
    with pytest.raises(ValueError, match="chunk_bytes"):
        fastattn.AlignmentAttention(DQ, DK, "additive", chunk_bytes=0)


def test_peer_opennmt_mlp_attention():
    """``onmt.modules.GlobalAttention(attn_type="mlp")`` (OpenNMT-py 3.5.1, skipped when absent) is
    Bahdanau's score with a bias on ``W_a``: its weights, and its ``linear_out([c; h_t])`` rebuilt from our
    context."""
    peer_mod = onmt_global_attention()
    d = 5
    peer = peer_mod.GlobalAttention(d, attn_type="mlp").double()
    a = fastattn.AlignmentAttention(d, d, "additive", attention_dim=d, bias=True, dtype=torch.float64)
    with torch.no_grad():
        a.attn.w_a.weight.copy_(peer.linear_query.weight)
        a.attn.w_a.bias.copy_(peer.linear_query.bias)
        a.attn.u_a.weight.copy_(peer.linear_context.weight)
        a.attn.v_a.weight.copy_(peer.v.weight)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, LQ, d, generator=g, dtype=torch.float64)
    k = torch.randn(B, LK, d, generator=g, dtype=torch.float64)
    kpm = torch.zeros(B, LK, dtype=torch.bool)
    kpm[1, 5:] = True
    attn_h, w_peer = peer(q, k, src_len=(~kpm).sum(-1))
    ctx, w = a(q, k, key_padding_mask=kpm)
    torch.testing.assert_close(w, w_peer, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(peer.linear_out(torch.cat([ctx, q], -1)), attn_h, rtol=1e-12, atol=1e-13)
