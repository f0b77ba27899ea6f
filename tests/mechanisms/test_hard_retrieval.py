"""Hard retrieval's defining properties: in evaluation every output row is exactly the value row of the
best-scoring visible key; the straight-through gradient gives q and k softmax attention's gradients and
V only the retrieved rows'; in training the key is sampled, reproducibly, never a masked one, and the
mean over samples is softmax attention."""

from __future__ import annotations

import torch

import fastattn
from fastattn.registry import get_method
from helpers import grads


def _mech(seed=0, **options):
    spec = get_method("hard_retrieval")
    return spec.cls(spec.make_options(**{"chunk": 7, **options}), head_dim=16, num_heads=2,
                    generator=torch.Generator().manual_seed(seed)).double()


def _qkv(n=29, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 2, n, d, generator=g, dtype=torch.float64, requires_grad=requires_grad)
            for d in (16, 16, 8)]


def test_eval_retrieves_the_value_of_the_argmax_key():
    q, k, v = _qkv()
    kpm = torch.zeros(2, 29, dtype=torch.bool)
    kpm[1, 20:] = True
    mech = _mech().eval()
    for causal in (False, True):
        out = mech.run(q, k, v, key_padding_mask=kpm, is_causal=causal)
        s = q @ k.transpose(-1, -2)
        s = s.masked_fill(kpm[:, None, None, :], float("-inf"))
        if causal:
            s = s.masked_fill(torch.ones(29, 29, dtype=torch.bool).triu(1), float("-inf"))
        j = s.argmax(-1)
        assert torch.equal(out, v.gather(2, j[..., None].expand(-1, -1, -1, 8)))


def test_straight_through_gradients():
    q, k, v = _qkv(requires_grad=True)
    mech = _mech().eval()
    for causal in (False, True):
        out = mech.run(q, k, v, is_causal=causal)
        soft = fastattn.attention(q, k, v, "softmax", is_causal=causal)
        gq, gk, gv = grads(out, (q, k, v))
        sq, sk, _ = grads(soft, (q, k, v))
        torch.testing.assert_close(gq, sq)  # dL/dp = g V^T: q and k see softmax attention's gradient
        torch.testing.assert_close(gk, sk)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
        j = (q @ k.transpose(-1, -2) + (torch.ones(29, 29).triu(1) * -1e9 if causal else 0)).argmax(-1)
        expect = torch.zeros_like(v).scatter_add_(2, j[..., None].expand(-1, -1, -1, 8), w)
        torch.testing.assert_close(gv, expect)  # V: the retrieved rows only


def test_training_samples_reproducibly_and_fast_equals_reference():
    q, k, v = _qkv(seed=2)
    a, b = _mech(seed=3).train(), _mech(seed=3).train()
    fa, fb = a.run(q, k, v, is_causal=True), b.run(q, k, v, is_causal=True, reference=True)
    torch.testing.assert_close(fa, fb)
    assert not torch.equal(a.run(q, k, v, is_causal=True), fa)  # the next draw differs
    c = _mech(seed=9).train()
    c.load_state_dict(a.state_dict())
    torch.testing.assert_close(c.run(q, k, v), a.run(q, k, v))


def test_training_mean_is_softmax_attention_and_masked_keys_are_never_drawn():
    g = torch.Generator().manual_seed(4)
    q = 0.3 * torch.randn(1, 1, 6, 16, generator=g, dtype=torch.float64)
    k = torch.randn(1, 1, 9, 16, generator=g, dtype=torch.float64)
    v = torch.randn(1, 1, 9, 8, generator=g, dtype=torch.float64)
    kpm = torch.zeros(1, 9, dtype=torch.bool)
    kpm[0, 0] = kpm[0, 5] = True  # column 0 masked: the peer's epsilon could draw it
    spec = get_method("hard_retrieval")
    mech = spec.cls(spec.make_options(), head_dim=16, num_heads=1, generator=g).double().train()
    draws = torch.stack([mech.run(q, k, v, key_padding_mask=kpm) for _ in range(4000)])
    masked_rows = v[0, 0, kpm[0]]
    assert not any(torch.equal(d[0, 0, i], r) for d in draws[:200] for i in range(6) for r in masked_rows)
    soft = fastattn.attention(q, k, v, "softmax", key_padding_mask=kpm)
    err = (draws.mean(0) - soft).abs().max().item()
    assert err < 0.1, err  # Monte-Carlo: about 3 standard errors of 4000 draws
    assert (draws.std(0) > 0.1).any()  # genuinely random per call
