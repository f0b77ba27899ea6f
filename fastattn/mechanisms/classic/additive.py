"""Additive (Bahdanau) attention (Bahdanau, Cho and Bengio, 2014, arXiv:1409.0473): "Neural Machine
Translation by Jointly Learning to Align and Translate", section 3.1 and appendix A.1.2.

The alignment model is a one-hidden-layer perceptron scoring decoder state ``s_i`` against annotation
``h_j``::

    e_ij = v_a^T tanh(W_a s_i + U_a h_j),   alpha_ij = softmax_j(e_ij),   c_i = sum_j alpha_ij h_j

(the paper feeds the previous decoder state ``s_{i-1}``; the caller passes whichever state it scores).
``W_a (Dq -> A)``, ``U_a (Dk -> A)``, ``v_a (A)``; the paper has ``W_a in R^{n x n}``, so ``A`` defaults
to the query width (``n = 1000`` there), and its equations carry no bias (``bias=True`` adds one to
``W_a``; a bias on ``v_a`` would cancel in the softmax). Values default to the keys (the paper's context
is a weighted sum of the annotations themselves); any ``values`` of the same length may be given.

Efficient path: ``U_a h_j`` does not depend on the query, so it is computed once per source
(:meth:`Additive.prepare`; a decoder's :meth:`~fastattn.AlignmentAttention.step` keeps it in its
state, as the paper suggests). The energies need ``tanh`` of a ``(B, Lq, Lk, A)`` broadcast sum, which
is evaluated in query chunks of at most ``chunk_bytes`` (recomputed in backward), so memory stays
``O(B Lk A)`` beyond the ``(B, Lq, Lk)`` weights. Time ``O(B Lq Lk A)``. The reference loops over the
pairs ``(i, j)`` and applies the formula to each.

``is_causal=True`` (self-attention use, decoder over its own states): query ``i`` sees keys
``0 .. Lk - Lq + i``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastattn.core.alignment import AlignmentMechanism
from fastattn.ops.chunked import perceptron_scores
from fastattn.registry import register

__all__ = ["Additive"]


@register(
    "additive", complexity="O(Lq Lk A)", causal=True, decoding=True, padding=True, weights=True,
    time_growth=2.0, memory_growth=2.0,
)
class Additive(AlignmentMechanism):
    """Bahdanau's additive alignment model (see the module docstring)."""

    test_options = {"attention_dim": 6, "chunk_bytes": 4096}

    @dataclass(frozen=True)
    class Options:
        attention_dim: int | None = None  # A, the perceptron's width; None: query_dim (the paper's n)
        bias: bool = False  # a bias in W_a (the paper's equations have none)
        chunk_bytes: int = 1 << 26  # memory of one query chunk's (B, chunk, Lk, A) tanh

        def __post_init__(self) -> None:
            if self.attention_dim is not None and self.attention_dim < 1:
                raise ValueError(f"attention_dim must be >= 1, got {self.attention_dim}")
            if self.chunk_bytes < 1:
                raise ValueError(f"chunk_bytes must be >= 1, got {self.chunk_bytes}")

    def __init__(self, options=None, *, query_dim: int, key_dim: int, value_dim: int) -> None:
        super().__init__(options, query_dim=query_dim, key_dim=key_dim, value_dim=value_dim)
        a = query_dim if self.options.attention_dim is None else self.options.attention_dim
        self.attention_dim = a
        self.w_a = nn.Linear(query_dim, a, bias=self.options.bias)
        self.u_a = nn.Linear(key_dim, a, bias=False)
        self.v_a = nn.Linear(a, 1, bias=False)

    def prepare(self, keys: Tensor) -> Tensor:
        """``U_a h_j`` for every key: ``(B, Lk, A)``."""
        return self.u_a(keys)

    def scores(self, query: Tensor, prepared: Tensor) -> Tensor:
        return perceptron_scores(self.w_a(query), prepared, self.v_a, chunk_bytes=self.options.chunk_bytes)

    def reference_scores(self, query: Tensor, keys: Tensor) -> Tensor:
        w, u, v = self.w_a.weight, self.u_a.weight, self.v_a.weight[0]
        b_a = self.w_a.bias
        rows = []
        for i in range(query.shape[1]):
            s_i = query[:, i]
            row = []
            for j in range(keys.shape[1]):
                pre = s_i @ w.T + keys[:, j] @ u.T
                if b_a is not None:
                    pre = pre + b_a
                row.append(torch.tanh(pre) @ v)  # e_ij, (B,)
            rows.append(torch.stack(row, dim=-1))
        return torch.stack(rows, dim=1)
