"""compressive: the defining properties of the Compressive Transformer's attention (Rae et al. 2019, arXiv
1911.05507).

Without compressed memory it is Transformer-XL-style memory attention (a dense window over the n_m
positions before the segment and the segment, causally); the compressed memory extends the reach by
n_cm * c positions and no further; the attention-reconstruction loss is aux_loss (zero for the identity
f_c, training f_c only); memories travel through the step state (never module attributes), so step over
any chunks -- and a forward split into calls -- equals the forward over the whole input.
"""

from __future__ import annotations

import pytest
import torch

import fastattn

D, H, HKV = 24, 4, 2
OPTS = {"segment": 4, "memory": 4, "compressed_memory": 4, "compression": 2}


def _layer(seed=0, perturb=True, **options):
    torch.manual_seed(seed)
    layer = fastattn.MultiheadAttention(D, H, "compressive", num_kv_heads=HKV, batch_first=True,
                                        dtype=torch.float64, **{**OPTS, **options}).eval()
    if perturb:  # f_c away from mean pooling
        with torch.no_grad():
            w = layer.mechanism.compress_k.weight
            w.add_(0.3 * torch.randn(w.shape, generator=torch.Generator().manual_seed(seed), dtype=w.dtype))
    return layer


def _x(b=2, n=23, seed=1):
    return torch.randn(b, n, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _heads(lin, x, n):
    return lin(x).view(x.shape[0], x.shape[1], n, D // H).transpose(1, 2)


@pytest.mark.parametrize("memory", [0, 4, 8])
def test_without_compressed_memory_it_is_transformer_xl_memory_attention(memory):
    layer = _layer(compressed_memory=0, memory=memory)
    m = layer.mechanism
    x = _x()
    n, n_s = x.shape[1], OPTS["segment"]
    q = _heads(m.q_proj, x, H)
    k = _heads(m.k_proj, x, HKV).repeat_interleave(H // HKV, 1)
    v = _heads(m.v_proj, x, HKV).repeat_interleave(H // HKV, 1)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    window = (j <= i) & (j >= i // n_s * n_s - memory)
    scores = (q @ k.transpose(-1, -2)) * (D // H) ** -0.5
    expect = torch.softmax(scores.masked_fill(~window, float("-inf")), -1) @ v
    expect = m.out_proj(expect.transpose(1, 2).reshape(2, n, D))
    torch.testing.assert_close(layer(x, is_causal=True)[0], expect, rtol=1e-10, atol=1e-12)


def test_compressed_memory_reaches_back_n_cm_times_c_and_no_further():
    layer = _layer()
    x = _x(n=24)
    out = layer(x, is_causal=True)[0]
    # the last segment starts at 20: memory covers 16..19, compressed memory 4 slots of 2 -> 8..15
    for t, changes in ((7, False), (8, True), (15, True)):
        y = x.clone()
        y[:, t] += 3.0
        moved = not torch.allclose(layer(y, is_causal=True)[0][:, 20:], out[:, 20:], rtol=0, atol=1e-12)
        assert moved == changes, t


def test_aux_loss_is_the_reconstruction_loss_and_trains_f_c_only():
    x = _x()
    ident = _layer(compression=1, perturb=False).train()  # f_c = identity: nothing lost
    with torch.no_grad():
        ident.mechanism.compress_k.weight.copy_(torch.eye(D, dtype=torch.float64)[:, :, None])
    ident(x, is_causal=True)
    assert ident.aux_loss.item() == 0.0
    layer = _layer().train()
    out, _ = layer(x, is_causal=True)
    assert layer.aux_loss.item() > 0
    m = layer.mechanism
    grads = torch.autograd.grad(layer.aux_loss, [*m.parameters()], allow_unused=True)
    for (name, _), g in zip(m.named_parameters(), grads):
        trained = name.startswith("compress_k")
        assert (g is not None and g.abs().max() > 0) == trained, name
    # and the task output never reaches f_c (the compressed memory is stop-gradient)
    g = torch.autograd.grad(out.sum(), [m.compress_k.weight], allow_unused=True)[0]
    assert g is None or g.abs().max() == 0
    layer.eval()
    layer(x, is_causal=True)
    assert layer.aux_loss.item() == 0.0  # as the peer: computed in training mode only


def test_memories_travel_in_the_state_not_in_attributes():
    layer = _layer()
    x = _x(n=23)
    full, _ = layer(x, is_causal=True)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    attrs = set(vars(layer.mechanism))
    for sizes in ((23,), (1, 2, 3, 4, 5, 8), (6, 6, 6, 5), [1] * 23):
        state, outs = None, []
        for chunk in x.split(list(sizes), 1):
            o, state = layer.step(chunk, state)
            outs.append(o)
        torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-12)
        assert state.length == 23 and int(state.filled[0]) == 23 % OPTS["segment"]
    assert set(vars(layer.mechanism)) == attrs
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_padded_memories_are_excluded_and_left_padding_decodes_alone():
    layer = _layer()
    x = _x(n=15)
    kpm = torch.zeros(2, 15, dtype=torch.bool)
    kpm[1, :4] = True
    y = x.clone()
    y[1, :4] = 77.0
    out, state = layer.step(y, None, key_padding_mask=kpm)
    alone, _ = layer.step(x[1:, 4:], None)
    torch.testing.assert_close(out[1:, 4:], alone, rtol=1e-10, atol=1e-12)
    assert state.length == 15 and state.filled.tolist() == [15 % 4, 11 % 4]


def test_options_and_inputs_are_checked():
    for bad in ({"segment": 5, "compression": 2}, {"memory": 3, "compression": 2}, {"compression": 0}):
        with pytest.raises(ValueError):
            _layer(**bad)
    with pytest.raises(ValueError, match="is_causal=True"):
        _layer()(_x())
    with pytest.raises(ValueError, match="Lq <= Lk"):
        _layer()(_x(n=9), _x(n=5), _x(n=5), is_causal=True)


def test_matches_the_peer_self_attention_block():
    """compressive-transformer-pytorch 0.4.0's SelfAttention (no positions), weights copied, run segment by
    segment with its memories: the same outputs, and the same reconstruction loss (its mean over the
    segments that compress). Skipped when the peer is absent."""
    peer_mod = pytest.importorskip("compressive_transformer_pytorch.compressive_transformer_pytorch")
    n_s, c = 4, 2
    torch.manual_seed(0)
    peer = peer_mod.SelfAttention(D, seq_len=n_s, mem_len=n_s, cmem_len=4, cmem_ratio=c, heads=H).double()
    ours = fastattn.MultiheadAttention(D, H, "compressive", bias=False, batch_first=True, dtype=torch.float64,
                                       segment=n_s, memory=n_s, compressed_memory=4, compression=c)
    m = ours.mechanism
    with torch.no_grad():
        peer.to_out.bias.zero_()
        m.q_proj.weight.copy_(peer.to_q.weight)
        m.k_proj.weight.copy_(peer.to_kv.weight[:D])
        m.v_proj.weight.copy_(peer.to_kv.weight[D:])
        m.out_proj.weight.copy_(peer.to_out.weight)
        m.compress_k.weight.copy_(peer.compress_mem_fn.conv.weight)
        m.compress_k.bias.copy_(peer.compress_mem_fn.conv.bias)
    x = _x(n=20)
    peer.train(), ours.train()
    mems, outs, aux = None, [], []
    for seg in x.split(n_s, 1):
        out, mems, loss = peer(seg, memories=mems)
        outs.append(out)
        if loss.dim() == 0:  # this segment compressed (else the peer returns zeros(1))
            aux.append(loss)
    got, _ = ours(x, is_causal=True)
    torch.testing.assert_close(got, torch.cat(outs, 1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours.aux_loss, torch.stack(aux).mean(), rtol=1e-10, atol=1e-12)


def _literal_aux(m, x, kpm, n_s, n_m):
    """The reconstruction loss written segment by segment: after complete segment g (start s) the memories
    at [s - n_m, s - n_m + n_s) are evicted; mean over real queries, heads and channels of
    (attn(q, old) - attn(q, f_c(old)))^2, segments evicting no real memory left out."""
    keep = ~kpm
    total, count = 0.0, 0.0
    q_all = _heads(m.q_proj, x, H).detach()
    for s in range(0, x.shape[1] - n_s + 1, n_s):
        idx = torch.arange(s - n_m, s - n_m + n_s)
        ok = keep[:, idx.clamp(min=0)] & (idx >= 0)
        if not ok.any():
            continue
        old = x[:, idx.clamp(min=0)].detach()
        ck, cv, c_ok = m.compress(old, old, ok)
        q = q_all[:, :, s:s + n_s]
        outs = []
        for hk, hv, kok in ((old, old, ok), (ck, cv, c_ok)):
            k, v = (
                (h @ lin.weight.detach().T + lin.bias.detach()).view(2, -1, HKV, D // H).transpose(1, 2)
                .repeat_interleave(H // HKV, 1)
                for h, lin in ((hk, m.k_proj), (hv, m.v_proj))
            )  # projections detached: f_c is trained alone
            scores = (q @ k.transpose(-1, -2)) * (D // H) ** -0.5
            p = torch.softmax(scores.masked_fill(~kok[:, None, None], float("-inf")), -1).nan_to_num()
            outs.append(p @ v)
        w = keep[:, s:s + n_s].to(x.dtype)[:, None, :, None]
        total = total + ((outs[0] - outs[1]) ** 2 * w).sum()
        count = count + w.sum() * H * (D // H)
    return total / count


def test_aux_loss_at_awkward_size_equals_the_segment_by_segment_loss():
    """n = 61 (a partial last segment), GQA, left and right padding: aux_loss and its gradient to f_c."""
    layer = _layer(segment=6, memory=12, compressed_memory=4, compression=3).train()
    m = layer.mechanism
    x = _x(n=61)
    kpm = torch.zeros(2, 61, dtype=torch.bool)
    kpm[1, :14] = True
    kpm[0, 55:] = True
    layer(x, key_padding_mask=kpm, is_causal=True)
    expect = _literal_aux(m, x, kpm, 6, 12)
    torch.testing.assert_close(layer.aux_loss, expect, rtol=1e-10, atol=1e-12)
    params = [m.compress_k.weight, m.compress_k.bias]
    for a, b in zip(torch.autograd.grad(layer.aux_loss, params), torch.autograd.grad(expect, params)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
