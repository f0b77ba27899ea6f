"""structured (Lin et al. 2017, arXiv:1703.03130): the defining properties.

``A = softmax(W_s2 tanh(W_s1 H^T))`` (r rows over the n tokens), ``M = A H``, and the penalty
``||A A^T - I||_F^2`` as ``aux_loss``; called with ``query=None``.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastattn
from fastattn.mechanisms.classic.structured import hop_penalty
from helpers import alignment, grads

B, N, D, R, DA = 3, 8, 6, 4, 5


def make(seed: int = 0, **options):
    return alignment("structured", D, D, seed=seed, init_scale=0.8, **{"hops": R, "attention_dim": DA, **options})


def sentence(seed: int = 0, n: int = N, requires_grad: bool = False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, n, D, generator=g, dtype=torch.float64, requires_grad=requires_grad)


def padding(n: int = N) -> torch.Tensor:
    m = torch.zeros(B, n, dtype=torch.bool)
    m[1, 5:] = True
    m[2, 2:] = True
    return m


def test_equals_the_literal_formula_with_its_penalty():
    a = make(penalty=0.3)
    h = sentence(requires_grad=True)
    kpm = padding()
    m, w = a(None, h, key_padding_mask=kpm)
    energies = torch.tanh(h @ a.attn.w_s1.weight.T) @ a.attn.w_s2.weight.T  # (B, n, r)
    a_ref = torch.softmax(energies.transpose(1, 2).masked_fill(kpm[:, None], -math.inf), dim=-1)
    torch.testing.assert_close(w, a_ref, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(m, a_ref @ h, rtol=1e-12, atol=1e-13)
    eye = torch.eye(R, dtype=torch.float64)
    p_ref = 0.3 * torch.stack([torch.linalg.matrix_norm(x @ x.T - eye) ** 2 for x in a_ref]).mean()
    torch.testing.assert_close(a.aux_loss, p_ref, rtol=1e-12, atol=1e-13)
    params = list(a.parameters())
    for g1, g2 in zip(grads(torch.cat([m.flatten(), a.aux_loss[None]]), [h, *params]),
                      grads(torch.cat([(a_ref @ h).flatten(), p_ref[None]]), [h, *params])):
        torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n", [1, 3, N])
def test_r_rows_summing_to_one_over_the_real_tokens_for_every_length(n):
    a = make()
    h = sentence(n=n)
    kpm = padding(n)
    kpm[:, 0] = False
    m, w = a(None, h, key_padding_mask=kpm)
    assert m.shape == (B, R, D) and w.shape == (B, R, n)
    torch.testing.assert_close(w.sum(-1), torch.ones(B, R, dtype=w.dtype))
    assert (w[kpm[:, None].expand_as(w)] == 0).all()


def test_penalty_is_zero_for_orthogonal_rows_and_positive_for_shared_ones():
    one_hot = torch.eye(N, dtype=torch.float64)[[0, 3, 5, 6]][None]  # 4 hops on disjoint single tokens
    assert hop_penalty(one_hot).item() == 0.0
    same = torch.full((1, R, N), 1.0 / N, dtype=torch.float64)  # every hop the same uniform row
    # A A^T is all 1/N: the diagonal misses 1 by 1 - 1/N, the r^2 - r off-diagonal entries are 1/N
    assert hop_penalty(same).item() == pytest.approx(R * (1 - 1 / N) ** 2 + (R * R - R) / N**2)
    # through the layer: hops made to pick tokens 0..r-1 (sharp softmax) have (almost) no penalty
    a = fastattn.AlignmentAttention(N, N, "structured", hops=R, attention_dim=N, dtype=torch.float64)
    with torch.no_grad():
        a.attn.w_s1.weight.copy_(torch.eye(N, dtype=torch.float64))
        a.attn.w_s2.weight.copy_(60.0 * torch.eye(N, dtype=torch.float64)[:R])
    h = 20.0 * torch.eye(N, dtype=torch.float64).expand(B, -1, -1)
    _, w = a(None, h)
    torch.testing.assert_close(w, torch.eye(N, dtype=torch.float64)[:R].expand(B, -1, -1), rtol=0, atol=1e-20)
    assert a.aux_loss.item() < 1e-40
    # the same layer with every hop on token 0: penalty (r^2 - r) (the off-diagonal ones)
    with torch.no_grad():
        a.attn.w_s2.weight.copy_(60.0 * torch.eye(N, dtype=torch.float64)[[0] * R])
    a(None, h)
    assert a.aux_loss.item() == pytest.approx(R * R - R)


def test_the_penalty_trains_the_hops_apart():
    a = make()
    h = sentence()
    a(None, h)
    g1, g2 = torch.autograd.grad(a.aux_loss, [a.attn.w_s1.weight, a.attn.w_s2.weight])
    assert g1.abs().sum() > 0 and g2.abs().sum() > 0


def test_no_query_no_causal_no_step():
    a = make()
    h = sentence()
    with pytest.raises(ValueError, match="query=None"):
        a(h, h)
    with pytest.raises(ValueError, match="causal"):
        a(None, h, is_causal=True)
    with pytest.raises(ValueError, match="step"):
        a.step(h[:, 0], h)
    for bad in ({"hops": 0}, {"attention_dim": 0}, {"penalty": -1.0}):
        with pytest.raises(ValueError):
            fastattn.AlignmentAttention(D, D, "structured", **bad)
