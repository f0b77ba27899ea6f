"""Structured self-attention (Lin, Feng, Santos, Yu, Xiang, Zhou and Bengio, 2017, arXiv:1703.03130): "A
Structured Self-attentive Sentence Embedding", sections 2.1 and 2.2.

``r`` learned attention hops over one sequence ``H (n x 2u)`` (the keys)::

    A = softmax(W_s2 tanh(W_s1 H^T))      A (r x n), softmax over the n tokens of each row
    M = A H                               M (r x 2u): the values (default: H) weighted by each hop
    P = ||A A^T - I||_F^2                  the penalty pushing the hops apart (aux_loss)

``W_s1 (d_a x 2u)``, ``W_s2 (r x d_a)``, no biases (as the paper); paper defaults ``d_a = 350``, ``r = 30``.
There is no query: :class:`fastattn.AlignmentAttention` is called with ``query=None`` and returns ``M``
``(B, r, Dv)`` and ``A`` ``(B, r, n)``; padding tokens get weight 0 and rows sum to 1 over the real
tokens. ``aux_loss`` is ``penalty`` (the paper's coefficient, 1.0 by default) times ``P`` averaged over the
batch, set by every call (the layer convention: ``loss = task + a.aux_loss``).

Efficient path: two batched matmuls, ``O(B n (2u d_a + d_a r))`` time, ``O(B n (d_a + r))`` memory --
linear in ``n``; the penalty costs ``O(B r^2 n)``. The reference applies the formula token by token.
No causal form and no decoding (the hops read the whole sequence).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastattn.core.alignment import AlignmentMechanism
from fastattn.core.masks import Mask
from fastattn.registry import register

__all__ = ["Structured", "hop_penalty"]


def hop_penalty(weights: Tensor) -> Tensor:
    """``||A A^T - I||_F^2`` for each batch row of ``weights (B, r, n)`` -> ``(B,)``."""
    gram = weights @ weights.transpose(1, 2)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return (gram - eye).square().sum((-2, -1))


@register(
    "structured", complexity="O(n d_a (d + r))", causal=False, decoding=False, padding=True, weights=True,
    time_growth=1.0, memory_growth=1.0,
)
class Structured(AlignmentMechanism):
    """Lin et al.'s r-hop self-attentive sentence embedding (see the module docstring)."""

    query_free = True
    test_options = {"hops": 5, "attention_dim": 4}

    @dataclass(frozen=True)
    class Options:
        hops: int = 30  # r, the attention rows (paper: 30)
        attention_dim: int = 350  # d_a (paper: 350)
        penalty: float = 1.0  # coefficient of ||A A^T - I||_F^2 in aux_loss (paper: 1.0)

        def __post_init__(self) -> None:
            for name in ("hops", "attention_dim"):
                value = getattr(self, name)
                if not isinstance(value, int) or value < 1:
                    raise ValueError(f"{name} must be a positive integer, got {value!r}")
            if self.penalty < 0:
                raise ValueError(f"penalty must be >= 0, got {self.penalty}")

    def __init__(self, options=None, *, query_dim: int, key_dim: int, value_dim: int) -> None:
        super().__init__(options, query_dim=query_dim, key_dim=key_dim, value_dim=value_dim)
        self.num_queries = self.options.hops
        self.w_s1 = nn.Linear(key_dim, self.options.attention_dim, bias=False)
        self.w_s2 = nn.Linear(self.options.attention_dim, self.options.hops, bias=False)

    def _finish(self, energies: Tensor, values: Tensor, mask: Mask) -> tuple[Tensor, Tensor]:
        context, weights = self.attend(energies, values, mask)
        self.aux_loss = self.options.penalty * hop_penalty(weights).mean()
        return context, weights

    def forward(
        self, query: None, keys: Tensor, values: Tensor, mask: Mask, prepared: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        return self._finish(self.w_s2(torch.tanh(self.w_s1(keys))).transpose(1, 2), values, mask)

    def reference(self, query: None, keys: Tensor, values: Tensor, mask: Mask) -> tuple[Tensor, Tensor]:
        w1, w2 = self.w_s1.weight, self.w_s2.weight
        columns = [w2 @ torch.tanh(w1 @ keys[b, j]) for b in range(keys.shape[0]) for j in range(keys.shape[1])]
        energies = torch.stack(columns, dim=-1).reshape(self.options.hops, keys.shape[0], keys.shape[1])
        return self._finish(energies.transpose(0, 1), values, mask)
