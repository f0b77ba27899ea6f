"""Gaussian filtering on the permutohedral lattice (Adams, Baek & Davis, 2010, "Fast High-Dimensional
Filtering Using the Permutohedral Lattice"): for points with positions ``f_i in R^d`` and values
``v_i in R^C``, approximately::

    out_i = sum_j exp(-||f_i - f_j||^2 / 2) v_j          (every point against every point)

in ``O(N d (C + d))`` per lattice pass instead of ``O(N^2 (C + d))``. Three linear steps:

* **splat** -- each point lies in one simplex of the lattice ``A*_d`` (embedded in the hyperplane
  ``sum = 0`` of ``R^{d+1}``); its value is spread over the simplex's ``d + 1`` vertices with its
  barycentric weights (a scatter-add into a table of the occupied lattice points);
* **blur** -- the binomial kernel ``[1, 2, 1] / 4`` along each of the ``d + 1`` lattice directions
  ``d1 e_j - 1``, ``refine^2`` times per direction;
* **slice** -- each point reads the blurred table at its vertices with the same weights (a gather).

Scaling: the ``[1, 2, 1] / 4`` passes along all ``d + 1`` directions have covariance ``(d + 1)^2 / 2``
per axis of the hyperplane, and splat + slice add about ``(d + 1)^2 / 6`` (the constant of the
reference implementation, ``sqrt(2/3) (d + 1)`` at one pass); positions are therefore scaled by
``(d + 1) sqrt(refine^2 / 2 + 1 / 6)``. The lattice *refines* with ``refine``: the simplices shrink
relative to the Gaussian's width and the blur becomes a sum of ``refine^2`` binomial steps, so the
filter approaches exact Gaussian filtering (interpolation error and binomial-versus-Gaussian error
both vanish), at ``refine^2`` times the blur passes and more lattice points.

Blur support: the blur runs on the closure of the occupied points under the blur steps (every lattice
point a step can reach), so it is exactly the separable binomial blur of the infinite lattice, not the
reference implementation's blur restricted to the occupied points (which drops what passes through
empty points); it costs the lattice points of that shell.

Lattice points are hashed by packing their integer coordinates (and the batch index, so the images of
a batch never share a point) into one ``int64`` and found by ``searchsorted``. The barycentric weights
are piecewise linear in the positions, so autograd gives the exact gradient of the approximate filter
with respect to positions and values (the enclosing simplex is constant almost everywhere).

:func:`lattice_filter` is the efficient form; :func:`lattice_filter_dense` builds the same splat,
blur and slice as dense matrices (the reference). :func:`gaussian_filter_dense` is the exact filter
the lattice approximates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Lattice", "build_lattice", "gaussian_filter_dense", "lattice_filter", "lattice_filter_dense", "lattice_scale"]


def lattice_scale(dim: int, refine: int = 1) -> float:
    """The factor that positions are multiplied by before elevation (see the module docstring)."""
    return (dim + 1) * math.sqrt(refine * refine / 2.0 + 1.0 / 6.0)


def _elevation(dim: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``E (d, d + 1)``: rows an orthonormal basis of the hyperplane ``sum = 0`` (an isometry)."""
    e = torch.zeros(dim, dim + 1, dtype=dtype, device=device)
    for k in range(1, dim + 1):
        e[k - 1, :k] = 1.0
        e[k - 1, k] = -float(k)
        e[k - 1] /= math.sqrt(k * (k + 1))
    return e


def _enclosing_simplex(x: Tensor) -> tuple[Tensor, Tensor]:
    """For elevated points ``x (P, d + 1)`` (on the hyperplane, in lattice units): the integer
    coordinates of the ``d + 1`` vertices of the enclosing simplex ``(P, d + 1, d + 1)`` and their
    barycentric weights ``(P, d + 1)`` (differentiable in ``x``)."""
    d1 = x.shape[-1]
    dim = d1 - 1
    xd = x.detach()
    rem0 = torch.floor(xd / d1 + 0.5) * d1  # nearest remainder-0 point, coordinate-wise
    shift = torch.round(rem0.sum(-1, keepdim=True) / d1).long()  # (P, 1)
    delta = xd - rem0
    idx = torch.arange(d1, device=x.device)
    greater = delta[:, None, :] > delta[:, :, None]  # [p, i, j]: delta_j > delta_i
    tie = (delta[:, None, :] == delta[:, :, None]) & (idx[None, :] < idx[:, None])[None]
    rank = (greater | tie).sum(-1) + shift  # (P, d + 1)
    down = (shift > 0) & (rank >= d1)  # wrapped past the top: that coordinate goes one step down
    up = (shift < 0) & (rank < 0)
    rem0 = rem0 - d1 * down.to(rem0.dtype) + d1 * up.to(rem0.dtype)
    rank = rank - d1 * down.long() + d1 * up.long()
    v = (x - rem0) / d1  # differentiable
    bary = torch.zeros(x.shape[0], d1 + 1, dtype=x.dtype, device=x.device)
    bary = bary.scatter_add(1, dim - rank, v).scatter_add(1, dim + 1 - rank, -v)
    weights = torch.cat([bary[:, :1] + 1.0 + bary[:, -1:], bary[:, 1:d1]], dim=1)
    k = idx[:, None]  # vertex k (remainder k)
    r0 = rem0.long()[:, None, :]
    keys = r0 + k[None] - d1 * (rank[:, None, :] > dim - k[None]).long()  # (P, d + 1 vertices, d + 1)
    return keys, weights


def _directions(d1: int, device: torch.device) -> Tensor:
    """The ``d + 1`` lattice directions ``d1 e_j - 1`` as integer rows ``(d + 1, d + 1)``."""
    return d1 * torch.eye(d1, dtype=torch.long, device=device) - 1


@dataclass
class Lattice:
    """The occupied lattice of one set of positions, reusable for any values.

    ``vertex (B, N, d + 1)``: each point's vertices as indices into the ``M`` lattice points (``M`` for
    excluded points: a zero slot); ``weight (B, N, d + 1)``: barycentric weights (0 for excluded points);
    ``neighbours (passes, 2, M)``: per blur pass, the index of each point's ``-`` and ``+`` neighbour
    along that pass's direction (``M`` when outside the lattice); ``size``: ``M``."""

    vertex: Tensor
    weight: Tensor
    neighbours: Tensor
    size: int


def _pack(keys: Tensor, batch: Tensor, lo: Tensor, radix: Tensor) -> Tensor:
    """Integer lattice coordinates ``(P, d + 1)`` (the last one implied by ``sum = 0``) and batch
    indices ``(P,)`` as one int64 each."""
    out = batch.clone()
    for i in range(keys.shape[1] - 1):
        out = out * radix[i] + (keys[:, i] - lo[i])
    return out  # digits: batch, then coordinates 0 .. d - 1 (the last the least significant)


def build_lattice(positions: Tensor, keep: Tensor | None = None, refine: int = 1) -> Lattice:
    """The lattice of ``positions (B, N, d)`` (Gaussian of unit width), ``keep (B, N)`` bool marking the
    points that take part (None: all), ``refine >= 1`` (see the module docstring)."""
    if positions.dim() != 3:
        raise ValueError(f"positions must be (batch, points, dim), got shape {tuple(positions.shape)}")
    if refine < 1:
        raise ValueError(f"refine must be >= 1, got {refine}")
    b, n, dim = positions.shape
    d1, dev = dim + 1, positions.device
    x = (positions * lattice_scale(dim, refine)) @ _elevation(dim, positions.dtype, dev)
    keys, weight = _enclosing_simplex(x.reshape(b * n, d1))
    batch = torch.arange(b, device=dev).repeat_interleave(n)[:, None].expand(-1, d1).reshape(-1)
    keys = keys.reshape(-1, d1)
    live = torch.ones(b * n * d1, dtype=torch.bool, device=dev)
    if keep is not None:
        live = keep.reshape(-1)[:, None].expand(-1, d1).reshape(-1)
    passes = [j for j in range(d1) for _ in range(refine * refine)]
    # the blur moves a coordinate by at most 2 d per step-round (d along its own direction, 1 along each
    # other), a neighbour look-up by d more: codes of every point we touch stay inside the packing ranges
    reach = 2 * dim * refine * refine + dim
    if live.any():
        lo = keys[live].amin(0) - reach
        radix = keys[live].amax(0) + reach - lo + 1
    else:
        lo, radix = torch.zeros(d1, dtype=torch.long, device=dev), torch.ones(d1, dtype=torch.long, device=dev)
    if float(b) * math.prod(float(r) for r in radix[:-1].tolist()) >= 2.0 ** 62:
        raise ValueError(
            f"the lattice of these positions is too large to hash (dim {dim}, coordinate ranges "
            f"{radix.tolist()}): use fewer feature dimensions or smaller feature values"
        )
    # packing is linear inside the ranges: a lattice step is a fixed offset of the code
    stride = torch.ones(d1 - 1, dtype=torch.long, device=dev)
    for i in range(d1 - 3, -1, -1):
        stride[i] = stride[i + 1] * radix[i + 1]
    step = (_directions(d1, dev)[:, :-1] * stride).sum(1)  # (d + 1,): code offset of each direction
    codes = _pack(keys, batch, lo, radix)
    ids = torch.unique(codes[live])  # sorted
    for j in passes:  # the closure under the blur steps
        ids = torch.unique(torch.cat([ids, ids + step[j], ids - step[j]]))
    m = ids.numel()

    def find(code: Tensor) -> Tensor:
        if m == 0:
            return torch.full_like(code, m)
        at = torch.searchsorted(ids, code).clamp_max(m - 1)
        return torch.where(ids[at] == code, at, torch.full_like(at, m))

    vertex = torch.where(live, find(codes), torch.full_like(codes, m)).reshape(b, n, d1)
    weight = (weight.reshape(-1) * live.to(weight.dtype)).reshape(b, n, d1)
    nbrs = [torch.stack([find(ids - step[j]), find(ids + step[j])]) for j in passes]
    neighbours = torch.stack(nbrs) if nbrs else torch.zeros(0, 2, m, dtype=torch.long, device=dev)
    return Lattice(vertex, weight, neighbours, m)


def splat(lattice: Lattice, values: Tensor) -> Tensor:
    """``values (B, N, C)`` -> lattice table ``(M + 1, C)`` (the last row the zero slot, always 0)."""
    c = values.shape[-1]
    src = (lattice.weight[..., None] * values[:, :, None, :]).reshape(-1, c)
    table = values.new_zeros(lattice.size + 1, c).index_add(0, lattice.vertex.reshape(-1), src)
    return torch.cat([table[:-1], table.new_zeros(1, c)])


def blur(lattice: Lattice, table: Tensor) -> Tensor:
    """The binomial passes on a table ``(M + 1, C)`` (zero slot kept at 0)."""
    zero = table.new_zeros(1, table.shape[1])
    for minus, plus in lattice.neighbours:
        body = (table[minus] + 2.0 * table[:-1] + table[plus]) * 0.25
        table = torch.cat([body, zero])
    return table


def slice_(lattice: Lattice, table: Tensor) -> Tensor:
    """Lattice table ``(M + 1, C)`` -> ``(B, N, C)`` (excluded points read zeros)."""
    b, n, d1 = lattice.vertex.shape
    got = table[lattice.vertex.reshape(-1)].reshape(b, n, d1, -1)
    return (lattice.weight[..., None] * got).sum(2)


def lattice_filter(positions: Tensor, values: Tensor, keep: Tensor | None = None, refine: int = 1,
                   lattice: Lattice | None = None) -> Tensor:
    """Approximate Gaussian filtering ``out_i ~ sum_j exp(-||f_i - f_j||^2 / 2) v_j`` (up to one constant
    factor, which a normalised filter cancels) of ``values (B, N, C)`` at ``positions (B, N, d)``, within
    each batch element, among the points with ``keep`` True (the others neither give nor receive: their
    output is 0). ``O(N d (C + d) refine^2)`` time and memory plus the lattice points."""
    lat = build_lattice(positions, keep, refine) if lattice is None else lattice
    return slice_(lat, blur(lat, splat(lat, values)))


def _dense_matrices(lat: Lattice, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The splat matrix ``S (B, N, M)`` and the blur matrix ``(M, M)`` of a lattice."""
    b, n, d1 = lat.vertex.shape
    m = lat.size
    s = lat.weight.new_zeros(b * n, m + 1).scatter_add(1, lat.vertex.reshape(b * n, d1), lat.weight.reshape(b * n, d1))
    eye = torch.eye(m + 1, dtype=dtype, device=lat.weight.device)
    total = torch.eye(m, dtype=dtype, device=lat.weight.device)
    for minus, plus in lat.neighbours:
        step = (eye[minus][:, :m] + 2.0 * eye[:m, :m] + eye[plus][:, :m]) * 0.25  # row u reads u-, u, u+
        total = step @ total
    return s[:, :m].reshape(b, n, m), total


def lattice_filter_dense(positions: Tensor, values: Tensor, keep: Tensor | None = None, refine: int = 1) -> Tensor:
    """:func:`lattice_filter` as dense matrices, literally ``S B S^T v`` per batch element (the reference;
    ``O(N M + M^2)``)."""
    lat = build_lattice(positions, keep, refine)
    s, blur_matrix = _dense_matrices(lat, values.dtype)
    return s @ (blur_matrix @ (s.transpose(1, 2) @ values))


def gaussian_filter_dense(positions: Tensor, values: Tensor, keep: Tensor | None = None) -> Tensor:
    """The exact filter, ``out_i = sum_j exp(-||f_i - f_j||^2 / 2) v_j`` over the kept ``j`` (dense)."""
    k = torch.exp(-0.5 * torch.cdist(positions, positions).square())
    if keep is not None:
        k = k * (keep[:, :, None] & keep[:, None, :]).to(k.dtype)
    return k @ values
