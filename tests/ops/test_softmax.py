"""The softmax ops: partials ``(out, lse)`` and their merge, flash as an op (whole and piece by piece, as
ring attention runs it), and the absolute-position mask fields honoured by flash and the dense reference.
Float64 throughout unless stated; the dense formula is the reference."""

from __future__ import annotations

import pytest
import torch

from fastattn.core.masks import Mask
from fastattn.ops.softmax.dense import dense_attention, dense_scores
from fastattn.ops.softmax.flash import flash_attention, flash_block_backward, flash_block_forward
from fastattn.ops.softmax.online import merge_partials, online_softmax
from helpers import qkv, rel_err

SCALE = 0.3


def _pad(b: int, lk: int, split: int) -> torch.Tensor:
    """Batch 0: trailing padding; batch 1: the whole first key block padded (its partial is dead)."""
    pad = torch.zeros(b, lk, dtype=torch.bool)
    pad[0, lk - 4:] = True
    pad[1, :split] = True
    return pad


def _finite(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def _dense_lse(q, k, mask):
    """``log sum exp`` of the dense scores; ``-inf`` (and no gradient) for rows with every key masked."""
    s = dense_scores(q, k, mask, SCALE)
    dead = torch.isneginf(s).all(dim=-1, keepdim=True)
    return torch.logsumexp(s.masked_fill(dead, 0.0), dim=-1).masked_fill(dead[..., 0], float("-inf"))


def _loss(out, lse, seed=3):
    g = torch.Generator().manual_seed(seed)
    w_o = torch.randn(out.shape, generator=g, dtype=out.dtype)
    w_l = torch.randn(lse.shape, generator=g, dtype=lse.dtype)
    return (out * w_o).sum() + (_finite(lse) * w_l).sum()


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("lq,lk,split", [(29, 29, 11), (13, 29, 11), (1, 17, 9)])
def test_two_key_blocks_merged_by_lse_equal_flash_over_both(causal, lq, lk, split):
    """The seam of sequence parallelism: keys in two blocks, the second placed by its absolute
    ``k_start``; the partials merged by their lse equal flash (and the dense formula) over all keys, on
    values, lse and the gradients of q, k, v through both outputs."""
    q, k, v = qkv(b=2, h=3, hkv=3, lq=lq, lk=lk, requires_grad=True)
    pad = _pad(2, lk, split)
    q_start = lk - lq
    parts = []
    for a, b in ((0, split), (split, lk)):
        m = Mask(lq, b - a, key_padding=pad[:, a:b], causal=causal, q_start=q_start, k_start=a)
        parts.append(flash_attention(q, k[:, :, a:b], v[:, :, a:b], m, SCALE, block_q=5, block_k=4, return_lse=True))
    out, lse = merge_partials(parts)

    whole = Mask(lq, lk, key_padding=pad, causal=causal)
    f_out, f_lse = flash_attention(q, k, v, whole, SCALE, block_q=5, block_k=4, return_lse=True)
    ref_out, ref_lse = dense_attention(q, k, v, whole, SCALE), _dense_lse(q, k, whole)

    dead = torch.isneginf(ref_lse)
    # batch 1, causal, queries before the second block: every key they may see is padding
    assert bool(dead[1].any()) == (causal and q_start < split) and not dead[0].any()
    assert torch.isneginf(parts[0][1][1]).all()  # the first block's partial is dead for batch 1
    if causal and lq == lk:
        assert torch.isneginf(parts[1][1][0, :, :split]).all()  # the second block is in those queries' future
    for o, l in ((out, lse), (f_out, f_lse)):
        assert torch.allclose(o, ref_out, atol=1e-12)
        assert torch.equal(torch.isneginf(l), dead)
        assert torch.allclose(_finite(l), _finite(ref_lse), atol=1e-12)
        assert not o[dead].any()

    want = torch.autograd.grad(_loss(ref_out, ref_lse), (q, k, v))
    for got in (torch.autograd.grad(_loss(out, lse), (q, k, v)), torch.autograd.grad(_loss(f_out, f_lse), (q, k, v))):
        for g, w in zip(got, want):
            assert torch.isfinite(g).all()
            assert torch.allclose(g, w, atol=1e-10), rel_err(g, w)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_flash_blockwise_forward_and_backward_as_ring_attention_runs_them(causal):
    """Keys in three pieces, each with its ``k_start``: forward piece by piece and merge, then backward
    piece by piece against the merged ``(out, lse)``: equal to autograd through the dense formula."""
    lq = lk = 23
    cuts = (0, 8, 15, 23)
    q, k, v = qkv(b=2, h=1, hkv=1, lq=lq, lk=lk, requires_grad=True)
    pad = _pad(2, lk, 8)
    masks = [Mask(lq, b - a, key_padding=pad[:, a:b], causal=causal, q_start=0, k_start=a)
             for a, b in zip(cuts, cuts[1:])]
    pieces = [(k[:, :, a:b].detach(), v[:, :, a:b].detach()) for a, b in zip(cuts, cuts[1:])]
    with torch.no_grad():
        out, lse = merge_partials(
            flash_block_forward(q, kp, vp, m, SCALE, block_q=6, block_k=5) for (kp, vp), m in zip(pieces, masks)
        )
    whole = Mask(lq, lk, key_padding=pad, causal=causal)
    ref_out, ref_lse = dense_attention(q, k, v, whole, SCALE), _dense_lse(q, k, whole)
    assert torch.allclose(out, ref_out, atol=1e-12)
    assert torch.allclose(_finite(lse), _finite(ref_lse), atol=1e-12)

    g = torch.Generator().manual_seed(5)
    d_out, d_lse = torch.randn(out.shape, generator=g, dtype=out.dtype), torch.randn(lse.shape, generator=g, dtype=lse.dtype)
    want = torch.autograd.grad((ref_out * d_out).sum() + (_finite(ref_lse) * d_lse).sum(), (q, k, v))
    delta = (d_out * out).sum(-1, keepdim=True) - d_lse.unsqueeze(-1)  # computed once for all pieces
    dq = torch.zeros_like(q)
    dks, dvs = [], []
    for (kp, vp), m in zip(pieces, masks):
        dq_i, dk_i, dv_i = flash_block_backward(q.detach(), kp, vp, out, lse, d_out, m, SCALE,
                                                block_q=6, block_k=5, delta=delta)
        dq += dq_i
        dks.append(dk_i)
        dvs.append(dv_i)
    for got, w in zip((dq, torch.cat(dks, 2), torch.cat(dvs, 2)), want):
        assert torch.allclose(got, w, atol=1e-10), rel_err(got, w)


def test_block_slots_and_absolute_offsets_agree():
    """One mask over the whole sequence addressed by slot offsets (q0, k0) gives the same partial as a
    mask of the block alone placed by q_start/k_start."""
    q, k, v = qkv(b=2, h=2, hkv=2, lq=19, lk=19)
    whole = Mask(19, 19, causal=True, key_padding=_pad(2, 19, 5))
    a = flash_block_forward(q[:, :, 7:], k[:, :, 4:15], v[:, :, 4:15], whole, SCALE, 7, 4, block_q=4, block_k=3)
    alone = Mask(12, 11, causal=True, key_padding=whole.key_padding[:, 4:15], q_start=7, k_start=4)
    b = flash_block_forward(q[:, :, 7:], k[:, :, 4:15], v[:, :, 4:15], alone, SCALE, block_q=4, block_k=3)
    assert torch.allclose(a[0], b[0], atol=1e-14) and torch.equal(torch.isneginf(a[1]), torch.isneginf(b[1]))
    assert torch.allclose(_finite(a[1]), _finite(b[1]), atol=1e-14)


def test_merge_partials_order_dead_rows_and_errors():
    g = torch.Generator().manual_seed(0)
    outs = [torch.randn(2, 1, 4, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    lses = [torch.randn(2, 1, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    for l in lses:
        l[0, 0, 1] = float("-inf")  # row 1 of batch 0: dead in every partial
    lses[1][1, 0, 2] = float("-inf")  # dead in one partial only
    lses = [l.requires_grad_(True) for l in lses]
    a_out, a_lse = merge_partials(zip(outs, lses))
    b_out, b_lse = merge_partials(list(zip(outs, lses))[::-1])
    assert torch.allclose(a_out, b_out, atol=1e-14) and torch.allclose(_finite(a_lse), _finite(b_lse), atol=1e-14)
    assert torch.isneginf(a_lse[0, 0, 1]) and not a_out[0, 0, 1].any()
    assert torch.isfinite(a_lse[1, 0, 2])
    w = torch.softmax(torch.stack([l.detach() for l in lses]), dim=0)[..., None]
    w = torch.where(torch.isnan(w), torch.zeros_like(w), w)
    assert torch.allclose(a_out, (w * torch.stack([o.detach() for o in outs])).sum(0), atol=1e-14)
    grads = torch.autograd.grad(_loss(a_out, a_lse), outs + lses)
    assert all(torch.isfinite(t).all() for t in grads)
    assert torch.autograd.gradcheck(
        lambda *t: merge_partials(zip(t[:3], t[3:])), [o.detach().requires_grad_() for o in outs]
        + [_finite(l.detach()).requires_grad_() for l in lses],
    )
    same = merge_partials([(outs[0], lses[0])])
    assert same[0] is outs[0] and same[1] is lses[0]
    with pytest.raises(ValueError, match="at least one"):
        merge_partials([])


def test_online_softmax_partial_is_the_dense_formula():
    q, k, v = qkv(b=2, h=2, hkv=2, lq=9, lk=14, requires_grad=True)
    m = Mask(9, 14, causal=True, key_padding=_pad(2, 14, 6))
    out, lse = online_softmax(q, k, v, m, SCALE, 0, 4)
    assert torch.allclose(out, dense_attention(q, k, v, m, SCALE), atol=1e-12)
    ref = _dense_lse(q, k, m)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref)) and torch.isneginf(ref).any()
    assert torch.allclose(_finite(lse), _finite(ref), atol=1e-12)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_flash_on_content_sorted_sequences_uses_original_positions(causal):
    """Queries and keys sorted per (batch, head) (as reformer/routing do), with their original positions:
    flash on the sorted sequence equals the unsorted result, sorted (values and gradients)."""
    b, h, n = 2, 3, 21
    q, k, v = qkv(b=b, h=h, hkv=h, lq=n, lk=n, requires_grad=True)
    pad = _pad(b, n, 5)
    g = torch.Generator().manual_seed(1)
    perm = torch.stack([torch.randperm(n, generator=g) for _ in range(b * h)]).view(b, h, n)
    take = lambda x: x.gather(2, perm[..., None].expand(-1, -1, -1, x.shape[-1]))  # noqa: E731
    ref = take(dense_attention(q, k, v, Mask(n, n, key_padding=pad, causal=causal), SCALE))
    m = Mask(n, n, key_padding=pad, causal=causal, q_positions=perm, k_positions=perm)
    got = flash_attention(take(q), take(k), take(v), m, SCALE, block_q=4, block_k=6)
    assert torch.allclose(got, ref, atol=1e-12)
    for gg, w in zip(torch.autograd.grad(_loss(got, got[..., 0]), (q, k, v)),
                     torch.autograd.grad(_loss(ref, ref[..., 0]), (q, k, v))):
        assert torch.allclose(gg, w, atol=1e-10)


def test_segments_attend_within_their_packed_sequence():
    """Three sequences packed in one row (causal, with a padded key): each equals its own attention."""
    lens = (5, 9, 4)
    n = sum(lens)
    q, k, v = qkv(b=1, h=2, hkv=2, lq=n, lk=n, requires_grad=True)
    seg = torch.repeat_interleave(torch.arange(3), torch.tensor(lens))[None]
    pad = torch.zeros(1, n, dtype=torch.bool)
    pad[0, 7] = True
    m = Mask(n, n, key_padding=pad, causal=True, q_segments=seg, k_segments=seg)
    out = flash_attention(q, k, v, m, SCALE, block_q=4, block_k=5)
    dense = dense_attention(q, k, v, m, SCALE)
    a = 0
    alone = []
    for ln in lens:
        sl = slice(a, a + ln)
        alone.append(dense_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl],
                                     Mask(ln, ln, key_padding=pad[:, sl], causal=True), SCALE))
        a += ln
    alone = torch.cat(alone, dim=2)
    assert torch.allclose(out, alone, atol=1e-12) and torch.allclose(dense, alone, atol=1e-12)
    for g1, g2 in zip(torch.autograd.grad(_loss(out, out[..., 0]), (q, k, v)),
                      torch.autograd.grad(_loss(alone, alone[..., 0]), (q, k, v))):
        assert torch.allclose(g1, g2, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flash_half_precision_accumulates_in_float32(dtype):
    q, k, v = qkv(b=1, h=2, hkv=2, lq=33, lk=33, dtype=torch.float64)
    m = Mask(33, 33, causal=True)
    out, lse = flash_attention(q.to(dtype), k.to(dtype), v.to(dtype), m, SCALE, block_q=8, block_k=8, return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    ref = dense_attention(q.to(dtype).double(), k.to(dtype).double(), v.to(dtype).double(), m, SCALE)
    assert rel_err(out, ref) < 1e-2


def test_flash_refuses_what_it_cannot_do():
    q, k, v = qkv(b=1, h=1, hkv=1, lq=4, lk=4)
    with pytest.raises(ValueError, match="block sizes"):
        flash_attention(q, k, v, Mask(4, 4), SCALE, block_q=0)
    bias = torch.zeros(4, 4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="does not differentiate"):
        flash_attention(q, k, v, Mask(4, 4, bias=bias), SCALE)
