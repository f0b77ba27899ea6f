"""Reformer's defining properties: one bucket and one chunk is full shared-QK softmax with the self-mask
rule; more hash rounds approach full attention on clustered inputs; rounds that coincide count once;
the rotations are reproducible buffers."""

from __future__ import annotations

import pytest
import torch

import fastattn
from fastattn.registry import get_method
from helpers import through_bytes


def _mech(seed=0, h=2, e=16, **options):
    spec = get_method("reformer")
    return spec.cls(spec.make_options(**options), head_dim=e, num_heads=h,
                    generator=torch.Generator().manual_seed(seed)).double()


def _shared_qk_softmax(q, v, causal):
    """Softmax attention with keys = normalised queries; the own position scores -5e4."""
    kn = q / q.norm(dim=-1, keepdim=True)
    s = q @ kn.transpose(-1, -2) * q.shape[-1] ** -0.5
    n = q.shape[2]
    s = s - 5e4 * torch.eye(n, dtype=s.dtype)
    if causal:
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n_hashes", [1, 3])
def test_one_bucket_one_chunk_is_shared_qk_softmax(causal, n_hashes):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 37, 16, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, 37, 8, generator=g, dtype=torch.float64)
    mech = _mech(n_buckets=1, bucket_size=64, n_hashes=n_hashes)
    out = mech.run(q, q, v, is_causal=causal)
    torch.testing.assert_close(out, _shared_qk_softmax(q, v, causal), rtol=1e-10, atol=1e-12)
    if causal:  # the first token has only itself: it attends to itself
        torch.testing.assert_close(out[:, :, 0], v[:, :, 0])
    else:  # otherwise never to itself
        assert not torch.allclose(out, torch.softmax(
            q @ (q / q.norm(dim=-1, keepdim=True)).transpose(-1, -2) / 4, -1) @ v)


def test_identical_rounds_count_once():
    g = torch.Generator().manual_seed(1)
    q, v = torch.randn(1, 2, 50, 16, generator=g, dtype=torch.float64), torch.randn(1, 2, 50, 8, generator=g, dtype=torch.float64)
    one = _mech(n_buckets=4, bucket_size=8, n_hashes=1)
    three = _mech(n_buckets=4, bucket_size=8, n_hashes=3)
    three.rotations.copy_(one.rotations.expand_as(three.rotations))
    for causal in (False, True):
        torch.testing.assert_close(three.run(q, q, v, is_causal=causal), one.run(q, q, v, is_causal=causal))
    nodedup = _mech(n_buckets=4, bucket_size=8, n_hashes=3, dedup=False)
    nodedup.rotations.copy_(three.rotations)
    torch.testing.assert_close(nodedup.run(q, q, v), one.run(q, q, v))  # identical rounds: same either way
    two = _mech(seed=5, n_buckets=4, bucket_size=8, n_hashes=2)
    a = two.run(q, q, v)
    two_nd = _mech(seed=5, n_buckets=4, bucket_size=8, n_hashes=2, dedup=False)
    assert not torch.allclose(a, two_nd.run(q, q, v))  # different rounds overlap: the correction matters


def test_more_rounds_approach_full_attention_on_clustered_inputs():
    g = torch.Generator().manual_seed(2)
    n, e = 256, 16
    centers = torch.randn(8, e, generator=g, dtype=torch.float64) * 3
    q = (centers[torch.randint(0, 8, (n,), generator=g)] + 0.3 * torch.randn(n, e, generator=g, dtype=torch.float64))
    q = q.expand(1, 2, n, e).contiguous()
    v = torch.randn(1, 2, n, 8, generator=g, dtype=torch.float64)
    full = _shared_qk_softmax(q, v, False)

    def err(n_hashes):
        errs = [(_mech(seed=s, n_buckets=8, bucket_size=16, n_hashes=n_hashes).run(q, q, v) - full).norm() / full.norm()
                for s in range(4)]
        return sum(errs) / len(errs)

    e1, e2, e8 = err(1), err(2), err(8)
    assert e8 < e2 < e1


def test_rotations_are_reproducible_and_saved():
    a, b, c = _mech(seed=3), _mech(seed=3), _mech(seed=4)
    torch.testing.assert_close(a.rotations, b.rotations)
    assert not torch.equal(a.rotations, c.rotations)
    assert "rotations" in a.state_dict()
    c.load_state_dict(through_bytes(a.state_dict()))
    q = torch.randn(1, 2, 40, 16, dtype=torch.float64)
    for x, y in zip(a.buckets(q, q), c.buckets(q, q)):
        torch.testing.assert_close(x, y)
    out = fastattn.attention(q, q, q, "reformer", generator=torch.Generator().manual_seed(3), n_buckets=4, bucket_size=8)
    again = fastattn.attention(q, q, q, "reformer", generator=torch.Generator().manual_seed(3), n_buckets=4, bucket_size=8)
    torch.testing.assert_close(out, again)


def test_keys_outside_the_selection_do_not_matter():
    """Changing a key the query's selection excludes (in every round) leaves the query's output unchanged."""
    from fastattn.core.masks import Mask
    from fastattn.ops.bucketed import selection_mask

    g = torch.Generator().manual_seed(6)
    q = torch.randn(1, 2, 40, 16, generator=g, dtype=torch.float64)
    v = torch.randn(1, 2, 40, 8, generator=g, dtype=torch.float64)
    mech = _mech(n_buckets=4, bucket_size=4, n_hashes=2)
    for causal in (False, True):
        hq, hk = mech.buckets(q, q / q.norm(dim=-1, keepdim=True))
        seen = selection_mask(hq, hk, 4, Mask(40, 40, causal=causal), chunk=4).any(0)  # (B, H, Lq, Lk)
        i = 30
        unseen = ~seen[0, 0, i]
        assert unseen.any()
        v2 = v.clone()
        v2[0, 0, unseen] += 10.0
        a, b = mech.run(q, q, v, is_causal=causal), mech.run(q, q, v2, is_causal=causal)
        torch.testing.assert_close(a[0, 0, i], b[0, 0, i])
        assert not torch.allclose(a[0, 0], b[0, 0])


def test_bad_options():
    with pytest.raises(ValueError, match="bucket_size"):
        _mech(bucket_size=0)
