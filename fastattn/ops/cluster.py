"""Clustering of a few vectors (heads, experts) into groups, deterministically.

:func:`kmeans` -- Lloyd's algorithm with farthest-point initialisation (the first point, then repeatedly
the point farthest from every chosen centre): no random draw, so the same points always give the same
groups, and a forward pass that groups its heads stays a function of its input. Runs without autograd:
callers recompute whatever differentiable statistic they need (group means) from the assignment.

:func:`cosine_distance` -- ``1 - cos(x, y)`` over the last dimension, 0 for parallel vectors, 2 for
opposite ones (a zero vector is at distance 1 from everything).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["cosine_distance", "group_means", "kmeans"]


@torch.no_grad()
def kmeans(points: Tensor, k: int, iters: int = 10) -> Tensor:
    """Assign each of ``points (N, F)`` to one of ``k`` groups (squared Euclidean distance): long ``(N,)``.
    A group that loses all its points keeps its centre; duplicates among the points may leave groups
    empty."""
    n = points.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] (the number of points), got {k}")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    x = points.detach().double()
    chosen = [0]
    dist = ((x - x[0]) ** 2).sum(-1)
    for _ in range(1, k):
        nxt = int(torch.argmax(dist))
        chosen.append(nxt)
        dist = torch.minimum(dist, ((x - x[nxt]) ** 2).sum(-1))
    centres = x[chosen].clone()
    assign = torch.cdist(x, centres).argmin(-1)
    for _ in range(iters):
        for j in range(k):
            members = assign == j
            if bool(members.any()):
                centres[j] = x[members].mean(0)
        new = torch.cdist(x, centres).argmin(-1)
        if torch.equal(new, assign):
            break
        assign = new
    return assign


def group_means(points: Tensor, assign: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The mean of each group's points ``(k, F)`` (differentiable in ``points``) and which groups are
    non-empty (bool ``(k,)``); an empty group's mean is 0."""
    one_hot = torch.nn.functional.one_hot(assign, k).to(points.dtype)  # (N, k)
    counts = one_hot.sum(0)
    return (one_hot.T @ points) / counts.clamp_min(1).unsqueeze(-1), counts > 0


def cosine_distance(x: Tensor, y: Tensor) -> Tensor:
    """``1 - cos(x, y)`` over the last dimension."""
    return 1.0 - torch.nn.functional.cosine_similarity(x, y, dim=-1, eps=1e-12)
