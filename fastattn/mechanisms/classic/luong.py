"""Luong attention (Luong, Pham and Manning, 2015, arXiv:1508.04025): "Effective Approaches to
Attention-based Neural Machine Translation", sections 3.1 (global) and 3.2 (local).

Scores of the decoder's top state ``h_t`` against each source state ``h̄_s`` (option ``score``)::

    dot      h_t^T h̄_s                      (needs query_dim == key_dim)
    general  h_t^T W_a h̄_s                  W_a (Dq x Dk)
    concat   v_a^T tanh(W_a [h_t; h̄_s])      W_a (A x (Dq + Dk)), v_a (A)

multiplied by ``scale`` (default 1: the paper has no ``1/sqrt(d)``; ``scale=None`` means 1 too).

``align="global"``: ``a_t(s) = softmax_s(score(h_t, h̄_s))`` over every real source state and
``c_t = sum_s a_t(s) h̄_s`` -- luong-dot global is exactly softmax attention with scale 1.

``align="local-p"`` (predictive alignment): an aligned position ``p_t = S sigmoid(v_p^T tanh(W_p h_t))``
with ``S`` each example's real source length (the count of non-padding keys), a window of the positions
``s`` with ``|s - p_t| <= D`` (clipped to the real source), and

    a_t(s) = align(h_t, h̄_s) exp(-(s - p_t)^2 / (2 sigma^2)),   sigma = D / 2,

``align`` the softmax of the scores over the window only. The Gaussian factor is not renormalised (as the
paper), so a local-p row sums to less than 1 (``normalized`` is False for it). Positions ``s`` are
0-based (``0 .. S-1``), ``p_t`` is in ``(0, S)``. The window's integer bounds carry no gradient; ``p_t``
(hence ``W_p``, ``v_p``) is trained through the Gaussian.

Efficient paths. ``prepare`` does the per-source work once (``W_a h̄_s`` for general, the key half of
``W_a`` for concat) and a decoder's :meth:`step` keeps it in its state. Global dot/general: one batched
matmul, ``O(Lq Lk d)``. Global concat: the ``(B, chunk, Lk, A)`` ``tanh`` is formed in query chunks of
at most ``chunk_bytes`` (:func:`fastattn.ops.chunked.perceptron_scores`, shared with ``additive``).
local-p: each query gathers only its ``2D + 1`` window keys (and values) and scores those, ``O(Lq D d)``
(``O(Lq D A)`` for concat); the ``(B, Lq, Lk)`` weights are still returned densely. The reference
scores every pair literally (a loop over ``(t, s)``) and applies the window as a mask.

``is_causal=True`` (self-attention use): query ``t`` sees keys ``0 .. Lk - Lq + t``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastattn.core.alignment import AlignmentMechanism
from fastattn.core.masks import Mask, masked_softmax
from fastattn.ops.chunked import perceptron_scores
from fastattn.registry import register

__all__ = ["Luong"]

SCORES = ("dot", "general", "concat")
ALIGNS = ("global", "local-p")


def _gather_rows(x: Tensor, idx: Tensor) -> Tensor:
    """``x (B, Lk, D)`` at ``idx (B, Lq, W)`` -> ``(B, Lq, W, D)``."""
    b, lq, w = idx.shape
    flat = idx.reshape(b, lq * w, 1).expand(-1, -1, x.shape[-1])
    return x.gather(1, flat).reshape(b, lq, w, x.shape[-1])


@register(
    "luong", complexity="O(Lq Lk d) global; O(Lq D d) local-p", causal=True, decoding=True, padding=True,
    weights=True, time_growth=2.0, memory_growth=2.0,
)
class Luong(AlignmentMechanism):
    """Luong's global and local-p attention with dot, general and concat scores (see the module docstring)."""

    test_options = {"score": "concat", "attention_dim": 5, "chunk_bytes": 4096}
    deviations = (
        "The 'location' score (a_t = softmax(W_a h_t), tied to a fixed source length) and local-m "
        "alignment are not offered; local-p and global are.",
        "The attentional output h~_t = tanh(W_c [c_t; h_t]) and input feeding belong to the caller's "
        "decoder; the layer returns the context c_t and the alignment weights.",
        "Source positions are 0-based (s = 0 .. S-1) and p_t = S sigmoid(.) lies in (0, S).",
    )

    @dataclass(frozen=True)
    class Options:
        score: str = "general"  # "dot" | "general" | "concat"
        align: str = "global"  # "global" | "local-p"
        window: int = 10  # D: the local-p window is [p_t - D, p_t + D], sigma = D / 2 (paper: D = 10)
        scale: float | None = None  # multiplies the scores; None: 1 (the paper has no 1/sqrt(d))
        attention_dim: int | None = None  # A of the concat score; None: query_dim
        position_dim: int | None = None  # width of W_p (local-p); None: query_dim
        chunk_bytes: int = 1 << 26  # memory of one query chunk's (B, chunk, Lk, A) tanh (concat, global)

        def __post_init__(self) -> None:
            if self.score not in SCORES:
                raise ValueError(f"score must be one of {SCORES}, got {self.score!r}")
            if self.align not in ALIGNS:
                raise ValueError(f"align must be one of {ALIGNS}, got {self.align!r}")
            if not isinstance(self.window, int) or self.window < 1:
                raise ValueError(f"window (D) must be a positive integer, got {self.window!r}")
            for name in ("attention_dim", "position_dim"):
                value = getattr(self, name)
                if value is not None and value < 1:
                    raise ValueError(f"{name} must be >= 1, got {value}")
            if self.chunk_bytes < 1:
                raise ValueError(f"chunk_bytes must be >= 1, got {self.chunk_bytes}")

    def __init__(self, options=None, *, query_dim: int, key_dim: int, value_dim: int) -> None:
        super().__init__(options, query_dim=query_dim, key_dim=key_dim, value_dim=value_dim)
        o = self.options
        self.normalized = o.align == "global"
        self.scale = 1.0 if o.scale is None else float(o.scale)
        if o.score == "dot" and query_dim != key_dim:
            raise ValueError(f"score='dot' needs query_dim == key_dim, got {query_dim} and {key_dim}; use 'general'")
        if o.score == "general":
            self.w_a = nn.Linear(key_dim, query_dim, bias=False)  # weight (Dq, Dk) = W_a
        elif o.score == "concat":
            a = query_dim if o.attention_dim is None else o.attention_dim
            self.w_a = nn.Linear(query_dim + key_dim, a, bias=False)
            self.v_a = nn.Linear(a, 1, bias=False)
        if o.align == "local-p":
            p = query_dim if o.position_dim is None else o.position_dim
            self.w_p = nn.Linear(query_dim, p, bias=False)
            self.v_p = nn.Linear(p, 1, bias=False)

    # ---- scores -------------------------------------------------------------------------------
    def prepare(self, keys: Tensor) -> Tensor:
        """Per source: the keys (dot), ``W_a h̄_s`` (general, ``(B, Lk, Dq)``) or the key half of the
        concat layer (``(B, Lk, A)``)."""
        if self.options.score == "general":
            return self.w_a(keys)
        if self.options.score == "concat":
            return keys @ self.w_a.weight[:, self.query_dim:].T
        return keys

    def _query_half(self, query: Tensor) -> Tensor:
        return query @ self.w_a.weight[:, :self.query_dim].T

    def scores(self, query: Tensor, prepared: Tensor) -> Tensor:
        if self.options.score == "concat":
            e = perceptron_scores(self._query_half(query), prepared, self.v_a, chunk_bytes=self.options.chunk_bytes)
        else:
            e = torch.matmul(query, prepared.transpose(1, 2))
        return e * self.scale if self.scale != 1.0 else e

    def reference_scores(self, query: Tensor, keys: Tensor) -> Tensor:
        score = self.options.score
        rows = []
        for t in range(query.shape[1]):
            h_t = query[:, t]
            row = []
            for s in range(keys.shape[1]):
                hs = keys[:, s]
                if score == "dot":
                    e = (h_t * hs).sum(-1)
                elif score == "general":
                    e = torch.einsum("bi,ij,bj->b", h_t, self.w_a.weight, hs)
                else:
                    e = torch.tanh(torch.cat([h_t, hs], dim=-1) @ self.w_a.weight.T) @ self.v_a.weight[0]
                row.append(e * self.scale)
            rows.append(torch.stack(row, dim=-1))
        return torch.stack(rows, dim=1)

    # ---- local-p ------------------------------------------------------------------------------
    @staticmethod
    def source_lengths(mask: Mask, batch: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """``S``: each example's count of real (non-padding) keys, ``(B, 1)``."""
        if mask.key_padding is None:
            return torch.full((batch, 1), float(mask.lk), dtype=dtype, device=device)
        return (~mask.key_padding).sum(-1, keepdim=True).to(dtype)

    def positions(self, query: Tensor, mask: Mask) -> Tensor:
        """The predicted aligned positions ``p_t = S sigmoid(v_p^T tanh(W_p h_t))``, ``(B, Lq)``."""
        s = self.source_lengths(mask, query.shape[0], query.dtype, query.device)
        return s * torch.sigmoid(self.v_p(torch.tanh(self.w_p(query)))[..., 0])

    def _gaussian(self, dist: Tensor) -> Tensor:
        sigma = self.options.window / 2.0
        return torch.exp(-dist.square() / (2.0 * sigma * sigma))

    def _local(self, query: Tensor, values: Tensor, mask: Mask, prepared: Tensor) -> tuple[Tensor, Tensor]:
        b, lq, lk = query.shape[0], query.shape[1], prepared.shape[1]
        d = self.options.window
        p = self.positions(query, mask)  # (B, Lq)
        offsets = torch.arange(2 * d + 1, device=query.device)
        idx = torch.ceil(p.detach() - d).long()[..., None] + offsets  # (B, Lq, 2D+1), covers |s - p| <= D
        dist = idx.to(p.dtype) - p[..., None]
        inside = (idx >= 0) & (idx < lk) & (dist.detach().abs() <= d)
        idx = idx.clamp(0, lk - 1)
        allowed = mask.allowed(query.device)  # (B|1, 1, Lq, Lk) or None
        if allowed is not None:
            inside = inside & allowed[:, 0].expand(b, lq, lk).gather(-1, idx)
        kg = _gather_rows(prepared, idx)  # (B, Lq, 2D+1, d|A)
        if self.options.score == "concat":
            e = self.v_a(torch.tanh(self._query_half(query)[:, :, None, :] + kg))[..., 0]
        else:
            e = (query[:, :, None, :] * kg).sum(-1)
        if self.scale != 1.0:
            e = e * self.scale
        zero = torch.zeros((), dtype=e.dtype, device=e.device)
        a = masked_softmax(e, torch.where(inside, zero, torch.full_like(zero, float("-inf"))))
        w = a * self._gaussian(dist)
        weights = torch.zeros(b, lq, lk, dtype=w.dtype, device=w.device).scatter_add(-1, idx, w)
        context = (w[..., None] * _gather_rows(values, idx)).sum(2)
        return context, weights

    # ---- calls --------------------------------------------------------------------------------
    def forward(
        self, query: Tensor, keys: Tensor, values: Tensor, mask: Mask, prepared: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        if self.options.align == "global":
            return super().forward(query, keys, values, mask, prepared)
        return self._local(query, values, mask, self.prepare(keys) if prepared is None else prepared)

    def reference(self, query: Tensor, keys: Tensor, values: Tensor, mask: Mask) -> tuple[Tensor, Tensor]:
        e = self.reference_scores(query, keys)
        if self.options.align == "global":
            return self.attend(e, values, mask)
        p = self.positions(query, mask)[..., None]  # (B, Lq, 1)
        s = torch.arange(keys.shape[1], device=keys.device, dtype=p.dtype)
        window = (s - p).detach().abs() <= self.options.window  # (B, Lq, Lk)
        allowed = mask.allowed(keys.device)
        if allowed is not None:
            window = window & allowed[:, 0]
        align = masked_softmax(e.masked_fill(~window, float("-inf")))
        weights = align * self._gaussian(s - p)
        return weights @ values, weights
