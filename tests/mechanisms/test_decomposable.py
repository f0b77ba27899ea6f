"""decomposable (Parikh et al. 2016, arXiv:1606.01933): the attend step's defining properties.

``e_ij = F(a_i)^T F(b_j)``; ``β_i`` from the row softmax over ``b``, ``α_j`` from the column softmax over
``a`` of the same matrix; ``F`` evaluated once per token.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastattn
from helpers import alignment, grads

B, LA, LB, D, H = 3, 5, 7, 4, 6


def make(seed: int = 0, da: int = D, db: int = D, **options):
    return alignment("decomposable", da, db, seed=seed, **{"hidden": H, **options})


def sentences(seed: int = 0, da: int = D, db: int = D, requires_grad: bool = False):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(B, LA, da, generator=g, dtype=torch.float64, requires_grad=requires_grad)
    b = torch.randn(B, LB, db, generator=g, dtype=torch.float64, requires_grad=requires_grad)
    return a, b


def paddings():
    pa = torch.zeros(B, LA, dtype=torch.bool)
    pb = torch.zeros(B, LB, dtype=torch.bool)
    pa[1, 3:] = True
    pb[1, 4:] = True
    pa[2, 1:] = True
    pb[2, 6:] = True
    return pa, pb


def test_both_directions_equal_the_paper_and_are_masked_on_both_axes():
    layer = make()
    a, b = sentences(requires_grad=True)
    pa, pb = paddings()
    beta, alpha, rows, cols = layer.attn.align(a, b, pa, pb)
    f = layer.attn.f_a
    e = f(a) @ f(b).transpose(1, 2)
    rows_ref = torch.softmax(e.masked_fill(pb[:, None, :], -math.inf), dim=2)
    cols_ref = torch.softmax(e.masked_fill(pa[:, :, None], -math.inf), dim=1).transpose(1, 2)
    torch.testing.assert_close(rows, rows_ref, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(cols, cols_ref, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(beta, rows_ref @ b, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(alpha, cols_ref @ a, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(rows.sum(-1), torch.ones(B, LA, dtype=rows.dtype))
    torch.testing.assert_close(cols.sum(-1), torch.ones(B, LB, dtype=cols.dtype))
    assert (rows[pb[:, None].expand_as(rows)] == 0).all() and (cols[pa[:, None].expand_as(cols)] == 0).all()
    out, ref = torch.cat([beta.flatten(), alpha.flatten()]), torch.cat([(rows_ref @ b).flatten(), (cols_ref @ a).flatten()])
    for g1, g2 in zip(grads(out, [a, b, *layer.parameters()]), grads(ref, [a, b, *layer.parameters()])):
        torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)
    # the façade's call is the row direction
    ctx, w = layer(a, b, key_padding_mask=pb)
    torch.testing.assert_close(ctx, beta, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(w, rows, rtol=1e-13, atol=1e-14)


def test_alpha_is_beta_with_the_sentences_swapped():
    layer = make()
    a, b = sentences()
    pa, pb = paddings()
    _, alpha, _, cols = layer.attn.align(a, b, pa, pb)
    swapped, w = layer(b, a, key_padding_mask=pa)
    torch.testing.assert_close(swapped, alpha, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(w, cols, rtol=1e-12, atol=1e-13)


def test_identity_f_makes_the_scores_a_dot_product():
    layer = fastattn.AlignmentAttention(D, D, "decomposable", hidden=D, dtype=torch.float64)
    with torch.no_grad():
        for lin in (layer.attn.f_a[0], layer.attn.f_a[2]):
            lin.weight.copy_(torch.eye(D, dtype=torch.float64))
            lin.bias.zero_()
    a, b = (x.abs() for x in sentences())  # ReLU is the identity on non-negative inputs
    _, w = layer(a, b)
    torch.testing.assert_close(w, torch.softmax(a @ b.transpose(1, 2), dim=-1), rtol=1e-13, atol=1e-14)


def test_f_is_evaluated_once_per_token_not_per_pair():
    layer = make(da=D, db=D + 1)
    assert not layer.attn.shared
    seen = []
    for f in (layer.attn.f_a, layer.attn.f_b):
        f.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[:-1].numel()))
    a, b = sentences(db=D + 1)
    layer.attn.align(a, b)
    assert sum(seen) == B * (LA + LB)


def test_options_and_refusals():
    with pytest.raises(ValueError, match="shared=True"):
        fastattn.AlignmentAttention(D, D + 1, "decomposable", shared=True)
    assert not make(shared=False).attn.shared and make().attn.shared
    layer = make()
    a, b = sentences()
    with pytest.raises(ValueError, match="causal"):
        layer(a, b, is_causal=True)
    with pytest.raises(ValueError, match="step"):
        layer.step(a[:, 0], b)
    with pytest.raises(ValueError, match="a_padding_mask"):
        layer.attn.align(a, b, a_padding_mask=torch.zeros(B, LA + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="features"):
        layer.attn.align(b[..., :-1], a)
    with pytest.raises(ValueError):
        fastattn.AlignmentAttention(D, D, "decomposable", hidden=0)
