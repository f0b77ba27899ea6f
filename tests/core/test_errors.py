"""Bad input gets a clear error naming the problem; nothing is silently ignored."""

from __future__ import annotations

import pytest
import torch

import fastattn
from helpers import L, qkv


def test_wrong_rank():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="query must be 4-D"):
        fastattn.attention(q[0], k, v)
    with pytest.raises(ValueError, match="value must be 4-D"):
        fastattn.attention(q, k, v[0])


def test_head_count_mismatch():
    q, k, v = qkv(h=4, hkv=3)
    with pytest.raises(ValueError, match="head mismatch: query has 4 heads"):
        fastattn.attention(q, k, v)


def test_feature_dimension_mismatch():
    q, _, _ = qkv(e=16)
    _, k, v = qkv(e=8)
    with pytest.raises(ValueError, match="feature dimension mismatch"):
        fastattn.attention(q, k, v)


def test_key_value_length_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="must share heads and length"):
        fastattn.attention(q, k, v[:, :, :-1])


def test_dtype_mismatch():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="dtype mismatch"):
        fastattn.attention(q.float(), k, v)


@pytest.mark.parametrize("method", ["softmax", "flash"])
def test_padding_mask_wrong_shape_or_dtype(method):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(batch, key_length\)"):
        fastattn.attention(q, k, v, method, key_padding_mask=torch.zeros(2, L + 1, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask must be a bool tensor"):
        fastattn.attention(q, k, v, method, key_padding_mask=torch.zeros(2, L))


def test_attn_mask_wrong_shape():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="does not broadcast"):
        fastattn.attention(q, k, v, attn_mask=torch.zeros(L, L + 2, dtype=torch.bool))


def test_unknown_method_lists_close_names():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="unknown attention method 'flsh'.*'flash'"):
        fastattn.attention(q, k, v, "flsh")
    with pytest.raises(ValueError, match="did you mean"):
        fastattn.MultiheadAttention(32, 4, "sofmax")


def test_unknown_option_lists_valid_ones():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['block'\] for method 'flash'; valid options: block_q, block_k"):
        fastattn.attention(q, k, v, "flash", block=64)
    with pytest.raises(ValueError, match="valid options: none"):
        fastattn.attention(q, k, v, "softmax", window=3)


def test_invalid_option_value():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="block sizes must be >= 1"):
        fastattn.attention(q, k, v, "flash", block_q=0)


def test_causal_needs_lq_le_lk():
    q, _, _ = qkv(lq=10)
    _, k, v = qkv(lq=5)
    with pytest.raises(ValueError, match="is_causal needs query length <= key length"):
        fastattn.attention(q, k, v, is_causal=True)


def test_dropout_unsupported_is_an_error():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="does not support attention dropout"):
        fastattn.attention(q, k, v, "flash", dropout_p=0.1)
    with pytest.raises(ValueError, match="no attention weights to drop out"):
        fastattn.MultiheadAttention(32, 4, "flash", dropout=0.1)


def test_generator_for_deterministic_method_is_an_error():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="draws no random numbers"):
        fastattn.attention(q, k, v, "softmax", generator=torch.Generator())


def test_layer_shape_errors():
    layer = fastattn.MultiheadAttention(32, 4, batch_first=True)
    with pytest.raises(ValueError, match="query has 16 features, the layer expects 32"):
        layer(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="must be a positive multiple"):
        fastattn.MultiheadAttention(30, 4)
    with pytest.raises(ValueError, match="must be a multiple of num_kv_heads"):
        fastattn.MultiheadAttention(32, 4, num_kv_heads=3)
    with pytest.raises(ValueError, match="3-D attn_mask must be"):
        layer(torch.randn(2, 5, 32), attn_mask=torch.zeros(3, 5, 5, dtype=torch.bool))


@pytest.mark.parametrize("method", ["softmax", "memory_efficient", "flash"])
def test_broadcast_float_attn_mask_per_key(method):
    # a (Lk,)-shaped bias broadcast over queries must survive the block slicing of chunked kernels
    q, k, v = qkv()
    bias = torch.randn(1, 1, 1, L, dtype=torch.float64)
    ref = fastattn.attention(q, k, v, "softmax", attn_mask=bias.expand(2, 4, L, L).clone())
    opts = {"block_q": 16, "block_k": 7} if method == "flash" else ({"query_chunk": 16, "key_chunk": 7} if method == "memory_efficient" else {})
    torch.testing.assert_close(fastattn.attention(q, k, v, method, attn_mask=bias, **opts), ref)
