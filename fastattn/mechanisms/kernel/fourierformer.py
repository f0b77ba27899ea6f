"""FourierFormer (Nguyen et al., 2022, arXiv:2206.00206): attention with generalised Fourier integral kernels.

Attention read as non-parametric kernel regression (Nadaraya-Watson) of the values on the keys, with the
dot-product (Gaussian) kernel replaced by the generalised Fourier integral kernel:

``h_i = sum_j w_ij v_j / sum_j w_ij``,  ``w_ij = prod_{d=1..D} phi( sin(R (q_id - k_jd)) / (q_id - k_jd) )``,

with radius ``R`` and ``phi(x) = x^power``. ``power=1`` is the plain Fourier integral theorem (weights
can be negative); even powers give non-negative weights. The default ``power=4`` follows public
FourierFormer implementations (``sinc^4``); the generalised theorem allows other ``phi``. The kernel is not a dot product
and does not factorise, so this is an honest O(n^2 d) mechanism; ``scale`` has no effect (``R`` is the
bandwidth).

Implementation: ``sin(R x) / x = R sinc(R x / pi)`` (``torch.sinc``), exact and differentiable at
``x = 0`` where the factor is its limit ``R``. The product over ``D`` factors under- or overflows easily
(a product of 64 factors below 1), so it is formed in log space, ``log w_ij = power * sum_d log|.|``, and
normalised with the max-subtraction trick: for even powers the weights are exactly a softmax of these
logits. Queries are processed in blocks (each checkpointed under autograd), so the ``(block, Lk, D)``
differences never exist for all queries at once -- no ``n x n x d`` tensor, forward or backward.
Padding keys get weight 0; a query with no real key returns 0. Non-causal, as in the catalogue.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fastattn.core.base import Mechanism
from fastattn.core.masks import Mask, masked_softmax, safe_rowmax
from fastattn.registry import register
from fastattn.ops.features import padding_bias, query_chunked

_BLOCK_ELEMENTS = 1 << 22  # automatic query block: about this many (query, key, dim) triples at once


@register("fourierformer", complexity="O(n^2 d)", causal=False, decoding=False, padding=True, weights=True, time_growth=2.0, memory_growth=2.0)
class FourierFormerAttention(Mechanism):
    """Generalised Fourier integral kernel attention (see module docstring)."""

    test_options = {"query_chunk": 16}

    @dataclass(frozen=True)
    class Options:
        radius: float = 1.0  # R in sin(R x) / x
        power: int = 4  # phi(x) = x^power; 1 = the plain Fourier integral theorem
        query_chunk: int = 0  # queries per block; 0 = automatic (about 4M query-key-dim triples)

        def __post_init__(self) -> None:
            if not self.radius > 0:
                raise ValueError(f"radius must be > 0, got {self.radius}")
            if not isinstance(self.power, int) or self.power < 1:
                raise ValueError(f"power must be a positive integer, got {self.power!r}")
            if self.query_chunk < 0:
                raise ValueError(f"query_chunk must be >= 0 (0 = automatic), got {self.query_chunk}")

    def _chunk(self, q: Tensor, k: Tensor) -> int:
        if self.options.query_chunk:
            return self.options.query_chunk
        per_query = q.shape[0] * q.shape[1] * k.shape[2] * q.shape[3]
        return max(1, _BLOCK_ELEMENTS // max(1, per_query))

    def _normalized(self, q_blk: Tensor, k: Tensor, kbias: Tensor | None) -> Tensor:
        """``w_ij / sum_j w_ij`` for one block of queries, from the log-weights (see module docstring)."""
        r, p = float(self.options.radius), self.options.power
        t = torch.sinc((q_blk.unsqueeze(3) - k.unsqueeze(2)) * (r / math.pi))  # (B, H, bq, Lk, D)
        log_r = q_blk.shape[-1] * math.log(r)  # the R^D of the limit; cancels, kept for exact log-weights
        logits = p * (torch.log(t.abs().clamp_min(torch.finfo(t.dtype).tiny)).sum(dim=-1) + log_r)
        if p % 2 == 0:  # non-negative weights: exactly a softmax of the log-weights
            return masked_softmax(logits, kbias)
        negative = (t < 0).sum(dim=-1) % 2 == 1
        if kbias is not None:
            logits = logits + kbias
        m = safe_rowmax(logits)
        w = torch.exp(logits - m)
        w = torch.where(negative, -w, w)
        den = w.sum(dim=-1, keepdim=True)
        return w / torch.where(den == 0, torch.ones_like(den), den)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, dropout_p: float = 0.0) -> Tensor:
        dtype = q.dtype
        dt = dtype
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
        kbias = padding_bias(mask, dt, q.device)

        def block(q_blk: Tensor, k_: Tensor, v_: Tensor, q0: int) -> Tensor:
            return torch.matmul(self._normalized(q_blk, k_, kbias), v_)

        return query_chunked(block, q, k, v, chunk=self._chunk(q, k)).to(dtype)

    def weights(self, q: Tensor, k: Tensor, mask: Mask, scale: float) -> Tensor:
        """The normalised weights ``(B, H, Lq, Lk)``, a block of queries at a time."""
        dt = q.dtype
        q, k = q.to(dt), k.to(dt)
        kbias = padding_bias(mask, dt, q.device)

        def block(q_blk: Tensor, k_: Tensor, q0: int) -> Tensor:
            return self._normalized(q_blk, k_, kbias)

        return query_chunked(block, q, k, chunk=self._chunk(q, k))

    def _literal_weights(self, q: Tensor, k: Tensor, mask: Mask) -> Tensor:
        """``w_ij / sum_j w_ij`` written literally: the product over dimensions of ``phi(sin(R x)/x)``,
        with the limit ``R`` at ``x = 0``. Dense ``(B, H, Lq, Lk, D)``: for the reference only."""
        r = self.options.radius
        x = q.unsqueeze(3) - k.unsqueeze(2)
        at_zero = x == 0
        x_safe = torch.where(at_zero, torch.ones_like(x), x)
        factor = torch.where(at_zero, torch.full_like(x, r), torch.sin(r * x_safe) / x_safe)
        w = factor.pow(self.options.power).prod(dim=-1)
        allowed = mask.allowed(q.device)
        if allowed is not None:
            w = w * allowed.to(w.dtype)
        den = w.sum(dim=-1, keepdim=True)
        return w / torch.where(den == 0, torch.ones_like(den), den)

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
        return torch.matmul(self._literal_weights(q, k, mask), v)
