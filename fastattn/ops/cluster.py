"""Clustering of a few vectors (heads, experts) into groups, deterministically: the token k-means of
:mod:`fastattn.ops.clustering` applied to one set of points.

:func:`kmeans` -- farthest-point initialisation (the first point, then repeatedly the point farthest from
every chosen centre) and Lloyd steps: no random draw, so the same points always give the same groups, and
a forward pass that groups its heads stays a function of its input. :func:`group_means` -- the groups'
means, differentiable in the points. :func:`cosine_distance` -- ``1 - cos(x, y)`` over the last dimension.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .clustering import centroid_means
from .clustering import kmeans as _kmeans

__all__ = ["cosine_distance", "group_means", "kmeans"]


def kmeans(points: Tensor, k: int, iters: int = 10) -> Tensor:
    """Assign each of ``points (N, F)`` to one of ``k`` groups (squared Euclidean distance): long ``(N,)``."""
    n = points.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] (the number of points), got {k}")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    return _kmeans(points.detach().double()[None, None], k, iters)[0, 0]


def group_means(points: Tensor, assign: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The mean of each group's points ``(k, F)`` (differentiable in ``points``) and which groups are
    non-empty (bool ``(k,)``); an empty group's mean is 0."""
    means = centroid_means(points[None, None], assign[None, None], k)[0, 0]
    return means, torch.bincount(assign, minlength=k) > 0


def cosine_distance(x: Tensor, y: Tensor) -> Tensor:
    """``1 - cos(x, y)`` over the last dimension."""
    return 1.0 - torch.nn.functional.cosine_similarity(x, y, dim=-1, eps=1e-12)
