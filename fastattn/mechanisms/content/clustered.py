"""Clustered attention, "Fast Transformers with Clustered Attention" (Vyas, Katharopoulos and Fleuret,
2020, arXiv:2007.04825).

The queries of every (batch, head) row are grouped into ``C`` clusters; each cluster's centroid ``Q_c``
(the mean of its queries) attends to all keys once, ``A^c = softmax(scale Q_c K^T)``, and every query
outputs its cluster's result, ``out_i = A^{c(i)} V``. Cost ``O(C n d)`` for the attention plus
``O(C n d)`` per k-means iteration, instead of ``O(n^2 d)``; memory ``O(n d + C n)`` at most (the
centroid attention runs in key tiles with a recomputing backward).

Clustering (a documented simplification): k-means on the queries themselves, with a deterministic
farthest-point initialisation and ``iterations`` Lloyd steps (:mod:`fastattn.ops.clustering`), where the
paper hashes queries with random hyperplanes and runs k-means in Hamming space. The defining property
holds either way: with as many clusters as distinct queries every cluster holds one distinct query and
the result is softmax attention exactly; the error falls as ``C`` grows. In self-attention with padding
the padded positions' queries join no centroid (they are still assigned one). No causal form (a centroid
mixes queries at different positions), as in the catalogue.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fastattn.core.base import Mechanism
from fastattn.core.masks import Mask
from fastattn.ops.clustering import centroid_means, kmeans
from fastattn.ops.softmax.dense import dense_attention
from fastattn.ops.softmax.flash import flash_attention
from fastattn.registry import register


@register(
    "clustered", complexity="O(C n d i)", causal=False, decoding=False, padding=True,
    time_growth=1.0, memory_growth=1.0,
)
class Clustered(Mechanism):
    """Softmax attention computed once per query cluster (centroid) and broadcast to its queries."""

    test_options = {"clusters": 12, "iterations": 3}
    discontinuous = True  # a query changes cluster under rounding: half-precision contract compares per-row medians
    deviations = (
        "Queries are clustered by k-means on the queries (farthest-point initialisation, deterministic), "
        "not by k-means in Hamming space over random-hyperplane hashes.",
    )

    @dataclass(frozen=True)
    class Options:
        clusters: int = 100  # C (the paper's experiments: 25-200)
        iterations: int = 10  # Lloyd iterations (the paper's default)
        block: int = 1024  # key tile of the centroid attention (a speed knob; does not change the result)

        def __post_init__(self) -> None:
            if self.clusters < 1 or self.block < 1 or self.iterations < 0:
                raise ValueError(
                    f"clustered: clusters and block must be >= 1 and iterations >= 0, got "
                    f"{self.clusters}, {self.block}, {self.iterations}"
                )

    @staticmethod
    def _query_weight(mask: Mask, lq: int) -> Tensor | None:
        """0 for the queries of padded positions in self-attention (``Lq == Lk``), else ``None``."""
        if mask.key_padding is None or lq != mask.lk:
            return None
        return (~mask.key_padding)[:, None, :]

    def clusters(self, q: Tensor, mask: Mask) -> tuple[Tensor, Tensor]:
        """Cluster ids ``(B, H, Lq)`` and centroids ``(B, H, C, E)`` (differentiable in ``q``)."""
        mask.require_only("key_padding", op="clustered attention")
        c = min(self.options.clusters, q.shape[2])
        weight = self._query_weight(mask, q.shape[2])
        assign = kmeans(q, c, self.options.iterations, weight)
        return assign, centroid_means(q, assign, c, weight)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, dropout_p: float = 0.0) -> Tensor:
        assign, cent = self.clusters(q, mask)
        cmask = Mask(cent.shape[2], k.shape[2], key_padding=mask.key_padding)
        a = flash_attention(cent, k, v, cmask, scale, block_q=cent.shape[2], block_k=self.options.block)
        return a.gather(2, assign[..., None].expand(*assign.shape, a.shape[-1]))

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
        assign, _ = self.clusters(q, mask)
        c = min(self.options.clusters, q.shape[2])
        member = torch.nn.functional.one_hot(assign, c).to(q.dtype)  # (B, H, Lq, C)
        weight = self._query_weight(mask, q.shape[2])
        wm = member if weight is None else member * weight[..., None].to(q.dtype)
        centroids = wm.transpose(-1, -2) @ q / wm.sum(2)[..., None].clamp_min(torch.finfo(q.dtype).tiny)
        cmask = Mask(c, k.shape[2], key_padding=mask.key_padding)
        return member @ dense_attention(centroids, k, v, cmask, scale)  # out_i = A^{c(i)} V
