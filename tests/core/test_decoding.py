"""Decoding contract, parametrised over every mechanism with ``decoding=True``: a left-padded batch
decoded with ``step`` equals each row decoded alone; states count positions, reorder their batch
(beam search) and move between devices."""

from __future__ import annotations

import pytest
import torch

import fastattn
from fastattn.core.state import DecodingState
from helpers import E, HKV, H, ids, make_mech, sequence_specs

DECODING = [s for s in sequence_specs() if s.decoding]
PROMPT = 21
PROMPTS = (21, 13, 1)  # real prompt length of each row; the rest of the 21 positions is left padding
CHUNKS = (1, 1, 3, 1, 2)  # what is decoded after the prompt


def _inputs(n: int, b: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, e, generator=g, dtype=torch.float64) for h, e in ((H, E), (HKV, E), (HKV, 12)))


def _decode(mech, q, k, v, chunks, state=None, first_padding=None):
    """Step through ``chunks`` (lengths); the first chunk may carry a padding mask."""
    outs, t = [], 0
    for i, size in enumerate(chunks):
        kpm = first_padding if i == 0 else None
        o, state = mech.step(q[:, :, t:t + size], k[:, :, t:t + size], v[:, :, t:t + size], state, E ** -0.5, kpm)
        outs.append(o)
        t += size
    return torch.cat(outs, dim=2), state


def _left_padding(prompts=PROMPTS, width=PROMPT):
    return torch.tensor([[j < width - p for j in range(width)] for p in prompts])


def _case(spec):
    """The mechanism (float64), inputs for the prompt and ``CHUNKS``, and the prompt's left padding,
    with garbage in the padded slots (it must not matter)."""
    q, k, v = _inputs(PROMPT + sum(CHUNKS))
    pad = _left_padding()
    for x in (k, v):
        x[:, :, :PROMPT].masked_fill_(pad[:, None, :, None], 50.0)
    return make_mech(spec).double(), q, k, v, pad


@pytest.mark.parametrize("spec", DECODING, ids=ids(DECODING))
def test_left_padded_batch_equals_each_row_alone(spec):
    mech, q, k, v, pad = _case(spec)
    n = q.shape[2]
    with torch.no_grad():
        batched, state = _decode(mech, q, k, v, (PROMPT, *CHUNKS), first_padding=pad)
    assert isinstance(state, DecodingState) and state.length == n
    for i, p in enumerate(PROMPTS):
        s = PROMPT - p
        row = [x[i:i + 1, :, s:] for x in (q, k, v)]
        with torch.no_grad():
            alone, alone_state = _decode(mech, *row, (p, *CHUNKS))
        assert alone_state.length == n - s
        torch.testing.assert_close(batched[i:i + 1, :, s:], alone, rtol=1e-9, atol=1e-10)
        assert torch.isfinite(batched[i]).all()


@pytest.mark.parametrize("spec", DECODING, ids=ids(DECODING))
def test_state_select_reorders_the_batch(spec):
    mech, q, k, v, pad = _case(spec)
    n = q.shape[2]
    with torch.no_grad():
        _, prefix = mech.step(q[:, :, :PROMPT], k[:, :, :PROMPT], v[:, :, :PROMPT], None, E ** -0.5, pad)
        rest = [x[:, :, PROMPT:] for x in (q, k, v)]
        full, _ = _decode(mech, *rest, CHUNKS, state=prefix)
        index = torch.tensor([2, 0, 0])  # reorder and repeat, as a beam search does
        picked, picked_state = _decode(mech, *[x[index] for x in rest], CHUNKS, state=prefix.select(index))
        mask_pick, _ = _decode(mech, *[x[1:] for x in rest], CHUNKS, state=prefix.select(torch.tensor([False, True, True])))
    torch.testing.assert_close(picked, full[index], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(mask_pick, full[1:], rtol=1e-9, atol=1e-10)
    assert prefix.length == PROMPT and picked_state.length == n
    with pytest.raises(ValueError, match="out of range"):
        prefix.select(torch.tensor([3]))
    with pytest.raises(ValueError, match="integer"):
        prefix.select(torch.tensor([[0]]))


@pytest.mark.parametrize("spec", DECODING, ids=ids(DECODING))
def test_state_moves_between_devices(spec):
    mech = make_mech(spec).double()
    q, k, v = _inputs(5)
    with torch.no_grad():
        _, state = mech.step(q, k, v, None, E ** -0.5)
    moved = state.to("meta")
    tensors = [t for t in vars(moved).values() if isinstance(t, torch.Tensor)]
    assert tensors and all(t.device.type == "meta" for t in tensors)
    assert all(t.device.type == "cpu" for t in vars(state).values() if isinstance(t, torch.Tensor))
    assert moved.length == state.length == 5


@pytest.mark.parametrize("method", ["softmax", "linear", "lightning", "local", "sparse_transformer", "sac"])
def test_layer_step_with_left_padding(method):
    spec = fastattn.get_method(method)
    layer = fastattn.MultiheadAttention(32, 4, method, num_kv_heads=2, batch_first=True, **spec.cls.test_options)
    layer = layer.double().eval()
    x = torch.randn(2, PROMPT + 3, 32, dtype=torch.float64)
    pad = _left_padding((PROMPT, 6))
    with torch.no_grad():
        out, state = layer.step(x[:, :PROMPT], None, key_padding_mask=pad)
        nxt, state = layer.step(x[:, PROMPT:], state)
        alone, s1 = layer.step(x[1:, PROMPT - 6:PROMPT])
        alone_next, _ = layer.step(x[1:, PROMPT:], s1)
    torch.testing.assert_close(out[1:, PROMPT - 6:], alone)
    torch.testing.assert_close(nxt[1:], alone_next)
    assert state.length == PROMPT + 3


def test_step_padding_mask_is_checked():
    layer = fastattn.MultiheadAttention(16, 2, batch_first=True)
    x = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match=r"\(batch, new tokens\) = \(2, 5\)"):
        layer.step(x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        layer.step(x, key_padding_mask=torch.zeros(2, 5))
    with pytest.raises(TypeError, match="state"):
        layer.step(x, state=(torch.zeros(1), torch.zeros(1)))
