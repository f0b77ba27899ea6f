"""Gather attention (``fastattn.ops.gather.index_attention``): values, log-sum-exp and every gradient
(queries, keys, values, the per-edge bias) against the dense reference (``index_mask`` + dense softmax)
at awkward sizes with grouped-query heads and rows with no edge; query groups; bounded memory;
partial results merged with the block-sparse engine's; bad input."""

from __future__ import annotations

import pytest
import torch

from fastattn.core.masks import Mask
from fastattn.ops.gather import index_attention, index_mask
from fastattn.ops.softmax.dense import dense_attention, dense_scores
from fastattn.ops.sparse import engine
from fastattn.ops.sparse.engine import block_sparse_attention
from fastattn.ops.sparse.patterns import Pattern, Window
from fastattn.ops.sparse.reference import masked_logsumexp
from helpers import LargestTensor, grads, qkv

B, H, HKV, LQ, LK, K = 2, 4, 2, 37, 61, 7


def _edges(b=B, h=H, lq=LQ, lk=LK, k=K, seed=0):
    """Distinct key indices per row (a random subset), some invalid, rows 3 and 20 of batch 1 with none;
    invalid slots hold arbitrary in-range indices, repeats of valid ones included."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(b, h, lq, lk, generator=g).argsort(-1)[..., :k]
    valid = torch.rand(b, h, lq, k, generator=g) > 0.3
    valid[1, :, [3, 20]] = False
    idx = torch.where(valid, idx, idx[..., :1])  # invalid entries repeat a row's first index
    return idx, valid


def _reference(q, k, v, idx, valid, scale, bias):
    """Dense softmax over the same edges, the bias scattered into a dense additive bias."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    if bias is None:
        bias = torch.zeros(idx.shape, dtype=q.dtype)
    allowed, dense = index_mask(idx, valid, k.shape[2], bias)
    dense = dense.masked_fill(~allowed, float("-inf"))
    mask = Mask(q.shape[2], k.shape[2])
    out = dense_attention(q, k, v, mask, scale, extra_bias=dense)  # rows with no edge: zeros
    return out, masked_logsumexp(dense_scores(q, k, mask, scale, extra_bias=dense))


def _loss(out, lse, seed=3):
    w = torch.randn(lse.shape, generator=torch.Generator().manual_seed(seed), dtype=lse.dtype)
    return torch.cat([out.flatten(), (torch.where(torch.isfinite(lse), lse, 0.0) * w).flatten()])


@pytest.mark.parametrize("hkv", [HKV, 1, H])
def test_gather_values_lse_and_all_gradients_equal_the_dense_reference(hkv):
    q, k, v = qkv(h=H, hkv=hkv, lq=LQ, lk=LK, requires_grad=True)
    idx, valid = _edges()
    bias = torch.randn(idx.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64, requires_grad=True)
    inputs = (q, k, v, bias)
    ref_out, ref_lse = _reference(q, k, v, idx, valid, 0.3, bias)
    assert torch.isinf(ref_lse[1, :, [3, 20]]).all() and torch.isfinite(ref_lse[0]).all()
    ref_grads = grads(_loss(ref_out, ref_lse), inputs)
    for group_bytes in (1, 1 << 40):  # one query row per group / one group
        out, lse = index_attention(q, k, v, idx, valid, 0.3, bias, return_lse=True, group_bytes=group_bytes)
        torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-12)
        assert (out[1, :, [3, 20]] == 0).all()
        for a, b in zip(grads(_loss(out, lse), inputs), ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        with torch.no_grad():
            torch.testing.assert_close(index_attention(q, k, v, idx, valid, 0.3, bias, group_bytes=group_bytes),
                                       ref_out, rtol=1e-10, atol=1e-12)


def test_gather_without_bias_and_one_key_per_query():
    q, k, v = qkv(b=1, h=1, hkv=1, lq=5, lk=9, requires_grad=True)
    idx = torch.tensor([8, 0, 3, 3, 1]).view(1, 1, 5, 1)
    out = index_attention(q, k, v, idx, torch.ones_like(idx, dtype=torch.bool), 0.5)
    torch.testing.assert_close(out, v[:, :, [8, 0, 3, 3, 1]])  # one key: its value, whatever the score
    dv = torch.autograd.grad(out.sum(), v)[0]
    assert dv[0, 0, 3].eq(2).all() and dv[0, 0, [0, 1, 8]].eq(1).all() and dv[0, 0, [2, 4, 5, 6, 7]].eq(0).all()


def test_gather_half_precision_accumulates_in_float32():
    q, k, v = qkv(lq=LQ, lk=LK, dtype=torch.float32)
    idx, valid = _edges()
    out = index_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), idx, valid, 0.3)
    ref, _ = _reference(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(), idx, valid, 0.3, None)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


def test_gather_working_set_is_one_group_and_nothing_but_inputs_is_saved():
    """No operation returns a tensor of every query's gathered keys (what plain autograd keeps); the
    backward saves the inputs, the output and the log-sum-exp only."""
    n, kk, e = 4096, 64, 16
    q, k, v = qkv(b=1, h=2, hkv=2, lq=n, e=e, ev=e, dtype=torch.float32, requires_grad=True)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, n, (1, 2, n, kk), generator=g)
    valid = torch.ones_like(idx, dtype=torch.bool)
    bias = torch.zeros(idx.shape, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        with LargestTensor() as fwd:
            out = index_attention(q, k, v, idx, valid, 0.25, bias)
    with LargestTensor() as bwd:
        out.backward(torch.ones_like(out))
    assert "index_add_" in {op.split(".")[0] for op in bwd.ops}  # the backward's operations were seen
    gathered = 2 * n * kk * e * 4  # every query's keys, float32
    group = engine.GROUP_BYTES["cpu"]
    assert gathered > 4 * group  # (so the check below can fail)
    assert max(fwd.bytes, bwd.bytes) <= max(2 * group, idx.numel() * 8), (fwd.bytes, bwd.bytes)
    assert sum(saved) <= 4 * q.numel() + bias.numel() + 2 * n  # q, k, v, out, bias, lse
    assert bias.grad is not None and k.grad is not None


def test_gather_partial_merges_with_a_block_sparse_partial():
    """Far edges through the gather and a window through the block engine, merged by log-sum-exp,
    equal dense attention over the union of both edge sets (values and gradients)."""
    L = 61
    q, k, v = qkv(h=2, hkv=2, lq=L, lk=L, requires_grad=True)
    t = torch.arange(L)
    idx = torch.stack([(t + 16) % L, (t + 29) % L], -1).expand(B, 2, L, 2)  # never within the window of 3
    valid = torch.ones_like(idx, dtype=torch.bool)
    a_out, a_lse = index_attention(q, k, v, idx, valid, 0.25, return_lse=True)
    b_out, b_lse = block_sparse_attention(q, k, v, Mask(L, L), 0.25, Pattern(8, (Window(3),)), return_lse=True)
    top = torch.maximum(a_lse, b_lse).detach()
    wa, wb = torch.exp(a_lse - top), torch.exp(b_lse - top)
    out = (wa[..., None] * a_out + wb[..., None] * b_out) / (wa + wb)[..., None]
    allowed = index_mask(idx, valid, L)[0] | ((t[:, None] - t[None, :]).abs() <= 3)
    ref = torch.softmax((q @ k.transpose(-1, -2) * 0.25).masked_fill(~allowed, float("-inf")), -1) @ v
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for x, y in zip(grads(out, (q, k, v)), grads(ref, (q, k, v))):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def test_gather_rejects_bad_input():
    q, k, v = qkv(lq=LQ, lk=LK)
    idx, valid = _edges()
    with pytest.raises(ValueError, match="idx must be"):
        index_attention(q, k, v, idx[:, :, :5], valid[:, :, :5], 0.3)
    with pytest.raises(ValueError, match="integer"):
        index_attention(q, k, v, idx.double(), valid, 0.3)
    with pytest.raises(ValueError, match="valid must be a bool"):
        index_attention(q, k, v, idx, valid.long(), 0.3)
    with pytest.raises(ValueError, match="bias"):
        index_attention(q, k, v, idx, valid, 0.3, torch.zeros(1))
    with pytest.raises(ValueError, match="outside"):
        index_attention(q, k, v, idx.masked_fill(valid, LK), valid, 0.3)
    with pytest.raises(ValueError, match="multiple"):
        index_attention(q, k[:, :1].expand(-1, 3, -1, -1), v[:, :1].expand(-1, 3, -1, -1), idx, valid, 0.3)
    index_attention(q, k, v, idx.masked_fill(~valid, -5), valid, 0.3)  # invalid slots: any index
