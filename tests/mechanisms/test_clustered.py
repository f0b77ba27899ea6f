"""Clustered attention's defining properties: as many clusters as distinct queries is softmax attention
exactly; the error falls as the number of clusters grows; padded positions' queries move no centroid."""

from __future__ import annotations

import pytest
import torch

import fastattn
from fastattn.ops.clustering import kmeans
from helpers import grads


def _softmax(q, k, v, kpm=None):
    return fastattn.attention(q, k, v, "softmax", key_padding_mask=kpm)


def test_one_cluster_per_query_is_softmax_values_and_grads():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 29, d, generator=g, dtype=torch.float64, requires_grad=True) for d in (16, 16, 8))
    out = fastattn.attention(q, k, v, "clustered", clusters=29, iterations=5)
    ref = _softmax(q, k, v)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads(out, (q, k, v)), grads(ref, (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    more = fastattn.attention(q, k, v, "clustered", clusters=500)  # C > n: still one query per cluster
    torch.testing.assert_close(more, ref, rtol=1e-10, atol=1e-12)


def test_as_many_clusters_as_distinct_queries_is_softmax():
    g = torch.Generator().manual_seed(1)
    distinct = torch.randn(1, 2, 7, 16, generator=g, dtype=torch.float64)
    pick = torch.randint(0, 7, (40,), generator=g)
    pick[:7] = torch.arange(7)
    q = distinct[:, :, pick[torch.randperm(40, generator=g)]]  # 40 queries, 7 distinct, shuffled
    k, v = torch.randn(1, 2, 33, 16, generator=g, dtype=torch.float64), torch.randn(1, 2, 33, 8, generator=g, dtype=torch.float64)
    out = fastattn.attention(q, k, v, "clustered", clusters=7, iterations=4)
    torch.testing.assert_close(out, _softmax(q, k, v), rtol=1e-10, atol=1e-12)
    fewer = fastattn.attention(q, k, v, "clustered", clusters=6, iterations=4)
    assert not torch.allclose(fewer, _softmax(q, k, v))


def test_error_falls_as_clusters_grow():
    g = torch.Generator().manual_seed(2)
    n, e = 256, 16
    centers = torch.randn(16, e, generator=g, dtype=torch.float64)
    q = (centers[torch.randint(0, 16, (2, 2, n), generator=g)] + 0.3 * torch.randn(2, 2, n, e, generator=g, dtype=torch.float64))
    k, v = torch.randn(2, 2, n, e, generator=g, dtype=torch.float64), torch.randn(2, 2, n, 8, generator=g, dtype=torch.float64)
    ref = _softmax(q, k, v)
    errs = [((fastattn.attention(q, k, v, "clustered", clusters=c) - ref).norm() / ref.norm()).item()
            for c in (2, 8, 32, 128, 256)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-2] < 0.3 * errs[0] and errs[-1] < 1e-12  # n clusters: exact


def test_padded_queries_move_no_centroid():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 30, d, generator=g, dtype=torch.float64) for d in (16, 16, 8))
    kpm = torch.zeros(2, 30, dtype=torch.bool)
    kpm[1, 20:] = True
    out = fastattn.attention(q, k, v, "clustered", clusters=5, key_padding_mask=kpm)
    q2 = q.clone()
    q2[1, :, 20:] = 50 * torch.randn(2, 10, 16, generator=g, dtype=torch.float64)
    out2 = fastattn.attention(q2, k, v, "clustered", clusters=5, key_padding_mask=kpm)
    torch.testing.assert_close(out[:, :, :20], out2[:, :, :20])
    torch.testing.assert_close(out[0], out2[0])


def test_kmeans_ties_and_empty_clusters():
    x = torch.zeros(1, 1, 6, 4, dtype=torch.float64)  # one distinct point: every token in cluster 0
    assert kmeans(x, 3, 5).eq(0).all()
    with pytest.raises(ValueError, match="n_clusters"):
        kmeans(x, 0, 1)


def test_causal_is_refused():
    q = torch.randn(1, 2, 10, 16)
    with pytest.raises(ValueError, match="no causal form"):
        fastattn.attention(q, q, q, "clustered", is_causal=True)
