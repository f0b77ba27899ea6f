"""K-means over the tokens of every (batch, head) row: deterministic farthest-point initialisation,
Lloyd iterations, differentiable centroid means.

``x (B, H, L, E)``; ``weight (B|1, 1|H, L)`` (optional, 0 excludes a token -- e.g. padding -- from the
initialisation and from the means; it is still assigned). Assignments are computed without gradient
(they are discrete); :func:`centroid_means` then gives centroids differentiable in ``x``.

Initialisation: the first token with nonzero weight, then repeatedly the token farthest from every
centroid chosen so far (ties: the first). With ``C`` at least the number of distinct tokens every
distinct token becomes a centroid, so every cluster holds identical tokens only. ``O(C L E)`` per
initialisation and per iteration; memory ``O(L C)`` per (batch, head) row.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["centroid_means", "kmeans"]


def _sqdist(x: Tensor, c: Tensor) -> Tensor:
    """Squared distances ``(B, H, L, C)`` of tokens ``x (B, H, L, E)`` to centroids ``c (B, H, C, E)``."""
    return (x * x).sum(-1, keepdim=True) - 2 * torch.matmul(x, c.transpose(-1, -2)) + (c * c).sum(-1)[..., None, :]


def centroid_means(x: Tensor, assign: Tensor, n_clusters: int, weight: Tensor | None = None) -> Tensor:
    """The weighted mean ``(B, H, C, E)`` of the tokens of every cluster (differentiable in ``x``); a cluster
    without (weighted) members gets zeros."""
    B, H, L, E = x.shape
    w = torch.ones(B, H, L, dtype=x.dtype, device=x.device) if weight is None else weight.to(x.dtype).expand(B, H, L)
    sums = x.new_zeros(B, H, n_clusters, E).scatter_add(2, assign[..., None].expand(B, H, L, E), x * w[..., None])
    counts = x.new_zeros(B, H, n_clusters).scatter_add(2, assign, w)
    return sums / counts.clamp_min(torch.finfo(x.dtype).tiny)[..., None]


@torch.no_grad()
def kmeans(x: Tensor, n_clusters: int, iterations: int, weight: Tensor | None = None) -> Tensor:
    """Cluster ids ``(B, H, L)`` in ``[0, n_clusters)`` after farthest-point initialisation and
    ``iterations`` Lloyd steps (an empty cluster keeps its centroid; ties go to the lower id)."""
    if n_clusters < 1 or iterations < 0:
        raise ValueError(f"kmeans needs n_clusters >= 1 and iterations >= 0, got {n_clusters}, {iterations}")
    B, H, L, E = x.shape
    x = x.detach()
    w = torch.ones(B, H, L, dtype=x.dtype, device=x.device) if weight is None else weight.to(x.dtype).expand(B, H, L)
    live = w > 0
    c = min(n_clusters, L)
    first = live.to(torch.int8).argmax(-1)  # first live token (0 when none)
    cent = x.gather(2, first[..., None, None].expand(B, H, 1, E))
    dist = _sqdist(x, cent)[..., 0]
    for _ in range(1, c):
        far = dist.masked_fill(~live, -1.0).argmax(-1)
        new = x.gather(2, far[..., None, None].expand(B, H, 1, E))
        cent = torch.cat([cent, new], dim=2)
        dist = torch.minimum(dist, _sqdist(x, new)[..., 0])
    assign = _sqdist(x, cent).argmin(-1)
    for _ in range(iterations):
        counts = torch.zeros(B, H, c, dtype=x.dtype, device=x.device).scatter_add(2, assign, w)
        means = centroid_means(x, assign, c, w)
        cent = torch.where(counts[..., None] > 0, means, cent)
        assign = _sqdist(x, cent).argmin(-1)
    return assign
