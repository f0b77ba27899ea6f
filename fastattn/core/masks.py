"""Masks as small objects that say what they are, and the masked softmax every mechanism shares.

Conventions (one for the whole library):

* ``key_padding_mask`` is bool ``(B, Lk)``; **True marks a padding key** that must be ignored
  (as in ``torch.nn.MultiheadAttention``).
* A boolean ``attn_mask`` also uses **True = may not attend**; a float ``attn_mask`` is added to the
  scores. Both are turned into one additive ``bias`` here.
* Every query and key has an absolute position. By default causal masking is aligned bottom-right: with
  ``Lq`` queries and ``Lk`` keys, query ``i`` sits at position ``Lk - Lq + i`` and key ``j`` at ``j``, so
  query ``i`` sees keys ``0 .. Lk - Lq + i``. For ``Lq == Lk`` this is the usual lower triangle; for
  ``Lq < Lk`` it is what incremental decoding over a cache needs. ``q_start`` / ``k_start`` move the
  first query / key elsewhere (a block of a longer sequence: ring attention), ``q_positions`` /
  ``k_positions`` give every (batch, head) its own positions (content-sorted sequences).
* Per-token tensors (``key_padding``, ``q_segments``, ``k_segments``) describe the sequence in its
  original order: the entry of a token at absolute position ``p`` is at index ``p - start``. When the
  keys are permuted (sorted by content), padding and segments therefore follow the keys' original
  positions without the caller permuting them.
* Segments (packed sequences): a query attends only keys with its own segment id.
* ``grid=(height, width)``: positions are row-major pixels; :meth:`Mask.coords` gives their rows and
  columns. The grid restricts nothing by itself; it is the coordinate system of 2-D predicates.
* A query row whose keys are all masked returns zeros, never NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Mask", "MASK_FIELDS", "finite_or_zero", "masked_softmax", "safe_rowmax", "softmax_stats", "NEG_INF"]

NEG_INF = float("-inf")

#: What an op may declare it honours in :meth:`Mask.require_only` ("offsets" = ``q_start``/``k_start``
#: other than the defaults; "segments" = ``q_segments`` and ``k_segments``). ``grid`` restricts nothing
#: and is never refused.
MASK_FIELDS = ("key_padding", "causal", "bias", "offsets", "q_positions", "k_positions", "segments")


def _is_int(t: Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


@dataclass(frozen=True)
class Mask:
    """Everything that restricts which keys a query may see, for one call.

    Args:
        lq, lk: query and key lengths (slots).
        key_padding: bool ``(B, Lk)``, True = ignore that key.
        causal: a key is visible only at positions ``<=`` the query's.
        bias: float, broadcastable to ``(B, H, Lq, Lk)``, added to the scores (per slot).
        q_start: absolute position of query slot 0 (default ``k_start + Lk - Lq``: bottom-right).
        k_start: absolute position of key slot 0 (default 0).
        q_positions: long ``(B|1, H|1, Lq)``, absolute position of every query (overrides
            ``q_start + i``; ``q_start`` stays the base of the per-token tensors' indices).
        k_positions: long ``(B|1, H|1, Lk)``, likewise for keys.
        q_segments, k_segments: integer ``(B|1, Lq)`` / ``(B|1, Lk)`` segment ids (given together); a query
            sees only keys of its own segment.
        grid: ``(height, width)``; positions are row-major pixels (see :meth:`coords`).

    Example:
        >>> m = Mask(4, 6, causal=True, k_start=10)      # queries at 12..15, keys at 10..15
        >>> m.allowed(torch.device("cpu"))[0, 0, 0].tolist()
        [True, True, True, False, False, False]
    """

    lq: int
    lk: int
    key_padding: Tensor | None = None
    causal: bool = False
    bias: Tensor | None = None
    q_start: int = None  # type: ignore[assignment]  # resolved in __post_init__
    k_start: int = 0
    q_positions: Tensor | None = None
    k_positions: Tensor | None = None
    q_segments: Tensor | None = None
    k_segments: Tensor | None = None
    grid: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.q_start is None:
            object.__setattr__(self, "q_start", self.k_start + self.lk - self.lq)
        for name, pos, n in (("q_positions", self.q_positions, self.lq), ("k_positions", self.k_positions, self.lk)):
            if pos is not None and (pos.dim() != 3 or pos.shape[-1] != n or not _is_int(pos)):
                raise ValueError(
                    f"Mask.{name} must be an integer tensor (B|1, H|1, {n}), got {pos.dtype} {tuple(pos.shape)}"
                )
        if (self.q_segments is None) != (self.k_segments is None):
            raise ValueError("Mask.q_segments and Mask.k_segments must be given together")
        for name, seg, n in (("q_segments", self.q_segments, self.lq), ("k_segments", self.k_segments, self.lk)):
            if seg is not None and (seg.dim() != 2 or seg.shape[-1] != n or not _is_int(seg)):
                raise ValueError(
                    f"Mask.{name} must be an integer tensor (B|1, {n}), got {seg.dtype} {tuple(seg.shape)}"
                )
        if self.grid is not None:
            if len(self.grid) != 2 or any(int(g) < 1 for g in self.grid):
                raise ValueError(f"Mask.grid must be (height, width) >= 1, got {self.grid}")
            cells = self.grid[0] * self.grid[1]
            for name, start, n, pos in (
                ("query", self.q_start, self.lq, self.q_positions), ("key", self.k_start, self.lk, self.k_positions),
            ):
                if pos is None and (start < 0 or start + n > cells):
                    raise ValueError(
                        f"Mask.grid {tuple(self.grid)} has {cells} pixels; {name} positions "
                        f"{start}..{start + n - 1} do not fit"
                    )

    # ----- positions ---------------------------------------------------------------------------
    @property
    def offset(self) -> int:
        """Query 0's position relative to key 0 (``q_start - k_start``; ``Lk - Lq`` by default)."""
        return self.q_start - self.k_start

    @property
    def explicit_positions(self) -> bool:
        """True when per-(batch, head) positions are given (blocks can no longer be skipped by their
        slot ranges alone)."""
        return self.q_positions is not None or self.k_positions is not None

    def q_pos(self, device: torch.device, q0: int = 0, q1: int | None = None) -> Tensor:
        """Absolute positions of query slots ``[q0, q1)``: long ``(B|1, H|1, q1 - q0)``."""
        q1 = self.lq if q1 is None else q1
        if self.q_positions is not None:
            return self.q_positions[..., q0:q1].to(device)
        return (torch.arange(q0, q1, device=device) + self.q_start).view(1, 1, -1)

    def k_pos(self, device: torch.device, k0: int = 0, k1: int | None = None) -> Tensor:
        """Absolute positions of key slots ``[k0, k1)``: long ``(B|1, H|1, k1 - k0)``."""
        k1 = self.lk if k1 is None else k1
        if self.k_positions is not None:
            return self.k_positions[..., k0:k1].to(device)
        return (torch.arange(k0, k1, device=device) + self.k_start).view(1, 1, -1)

    def coords(self, pos: Tensor) -> tuple[Tensor, Tensor]:
        """``(row, column)`` of absolute positions on the ``grid`` (row-major pixels)."""
        if self.grid is None:
            raise ValueError("Mask.coords needs a grid=(height, width)")
        return torch.div(pos, self.grid[1], rounding_mode="floor"), pos % self.grid[1]

    def _per_token(self, t: Tensor, positions: Tensor | None, start: int, i0: int, i1: int) -> Tensor:
        """The entries ``(B, 1|H, i1 - i0)`` of the per-token tensor ``t (B, L)`` for slots ``[i0, i1)``,
        looked up by original position when positions are explicit."""
        if positions is None:
            return t[:, None, i0:i1]
        idx = positions[..., i0:i1].to(t.device) - start
        b = max(t.shape[0], idx.shape[0])
        idx = idx.expand(b, idx.shape[1], -1)
        return t[:, None, :].expand(b, idx.shape[1], t.shape[-1]).gather(-1, idx)

    def used(self) -> frozenset[str]:
        """The :data:`MASK_FIELDS` this mask sets (``grid`` restricts nothing and is not listed)."""
        on = {
            "key_padding": self.key_padding is not None,
            "causal": self.causal,
            "bias": self.bias is not None,
            "offsets": self.k_start != 0 or self.offset != self.lk - self.lq,
            "q_positions": self.q_positions is not None,
            "k_positions": self.k_positions is not None,
            "segments": self.q_segments is not None,
        }
        return frozenset(f for f, set_ in on.items() if set_)

    def require_only(self, *supported: str, op: str) -> None:
        """Raise a ``ValueError`` naming every field of this mask that ``op`` cannot honour, i.e. that is set
        and not among ``supported`` (names from :data:`MASK_FIELDS`)."""
        unknown = set(supported) - set(MASK_FIELDS)
        if unknown:
            raise ValueError(f"unknown Mask field(s) {sorted(unknown)}; known: {MASK_FIELDS}")
        names = {"offsets": f"q_start/k_start (query 0 at {self.q_start}, key 0 at {self.k_start})",
                 "segments": "q_segments/k_segments"}
        used = self.used()
        refused = [names.get(f, f) for f in MASK_FIELDS if f in used and f not in supported]
        if refused:
            raise ValueError(f"{op} cannot honour Mask field(s): {', '.join(refused)}")

    # ----- dense / blockwise views -------------------------------------------------------------
    def allowed(
        self, device: torch.device, q0: int = 0, q1: int | None = None, k0: int = 0, k1: int | None = None
    ) -> Tensor | None:
        """Bool ``(B|1, H|1, q1-q0, k1-k0)``, True where attending is allowed (causality, padding and
        segments; ``bias`` is separate). ``None`` when nothing is masked in this block."""
        q1 = self.lq if q1 is None else q1
        k1 = self.lk if k1 is None else k1
        out = None
        # without explicit positions, skip the causal mask when no key of the block is in any query's future
        if self.causal and (self.explicit_positions or k1 - 1 + self.k_start > q0 + self.q_start):
            out = self.k_pos(device, k0, k1)[..., None, :] <= self.q_pos(device, q0, q1)[..., :, None]
        if self.key_padding is not None:
            keep = ~self._per_token(self.key_padding, self.k_positions, self.k_start, k0, k1)[..., None, :]
            out = keep if out is None else out & keep
        if self.q_segments is not None and self.k_segments is not None:
            qs = self._per_token(self.q_segments, self.q_positions, self.q_start, q0, q1)
            ks = self._per_token(self.k_segments, self.k_positions, self.k_start, k0, k1)
            same = qs[..., :, None] == ks[..., None, :]
            out = same if out is None else out & same
        return out

    def additive(
        self, dtype: torch.dtype, device: torch.device,
        q0: int = 0, q1: int | None = None, k0: int = 0, k1: int | None = None,
    ) -> Tensor | None:
        """Float bias for the block (``-inf`` where masked, plus the user's ``bias``), or ``None``."""
        q1 = self.lq if q1 is None else q1
        k1 = self.lk if k1 is None else k1
        allowed = self.allowed(device, q0, q1, k0, k1)
        out = None
        if allowed is not None:
            out = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, NEG_INF)
        if self.bias is not None:
            b = self.bias  # broadcast dimensions (size 1) are kept whole, the others sliced
            b = b if b.dim() < 2 or b.shape[-2] == 1 else b[..., q0:q1, :]
            b = (b if b.shape[-1] == 1 else b[..., k0:k1]).to(dtype)
            out = b if out is None else out + b
        return out

    def block_is_empty(self, q0: int, q1: int, k0: int) -> bool:
        """True when causal masking hides every key from slot ``k0`` on from every query in ``[q0, q1)``
        (decided from the slot ranges; always False with explicit positions)."""
        return self.causal and not self.explicit_positions and k0 + self.k_start > q1 - 1 + self.q_start

    def key_keep(self, dtype: torch.dtype) -> Tensor | None:
        """``(B, 1|H, Lk, 1)`` with 1 for real keys and 0 for padding keys (for kernel mechanisms
        that remove padding by zeroing the keys' features)."""
        if self.key_padding is None:
            return None
        return (~self._per_token(self.key_padding, self.k_positions, self.k_start, 0, self.lk))[..., None].to(dtype)


def safe_rowmax(scores: Tensor, dim: int = -1) -> Tensor:
    """Max over ``dim`` (kept) with all-masked (``-inf``) rows replaced by 0, detached."""
    return finite_or_zero(scores.detach().amax(dim=dim, keepdim=True))


def finite_or_zero(x: Tensor) -> Tensor:
    """``x`` with its infinite entries replaced by 0."""
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def softmax_stats(scores: Tensor) -> tuple[Tensor, Tensor]:
    """Row max (see :func:`safe_rowmax`) and ``exp(scores - max)`` for a safe softmax."""
    m = safe_rowmax(scores)
    return m, torch.exp(scores - m)


def masked_softmax(scores: Tensor, bias: Tensor | None = None, dim: int = -1) -> Tensor:
    """Softmax over ``dim`` after adding ``bias`` (``-inf`` = masked). All-masked rows give zeros.

    Half-precision scores are computed in float32 and cast back.
    """
    orig = scores.dtype
    if orig in (torch.float16, torch.bfloat16):
        scores = scores.float()
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    if dim != -1:
        scores = scores.transpose(dim, -1)
    _, e = softmax_stats(scores)
    denom = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(denom > 0, denom, torch.ones_like(denom))
    if dim != -1:
        p = p.transpose(dim, -1)
    return p.to(orig)
