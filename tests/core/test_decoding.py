"""Decoding contract, parametrised over every mechanism with ``decoding=True``: a padded batch (left
padding of the prompts, and padding tokens among later ones) decoded with ``step`` equals each row
decoded alone, without its padding; states count positions, reorder their batch (beam search) and move
between devices."""

from __future__ import annotations

import pytest
import torch

import fastattn
from fastattn.core.state import DecodingState
from helpers import E, HKV, H, ids, make_mech, sequence_specs

DECODING = [s for s in sequence_specs() if s.decoding]
# decoding paths that the test options do not reach: (method, options)
VARIANTS = [("longformer", {"dilation": (1, 2, 1, 3)})]
PROMPT = 21
PROMPTS = (21, 13, 1)  # real prompt length of each row; the rest of the 21 positions is left padding
CHUNKS = (1, 1, 3, 1, 2)  # what is decoded after the prompt


def _inputs(n: int, b: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, e, generator=g, dtype=torch.float64) for h, e in ((H, E), (HKV, E), (HKV, 12)))


def _decode(mech, q, k, v, chunks, state=None, padding=None):
    """Step through ``chunks`` (lengths); ``padding`` ``(B, sum(chunks))`` marks padding tokens."""
    outs, t = [], 0
    for size in chunks:
        kpm = None if padding is None else padding[:, t:t + size]
        o, state = mech.step(q[:, :, t:t + size], k[:, :, t:t + size], v[:, :, t:t + size], state, E ** -0.5, kpm)
        outs.append(o)
        t += size
    return torch.cat(outs, dim=2), state


def _left_padding(prompts=PROMPTS, width=PROMPT):
    return torch.tensor([[j < width - p for j in range(width)] for p in prompts])


def _case(spec, **options):
    """The mechanism (float64), inputs for the prompt and ``CHUNKS``, and the padding: the prompts'
    left padding, one padding token inside the 3-token chunk (row 1) and a whole padded 1-token chunk
    (row 0). The padded slots hold garbage (it must not matter)."""
    q, k, v = _inputs(PROMPT + sum(CHUNKS))
    pad = torch.cat([_left_padding(), torch.zeros(3, sum(CHUNKS), dtype=torch.bool)], dim=1)
    pad[1, PROMPT + 3] = True
    pad[0, PROMPT + 5] = True
    for x in (k, v):
        x.masked_fill_(pad[:, None, :, None], 50.0)
    return make_mech(spec, **options).double(), q, k, v, pad


@pytest.mark.parametrize(
    "spec,options", [(s, {}) for s in DECODING] + [(fastattn.get_method(m), o) for m, o in VARIANTS],
    ids=ids(DECODING) + [f"{m}-{'-'.join(map(str, o.values()))}" for m, o in VARIANTS],
)
def test_padded_batch_equals_each_row_alone(spec, options):
    mech, q, k, v, pad = _case(spec, **options)
    n = q.shape[2]
    with torch.no_grad():
        batched, state = _decode(mech, q, k, v, (PROMPT, *CHUNKS), padding=pad)
    assert isinstance(state, DecodingState) and state.length == n
    bounds = torch.tensor([0, PROMPT, *CHUNKS]).cumsum(0)
    for i in range(3):
        real = ~pad[i]
        chunks = [int(real[a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:])]
        row = [x[i:i + 1, :, real] for x in (q, k, v)]
        with torch.no_grad():
            alone, alone_state = _decode(mech, *row, [c for c in chunks if c])
        assert alone_state.length == int(real.sum())
        torch.testing.assert_close(batched[i:i + 1, :, real], alone, rtol=1e-9, atol=1e-10)
        assert torch.isfinite(batched[i]).all()


@pytest.mark.parametrize("spec", DECODING, ids=ids(DECODING))
def test_state_select_reorders_the_batch(spec):
    mech, q, k, v, pad = _case(spec)
    n = q.shape[2]
    with torch.no_grad():
        _, prefix = mech.step(q[:, :, :PROMPT], k[:, :, :PROMPT], v[:, :, :PROMPT], None, E ** -0.5, pad[:, :PROMPT])
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
