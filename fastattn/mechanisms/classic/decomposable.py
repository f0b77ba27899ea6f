"""Decomposable attention (Parikh, Täckström, Das and Uszkoreit, 2016, arXiv:1606.01933): "A Decomposable
Attention Model for Natural Language Inference", section 3.1 (Attend).

Between two sentences ``a (l_a tokens)`` and ``b (l_b tokens)``::

    e_ij = F(a_i)^T F(b_j)                          F: a feed-forward net with ReLUs, applied per token
    β_i = Σ_j softmax_j(e_ij) b_j                   the part of b aligned to a_i (row softmax)
    α_j = Σ_i softmax_i(e_ij) a_i                   the part of a aligned to b_j (column softmax)

``F`` is evaluated ``l_a + l_b`` times, not ``l_a l_b`` -- the decomposition the paper is named for.

How it fits :class:`fastattn.AlignmentAttention`: the query is sentence ``a`` ``(B, l_a, Da)``, the keys
are sentence ``b`` ``(B, l_b, Db)`` (values default to ``b``); the call returns ``β`` ``(B, l_a, Dv)``
and the row-softmax weights ``(B, l_a, l_b)``, so the seq2seq contract holds unchanged. Both directions
from one score matrix: ``layer.attn.align(a, b, a_padding_mask, b_padding_mask)`` returns ``(β, α,
row_weights (B, l_a, l_b), column_weights (B, l_b, l_a))``, masking padding on both axes (``a``'s padding
matters for the column softmax). With a shared ``F`` (equal widths, the default then), ``α`` is also the
call with the roles swapped: ``layer(b, a, key_padding_mask=a_padding_mask)``.

``F`` is two ``Linear`` + ``ReLU`` layers of width ``hidden`` (paper: 200). The paper's two sentences
share one embedding width and one ``F``; when ``query_dim != key_dim`` each side gets its own ``F``
(``shared=False``).

Reduced scope: only the attend step is an attention mechanism, so only it is here. The compare step
``G([a_i; β_i])``, the aggregation by sums and the classifier ``H``, and the optional intra-sentence
attention (``F_intra`` with a distance bias) are the caller's model.

Efficient path: ``F(b_j)`` once per source (:meth:`prepare`), ``F(a_i)`` once per query, one batched
matmul: ``O(l_a l_b h + (l_a + l_b) d h)``. The reference evaluates ``F(a_i)^T F(b_j)`` pair by pair.
No causal form and no decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastattn.core.alignment import AlignmentMechanism
from fastattn.core.masks import Mask
from fastattn.registry import register

__all__ = ["Decomposable"]


def _feed_forward(d_in: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())


@register(
    "decomposable", complexity="O(la lb h + (la + lb) d h)", causal=False, decoding=False, padding=True,
    weights=True, time_growth=2.0, memory_growth=2.0,
)
class Decomposable(AlignmentMechanism):
    """Parikh et al.'s attend step (see the module docstring)."""

    test_options = {"hidden": 5}
    deviations = (
        "Only the attend step: compare (G), aggregate, the classifier (H) and the intra-sentence attention "
        "are left to the caller's model.",
        "Sentences of different widths get one F each (the paper has one F over one embedding width).",
    )

    @dataclass(frozen=True)
    class Options:
        hidden: int = 200  # width of F's two layers (paper: 200)
        shared: bool | None = None  # one F for both sentences; None: shared when query_dim == key_dim

        def __post_init__(self) -> None:
            if not isinstance(self.hidden, int) or self.hidden < 1:
                raise ValueError(f"hidden must be a positive integer, got {self.hidden!r}")

    def __init__(self, options=None, *, query_dim: int, key_dim: int, value_dim: int) -> None:
        super().__init__(options, query_dim=query_dim, key_dim=key_dim, value_dim=value_dim)
        shared = self.options.shared
        if shared is None:
            shared = query_dim == key_dim
        if shared and query_dim != key_dim:
            raise ValueError(f"shared=True needs query_dim == key_dim (one F for both sentences), got "
                             f"{query_dim} and {key_dim}")
        self.shared = shared
        self.f_a = _feed_forward(query_dim, self.options.hidden)
        self.f_b = self.f_a if shared else _feed_forward(key_dim, self.options.hidden)

    def prepare(self, keys: Tensor) -> Tensor:
        """``F(b_j)`` for every token of ``b``: ``(B, l_b, hidden)``."""
        return self.f_b(keys)

    def scores(self, query: Tensor, prepared: Tensor) -> Tensor:
        return torch.matmul(self.f_a(query), prepared.transpose(1, 2))

    def reference_scores(self, query: Tensor, keys: Tensor) -> Tensor:
        rows = []
        for i in range(query.shape[1]):
            rows.append(torch.stack([(self.f_a(query[:, i]) * self.f_b(keys[:, j])).sum(-1)
                                     for j in range(keys.shape[1])], dim=-1))
        return torch.stack(rows, dim=1)

    def align(
        self, a: Tensor, b: Tensor, a_padding_mask: Tensor | None = None, b_padding_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Both directions from one score matrix: ``(β (B, l_a, Db), α (B, l_b, Da), row_weights (B, l_a,
        l_b), column_weights (B, l_b, l_a))``; padding masks are bool, True = padding."""
        if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0]:
            raise ValueError(f"a and b must be (batch, length, width) with one batch, got {tuple(a.shape)} "
                             f"and {tuple(b.shape)}")
        if a.shape[-1] != self.query_dim or b.shape[-1] != self.key_dim:
            raise ValueError(f"a has {a.shape[-1]} features and b {b.shape[-1]}, the module was built for "
                             f"{self.query_dim} and {self.key_dim}")
        for name, m, x in (("a_padding_mask", a_padding_mask, a), ("b_padding_mask", b_padding_mask, b)):
            if m is not None and (not isinstance(m, Tensor) or m.dtype != torch.bool or m.shape != x.shape[:2]):
                raise ValueError(f"{name} must be a bool tensor of shape {tuple(x.shape[:2])} (True = padding)")
        e = self.scores(a, self.prepare(b))  # (B, l_a, l_b)
        la, lb = e.shape[1], e.shape[2]
        beta, rows = self.attend(e, b, Mask(lq=la, lk=lb, key_padding=b_padding_mask))
        alpha, cols = self.attend(e.transpose(1, 2), a, Mask(lq=lb, lk=la, key_padding=a_padding_mask))
        return beta, alpha, rows, cols
