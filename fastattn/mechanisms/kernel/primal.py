"""Primal-Attention (Chen et al., 2023, arXiv:2305.19798): self-attention through asymmetric kernel SVD
in the primal representation.

Attention is read as an asymmetric kernel ``kappa(q, k) = phi_q(q) . phi_k(k)`` and its kernel SVD
(KSVD) is solved in the *primal*: with learned primal directions ``W_e, W_r`` (``D x s`` per head,
``s`` = ``rank``) the projection scores are

``e(q) = W_e^T phi_q(q)``,  ``r(k) = W_r^T phi_k(k)``   (``phi = x / ||x||``, the authors' cosine map),

and the KSVD objective (the paper's variational principle, with one learned ``Lambda = diag(lambda)``
per head)

``J = Tr(W_e^T W_r) - 1/2 mean_i e(q_i)^T Lambda e(q_i) - 1/2 mean_j r(k_j)^T Lambda r(k_j)``

is zero at every stationary point (the paper's KKT result: ``W_e``, ``W_r`` span singular vectors of the
kernel matrix, ``Lambda`` = inverse singular values). The regulariser ``J^2`` (mean over batch and heads)
is exposed as ``self.aux_loss`` after each forward; add ``eta * layer.aux_loss`` to the training loss.
(Means over tokens rather than sums, as in the authors' code, so the loss does not grow with length.)

Outputs, option ``output``:

* ``"concat"`` -- the paper's PrimalFormer: ``o_i = F [e(q_i); r(k_i)]`` with a learned ``F: 2s -> d``;
  the values are not read at all and token mixing happens only through training with ``J``. This needs
  self-attention (``Lq == Lk``) and value width = head width;
* ``"values"`` (default) -- the same primal scores used as a rank-``s`` asymmetric kernel on the values,
  ``o_i = (1/n) sum_j (e(q_i) . r(k_j)) v_j = e(q_i)^T (sum_j r(k_j) v_j^T) / n``, computed in the primal
  (linear engine, O(n s d)) -- a value-mixing reading of the same representation that works for any
  lengths and value width. This is our choice, not a variant from the paper.

Learned parameters: ``fastattn.MultiheadAttention(..., method="primal")`` only. Non-causal. Padding
keys have zero scores and are left out of the means of ``J`` (and, in self-attention, padded positions
are left out of the query mean too).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastattn.core.masks import Mask
from fastattn.registry import register
from .base import KernelMechanism
from fastattn.ops.features import l2_normalize, real_key_count
from fastattn.ops.linear.engine import dense_kernel_attention, linear_attention

__all__ = ["PrimalAttention", "ksvd_objective", "ksvd_objective_dual"]

_OUTPUTS = ("values", "concat")


def _masked_mean(x: Tensor, keep: Tensor | None) -> Tensor:
    """Mean over dim 2 of ``(B, H, L)`` with optional ``(B, 1, L)`` 0/1 weights."""
    if keep is None:
        return x.mean(dim=2)
    return (x * keep).sum(dim=2) / keep.sum(dim=2).clamp_min(1.0)


def ksvd_objective(
    e: Tensor, r: Tensor, w_e: Tensor, w_r: Tensor, lam: Tensor,
    q_keep: Tensor | None = None, k_keep: Tensor | None = None,
) -> Tensor:
    """The KSVD objective ``J`` per (batch, head) in the primal, ``(B, H)``.

    ``e (B, H, Lq, s)``, ``r (B, H, Lk, s)``, ``w_e, w_r (H, D, s)``, ``lam (H, s)``; ``q_keep``/``k_keep``
    ``(B, 1, L)`` 0/1 weights of the tokens that count."""
    trace = (w_e * w_r).sum(dim=(1, 2))  # Tr(W_e^T W_r) per head
    lam = lam[None, :, None, :]
    e_term = _masked_mean((e * e * lam).sum(dim=-1), q_keep)
    r_term = _masked_mean((r * r * lam).sum(dim=-1), k_keep)
    return trace[None, :] - 0.5 * e_term - 0.5 * r_term


def ksvd_objective_dual(kernel: Tensor, h_e: Tensor, h_r: Tensor, lam: Tensor) -> Tensor:
    """The same ``J`` in the dual, from the dense kernel matrix ``K_ij = phi_q(q_i) . phi_k(k_j)``
    ``(..., Lq, Lk)`` and dual variables ``h_e (..., Lq, s)``, ``h_r (..., Lk, s)``, where the primal
    directions are ``W_e = Phi_k^T h_r`` and ``W_r = Phi_q^T h_e``: then ``e = K h_r``, ``r = K^T h_e`` and
    ``Tr(W_e^T W_r) = Tr(h_r^T K^T h_e)``. O(n^2): for checking the primal form."""
    e = kernel @ h_r
    r = kernel.transpose(-1, -2) @ h_e
    trace = (h_r * (kernel.transpose(-1, -2) @ h_e)).sum(dim=(-1, -2))
    return trace - 0.5 * (e * e * lam).sum(-1).mean(-1) - 0.5 * (r * r * lam).sum(-1).mean(-1)


@register("primal", complexity="O(n s d)", causal=False, decoding=False, padding=True, time_growth=1.0, memory_growth=1.0)
class PrimalAttention(KernelMechanism):
    """Primal-Attention: learned primal KSVD directions, KSVD regulariser as ``aux_loss``."""

    normalize = False
    test_options = {"rank": 6}
    heads_independent = False  # per-head projections w_e, w_r and lam

    @dataclass(frozen=True)
    class Options:
        rank: int = 16  # s, the number of primal directions per head
        output: str = "values"  # "values" | "concat" (see module docstring)

        def __post_init__(self) -> None:
            if self.rank < 1:
                raise ValueError(f"rank must be >= 1, got {self.rank}")
            if self.output not in _OUTPUTS:
                raise ValueError(f"output must be one of {_OUTPUTS}, got {self.output!r}")

    def __init__(self, options=None, **kwargs) -> None:
        super().__init__(options, **kwargs)
        h, d, s = self.num_heads, self.head_dim, self.options.rank
        self.w_e = nn.Parameter(torch.empty(h, d, s))
        self.w_r = nn.Parameter(torch.empty(h, d, s))
        self.lam = nn.Parameter(torch.empty(h, s))
        for w in (self.w_e, self.w_r):
            for i in range(h):
                nn.init.orthogonal_(w.data[i])
        nn.init.uniform_(self.lam)
        self.concat = nn.Linear(2 * s, d) if self.options.output == "concat" else None

    # ---- primal scores and the regulariser --------------------------------------------------------
    def features(self, x: Tensor, *, is_query: bool, scale: float, mask: Mask) -> Tensor:
        x = l2_normalize(x)
        w = self.w_e if is_query else self.w_r
        return torch.einsum("bhnd,hds->bhns", x, w.to(x.dtype))

    def _scores(self, q: Tensor, k: Tensor, mask: Mask) -> tuple[Tensor, Tensor]:
        e = self.features(q, is_query=True, scale=1.0, mask=mask)
        r = self.features(k, is_query=False, scale=1.0, mask=mask)
        k_keep = None if mask.key_padding is None else (~mask.key_padding)[:, None, :].to(e.dtype)
        q_keep = k_keep if mask.lq == mask.lk else None
        j = ksvd_objective(e, r, self.w_e.to(e.dtype), self.w_r.to(e.dtype), self.lam.to(e.dtype), q_keep, k_keep)
        self.aux_loss = j.pow(2).mean()
        return e, r

    def _concat(self, e: Tensor, r: Tensor, v: Tensor, mask: Mask) -> Tensor:
        if mask.lq != mask.lk or v.shape[-1] != self.head_dim:
            raise ValueError(
                "primal output='concat' (PrimalFormer) needs self-attention with value width = head width, "
                f"got Lq={mask.lq}, Lk={mask.lk}, Ev={v.shape[-1]}, head_dim={self.head_dim}; use output='values'"
            )
        out = self.concat(torch.cat([e, r], dim=-1).to(self.concat.weight.dtype)).to(e.dtype)
        keep = mask.key_keep(out.dtype)  # self-attention: padded positions are not outputs either
        return out if keep is None else out * keep

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, dense: bool) -> Tensor:
        e, r = self._scores(q, k, mask)
        if self.options.output == "concat":
            return self._concat(e, r, v, mask).to(v.dtype)
        n = real_key_count(mask, q.shape[0], mask.lk, r.dtype, r.device).clamp_min(1.0)
        fn = dense_kernel_attention if dense else linear_attention
        return fn(e, r / n, v.to(e.dtype), mask, normalize=False).to(v.dtype)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, dropout_p: float = 0.0) -> Tensor:
        return self._attend(q, k, v, mask, dense=False)

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
        return self._attend(q, k, v, mask, dense=True)
