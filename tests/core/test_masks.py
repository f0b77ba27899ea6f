"""``Mask``: absolute positions (offsets, per-(batch, head) positions), segments, the 2-D grid, and the
refusal of fields an op cannot honour. Every predicate is checked against the literal definition
("key at position p is visible to the query at position t iff ..."), written here independently."""

from __future__ import annotations

import pytest
import torch

from fastattn.core.masks import MASK_FIELDS, Mask
from fastattn.ops.linear.engine import linear_attention
from fastattn.ops.sparse.engine import block_sparse_attention
from fastattn.ops.sparse.reference import pattern_reference
from fastattn.ops.sparse.patterns import Pattern, Window

CPU = torch.device("cpu")


def literal(qpos, kpos, causal, pad=None, qseg=None, kseg=None):
    """Bool (B, H, Lq, Lk) from explicit (B, H, L) positions, (B, L) padding/segments in original order
    (indexed by position - start, done by the caller)."""
    ok = torch.ones(qpos.shape[:-1] + (qpos.shape[-1], kpos.shape[-1]), dtype=torch.bool)
    if causal:
        ok = ok & (kpos[..., None, :] <= qpos[..., :, None])
    if pad is not None:
        ok = ok & ~pad[..., None, :]
    if qseg is not None:
        ok = ok & (qseg[..., :, None] == kseg[..., None, :])
    return ok


def full(allowed, shape):
    return torch.ones(shape, dtype=torch.bool) if allowed is None else allowed.expand(shape)


@pytest.mark.parametrize("lq,lk", [(7, 7), (3, 11), (11, 11), (1, 5)])
def test_default_alignment_is_bottom_right(lq, lk):
    m = Mask(lq, lk, causal=True)
    assert (m.q_start, m.k_start, m.offset) == (lk - lq, 0, lk - lq)
    want = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)
    assert torch.equal(full(m.allowed(CPU), (1, 1, lq, lk))[0, 0], want)
    assert m.used() == {"causal"}


def test_offsets_place_a_block_of_a_longer_sequence():
    # queries 20..24 against keys 18..26: the first query sees keys 18..20
    m = Mask(5, 9, causal=True, q_start=20, k_start=18)
    got = full(m.allowed(CPU), (1, 1, 5, 9))[0, 0]
    qpos, kpos = torch.arange(20, 25), torch.arange(18, 27)
    assert torch.equal(got, kpos[None, :] <= qpos[:, None])
    assert got[0].tolist() == [True] * 3 + [False] * 6
    # a key block wholly in the queries' future is empty, one wholly in the past needs no mask
    assert Mask(4, 4, causal=True, q_start=0, k_start=4).block_is_empty(0, 4, 0)
    assert Mask(4, 4, causal=True, q_start=8, k_start=0).allowed(CPU) is None
    assert Mask(4, 4, q_start=8, k_start=0).used() == {"offsets"}
    assert Mask(4, 4, q_start=3, k_start=3).used() == {"offsets"}  # absolute positions moved too


def _case(seed=0, b=2, h=3, lq=9, lk=13, q_start=4, k_start=0):
    g = torch.Generator().manual_seed(seed)
    pad = torch.rand(b, lk, generator=g) < 0.3
    qseg = torch.randint(0, 3, (b, lq), generator=g).sort(-1).values
    kseg = torch.randint(0, 3, (b, lk), generator=g).sort(-1).values
    return g, pad, qseg, kseg


@pytest.mark.parametrize("causal", [False, True])
def test_permuted_positions_follow_the_original_tokens(causal):
    """Content-sorted queries and keys (a permutation per batch and head) with their original positions:
    causality, padding and segments are those of the original tokens, i.e. the permuted mask is the
    original mask with rows and columns permuted."""
    b, h, lq, lk, q_start = 2, 3, 9, 13, 4
    g, pad, qseg, kseg = _case()
    base = Mask(lq, lk, key_padding=pad, causal=causal, q_segments=qseg, k_segments=kseg)
    want = full(base.allowed(CPU), (b, h, lq, lk))
    qperm = torch.stack([torch.randperm(lq, generator=g) for _ in range(b * h)]).view(b, h, lq)
    kperm = torch.stack([torch.randperm(lk, generator=g) for _ in range(b * h)]).view(b, h, lk)
    m = Mask(lq, lk, key_padding=pad, causal=causal, q_segments=qseg, k_segments=kseg,
             q_positions=qperm + q_start, k_positions=kperm)
    got = full(m.allowed(CPU), (b, h, lq, lk))
    permuted = want.gather(2, qperm[..., None].expand(-1, -1, -1, lk)).gather(3, kperm[:, :, None].expand(-1, -1, lq, -1))
    assert torch.equal(got, permuted)
    assert not m.block_is_empty(0, 1, lk - 1)  # slot ranges say nothing about explicit positions
    keep = m.key_keep(torch.float64)
    assert torch.equal(keep[..., 0], (~pad).double().gather(1, kperm.flatten(1)).view(b, h, lk))


@pytest.mark.parametrize("causal", [False, True])
def test_every_block_view_is_a_slice_of_the_whole(causal):
    b, h, lq, lk = 2, 3, 9, 13
    g, pad, qseg, kseg = _case(1)
    kpos = torch.stack([torch.randperm(lk, generator=g) for _ in range(b * h)]).view(b, h, lk) + 2
    bias = torch.randn(1, h, lq, lk, generator=g, dtype=torch.float64)
    for m in (
        Mask(lq, lk, key_padding=pad, causal=causal, q_start=30, k_start=25, q_segments=qseg, k_segments=kseg),
        Mask(lq, lk, key_padding=pad, causal=causal, k_start=2, k_positions=kpos, bias=bias),
    ):
        whole = full(m.allowed(CPU), (b, h, lq, lk))
        add = m.additive(torch.float64, CPU).expand(b, h, lq, lk)
        for q0, q1, k0, k1 in [(0, 4, 0, 5), (4, 9, 5, 13), (3, 8, 12, 13), (0, 9, 0, 13)]:
            blk = full(m.allowed(CPU, q0, q1, k0, k1), (b, h, q1 - q0, k1 - k0))
            assert torch.equal(blk, whole[:, :, q0:q1, k0:k1])
            assert torch.equal(m.additive(torch.float64, CPU, q0, q1, k0, k1).expand(b, h, q1 - q0, k1 - k0),
                               add[:, :, q0:q1, k0:k1])
            if m.block_is_empty(q0, q1, k0):
                assert not whole[:, :, q0:q1, k0:].any()


def test_segments_are_packed_sequences():
    lq = lk = 10
    seg = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2, 2]])
    m = Mask(lq, lk, causal=True, q_segments=seg, k_segments=seg)
    qpos = kpos = torch.arange(10).view(1, 1, -1)
    want = literal(qpos, kpos, True, qseg=seg[:, None], kseg=seg[:, None])
    assert torch.equal(full(m.allowed(CPU), (1, 1, 10, 10)), want)
    assert not want[0, 0, 3, :3].any() and want[0, 0, 6, 3:7].all()


def test_grid_coordinates_and_validation():
    m = Mask(12, 12, grid=(3, 4))
    r, c = m.coords(m.q_pos(CPU))
    assert r.flatten().tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert c.flatten().tolist() == [0, 1, 2, 3] * 3
    assert m.used() == frozenset() and m.allowed(CPU) is None  # the grid restricts nothing by itself
    with pytest.raises(ValueError, match="grid"):
        Mask(13, 13, grid=(3, 4))
    with pytest.raises(ValueError, match="grid"):
        Mask(4, 4, grid=(0, 4))
    with pytest.raises(ValueError, match="grid"):
        Mask(4, 4).coords(torch.arange(4))


def test_bad_fields_are_refused():
    with pytest.raises(ValueError, match="q_positions"):
        Mask(4, 4, q_positions=torch.arange(4))
    with pytest.raises(ValueError, match="k_positions"):
        Mask(4, 4, k_positions=torch.zeros(1, 1, 4))  # float positions
    with pytest.raises(ValueError, match="together"):
        Mask(4, 4, q_segments=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="k_segments"):
        Mask(4, 5, q_segments=torch.zeros(1, 4, dtype=torch.long), k_segments=torch.zeros(1, 4, dtype=torch.long))


def test_require_only_names_what_an_op_cannot_honour():
    seg = torch.zeros(1, 4, dtype=torch.long)
    m = Mask(4, 4, causal=True, k_start=3, q_segments=seg, k_segments=seg, k_positions=torch.zeros(1, 1, 4).long())
    assert m.used() == {"causal", "offsets", "segments", "k_positions"}
    m.require_only(*MASK_FIELDS, op="everything")
    with pytest.raises(ValueError, match=r"my op cannot honour Mask field\(s\): q_start/k_start .*k_positions, "
                                         r"q_segments/k_segments"):
        m.require_only("causal", op="my op")
    with pytest.raises(ValueError, match="unknown Mask field"):
        m.require_only("positions", op="my op")


@pytest.mark.parametrize("field", ["offsets", "q_positions", "segments"])
def test_linear_and_sparse_ops_refuse_positions_they_cannot_honour(field):
    n = 16
    q = torch.randn(1, 1, n, 8)
    kw = {
        "offsets": {"q_start": 100, "k_start": 100},
        "q_positions": {"q_positions": torch.arange(n).view(1, 1, n)},
        "segments": {"q_segments": torch.zeros(1, n, dtype=torch.long), "k_segments": torch.zeros(1, n, dtype=torch.long)},
    }[field]
    name = {"offsets": "q_start/k_start", "q_positions": "q_positions", "segments": "q_segments"}[field]
    m = Mask(n, n, causal=True, **kw)
    with pytest.raises(ValueError, match=f"linear attention cannot honour .*{name}"):
        linear_attention(q.exp(), q.exp(), q, m)
    pat = Pattern(4, (Window(1),))
    with pytest.raises(ValueError, match=f"block-sparse attention cannot honour .*{name}"):
        block_sparse_attention(q, q, q, m, 0.5, pat)
    with pytest.raises(ValueError, match=f"pattern reference cannot honour .*{name}"):
        pattern_reference(q, q, q, m, 0.5, pat)
