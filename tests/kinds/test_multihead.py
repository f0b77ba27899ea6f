"""MultiheadAttention as a drop-in for torch.nn.MultiheadAttention."""

from __future__ import annotations

import pytest
import torch

import fastattn
from fastattn.core.layer import ProjectedAttention


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("method", ["softmax", "memory_efficient", "flash"])
def test_same_outputs_as_torch_multihead_attention(batch_first, method):
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(32, 4, batch_first=batch_first).double().eval()
    ours = fastattn.MultiheadAttention.from_torch(ref, method).eval()
    x = torch.randn(3, 19, 32, dtype=torch.float64)
    x = x if batch_first else x.transpose(0, 1)
    kpm = torch.zeros(3, 19, dtype=torch.bool)
    kpm[1, 12:] = True
    causal = torch.nn.Transformer.generate_square_subsequent_mask(19, dtype=torch.float64)
    a, wa = ref(x, x, x, key_padding_mask=kpm, attn_mask=torch.isneginf(causal), need_weights=True)
    b, wb = ours(x, x, x, key_padding_mask=kpm, is_causal=True, need_weights=True)
    torch.testing.assert_close(a, b)
    if method == "softmax":
        torch.testing.assert_close(wa, wb)
    else:
        assert wb is None  # these mechanisms never form the n x n matrix
    c, _ = ours(x, x, x, key_padding_mask=kpm, attn_mask=causal)  # float attn_mask, torch convention
    torch.testing.assert_close(a, c)


def test_bool_attn_mask_uses_torch_convention_true_is_masked():
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(16, 2, batch_first=True).eval()
    ours = fastattn.MultiheadAttention.from_torch(ref).eval()
    x = torch.randn(2, 7, 16)
    m = torch.rand(7, 7) > 0.6
    m.fill_diagonal_(False)
    torch.testing.assert_close(ref(x, x, x, attn_mask=m)[0], ours(x, attn_mask=m)[0])


def test_cross_attention_and_kdim_vdim():
    layer = fastattn.MultiheadAttention(32, 4, "flash", batch_first=True, kdim=12, vdim=20, num_kv_heads=1)
    q, k, v = torch.randn(2, 9, 32), torch.randn(2, 30, 12), torch.randn(2, 30, 20)
    out, w = layer(q, k, v)
    assert out.shape == (2, 9, 32) and w is None


def test_unbatched_input_like_torch():
    layer = fastattn.MultiheadAttention(16, 2).eval()
    x = torch.randn(5, 16)
    out, w = layer(x, need_weights=True)
    assert out.shape == (5, 16) and w.shape == (5, 5)
    torch.testing.assert_close(out, layer(x[:, None])[0][:, 0])


def test_dropout_is_applied_in_training_only():
    layer = fastattn.MultiheadAttention(16, 2, dropout=0.5, batch_first=True)
    x = torch.randn(2, 40, 16)
    torch.manual_seed(0)
    a = layer(x)[0]
    torch.manual_seed(1)
    b = layer(x)[0]
    assert not torch.allclose(a, b)
    layer.eval()
    torch.testing.assert_close(layer(x)[0], layer(x)[0])


def test_memory_efficient_dropout_matches_softmax_statistics():
    # Same dropout rate, same expectation: the mean over many draws approaches the no-dropout output.
    # The draws are a batch of identical inputs (dropout masks are independent across the batch).
    q = torch.randn(1, 1, 24, 8).expand(3000, 1, 24, 8)
    exact = fastattn.attention(q[:1], q[:1], q[:1])
    draws = fastattn.attention(q, q, q, "memory_efficient", dropout_p=0.3, key_chunk=5)
    assert (draws.mean(0, keepdim=True) - exact).abs().max() < 0.08
    assert (draws.std(0) > 0).all()


@pytest.mark.parametrize("method", [s.name for s in fastattn.methods() if s.kind == "sequence"])
def test_aux_loss_is_a_scalar_after_every_forward(method):
    """``layer.aux_loss`` is the mechanism's: a finite 0-d tensor on the input's device and dtype family
    after a forward, whether the mechanism defines a loss or not."""
    spec = fastattn.get_method(method)
    kw = {"generator": torch.Generator().manual_seed(0)} if spec.randomized else {}
    heads = getattr(spec.cls, "fixed_heads", None) or 4  # a layer with a fixed number of heads (mega: 1)
    layer = fastattn.MultiheadAttention(32, heads, method, batch_first=True, **spec.cls.test_options, **kw)
    layer(torch.randn(2, 9, 32), is_causal=layer.mechanism.requires_causal)  # a causal-only layer (intra)
    loss = layer.aux_loss
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and torch.isfinite(loss)
    assert loss.is_floating_point() and loss.device.type == "cpu"
    if spec.level == "sequence" and isinstance(layer.mechanism, ProjectedAttention):  # the core's loss
        assert loss is layer.attn.aux_loss
