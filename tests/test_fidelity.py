"""Issue 17's fidelity defects: one test (or a few) per item, each failing on the code before its fix."""

from __future__ import annotations

import pytest
import torch

import fastattn
from helpers import make_mech, qkv, rel_err


def _spec(name):
    return fastattn.get_method(name)


# ---- item 1: jukebox with every length <= width, and its first decoding steps -----------------------
@pytest.mark.parametrize("causal", [False, True])
def test_jukebox_short_sequences_give_the_reference(causal):
    q = torch.randn(2, 4, 128, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = fastattn.attention(q, q, q, method="jukebox", is_causal=causal)
    mech = make_mech(_spec("jukebox"), h=4, hkv=4, width=128, kinds=("row", "column", "previous_row")).double()
    ref = mech.run(q, q, q, is_causal=causal, reference=True)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    # the previous_row heads (the last group) see nothing in the first row: zeros
    assert out[:, 3].abs().max() == 0


def test_jukebox_decoding_starts_and_equals_the_forward():
    torch.manual_seed(0)
    layer = fastattn.MultiheadAttention(64, 4, "jukebox", width=4, batch_first=True).double().eval()
    x = torch.randn(2, 11, 64, dtype=torch.float64)
    full, _ = layer(x, x, x, is_causal=True)
    state, outs = None, []
    for t in range(x.shape[1]):
        o, state = layer.step(x[:, t:t + 1], state)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-9, atol=1e-10)


def test_jukebox_test_options_cover_previous_row():
    assert "previous_row" in _spec("jukebox").cls.test_options["kinds"]
