"""Synthesizer (Tay et al., 2020, arXiv:2005.00743): attention weights synthesized without token-token
dot products.

Per head, ``out = softmax(B) V`` with the logits ``B (Lq x Lk)``:

* ``variant="dense"``: each query token predicts its own row, ``B_i = W2 relu(W1 x_i + b1) + b2`` of
  length ``n_max``, sliced to the key length. Here ``x_i`` is the per-head query ``q_i`` (which keeps the
  mechanism a sequence operator over ``q, k, v``); the row of token ``i`` depends on ``x_i`` only.
  Factorised: two narrower heads ``a_i`` (length ``a``) and ``b_i`` (length ``b``, ``a b >= n_max``),
  ``B_i = tile(a_i) * repeat(b_i)``, i.e. ``B_ij = a_i[j mod a] b_i[j div a]``.
* ``variant="random"``: ``B = R[rows, :Lk]``, one learned (or, with ``trainable=False``, fixed) matrix
  ``R (n_max x n_max)`` per head, independent of the input; query rows are the queries' absolute
  positions (bottom-right aligned when ``Lq < Lk``, as in decoding). Factorised: ``R = R1 R2^T`` of rank
  ``rank``.

The logits are not scaled by ``scale`` (they are synthesized, not dot products). Keys are never used (their
gradient is zero), and neither are queries in the random variant. Causal: synthesized logits of keys after
the query are masked before the softmax, which is exact since a row never looks at other tokens; padding
masks columns. Decoding: the default key/value cache (the keys are carried but unused). Length-tied
tables: a key length or query position beyond ``max_length`` is a ``ValueError`` naming the option.
Efficient path: query-chunked and checkpointed, O(chunk n) memory; O(n^2 d) time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from fastattn.core.base import Mechanism
from fastattn.core.checks import check_table_length
from fastattn.core.masks import Mask, masked_softmax
from fastattn.ops.chunked import query_chunked
from fastattn.registry import register

__all__ = ["Synthesizer"]

VARIANTS = ("dense", "random")


def _uniform(*shape: int, fan_in: int) -> nn.Parameter:
    bound = fan_in ** -0.5
    return nn.Parameter(torch.empty(shape).uniform_(-bound, bound))


@register(
    "synthesizer", complexity="O(n^2 d), n <= max_length (length-tied tables)", causal=True, decoding=True, padding=True,
    time_growth=2.0, memory_growth=1.0,
)
class Synthesizer(Mechanism):
    """Softmax over synthesized logits: a per-token MLP (dense) or a learned matrix (random)."""

    positional = True
    test_options: ClassVar[dict[str, Any]] = {"max_length": 64, "query_chunk": 16}
    heads_independent = False  # per-head synthesised tables
    deviations = (
        (
            "Dense synthesizer rows are predicted from the per-head query q_i rather than from the layer "
            "input x_i (so that it stays a sequence-level mechanism)."
        ),
    )

    @dataclass(frozen=True)
    class Options:
        variant: str = "dense"  # "dense" | "random"
        factorized: bool = False  # dense: a x b heads; random: R = R1 R2^T
        rank: int = 8  # factorised random: rank of R
        hidden: int = 0  # dense: width of the MLP (0: the head dimension)
        max_length: int = 512  # n_max: the longest key sequence (and last query position) covered
        trainable: bool = True  # random: R learned (True) or a fixed random buffer (False)
        query_chunk: int = 256  # queries per checkpointed chunk of the efficient path

        def __post_init__(self) -> None:
            if self.variant not in VARIANTS:
                raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
            for name in ("rank", "max_length", "query_chunk"):
                if getattr(self, name) < 1:
                    raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
            if self.hidden < 0:
                raise ValueError(f"hidden must be >= 0 (0: the head dimension), got {self.hidden}")

    def __init__(self, options=None, *, head_dim: int, num_heads: int, num_kv_heads: int | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(options, head_dim=head_dim, num_heads=num_heads, num_kv_heads=num_kv_heads)
        o, h, n = self.options, num_heads, self.options.max_length
        if o.variant == "dense":
            hid = o.hidden or head_dim
            self.w1, self.b1 = _uniform(h, head_dim, hid, fan_in=head_dim), _uniform(h, hid, fan_in=head_dim)
            if o.factorized:
                self.a = math.ceil(math.sqrt(n))
                b = math.ceil(n / self.a)  # a * b >= n_max
                self.w2a, self.b2a = _uniform(h, hid, self.a, fan_in=hid), _uniform(h, self.a, fan_in=hid)
                self.w2b, self.b2b = _uniform(h, hid, b, fan_in=hid), _uniform(h, b, fan_in=hid)
            else:
                self.w2, self.b2 = _uniform(h, hid, n, fan_in=hid), _uniform(h, n, fan_in=hid)
            return
        shapes = {"r1": (h, n, o.rank), "r2": (h, n, o.rank)} if o.factorized else {"r": (h, n, n)}
        for name, shape in shapes.items():
            init = torch.randn(shape) * (o.rank ** -0.25 if o.factorized else 1.0)
            if o.trainable:
                setattr(self, name, nn.Parameter(init))
            else:
                self.register_buffer(name, init)

    # ---- the synthesized logits -------------------------------------------------------------------
    def _check(self, mask: Mask) -> None:
        mask.require_only("key_padding", "causal", op="synthesizer")
        check_table_length(mask.lk, self.options.max_length, "key length")
        check_table_length(mask.q_start + mask.lq, self.options.max_length, "last query position + 1")

    def logits(self, q: Tensor, q0: int, lk: int, mask: Mask) -> Tensor:
        """``B`` for the queries ``q (B, H, Lq', E)`` at slots ``q0 ..`` over ``lk`` keys: ``(B|1, H, Lq', lk)``."""
        o, dt = self.options, q.dtype
        if o.variant == "dense":
            hid = torch.relu(q @ self.w1.to(dt)[None] + self.b1.to(dt)[None, :, None])
            if not o.factorized:
                return (hid @ self.w2.to(dt)[None, :, :, :lk]) + self.b2.to(dt)[None, :, None, :lk]
            j = torch.arange(lk, device=q.device)
            a = hid @ self.w2a.to(dt)[None] + self.b2a.to(dt)[None, :, None]
            b = hid @ self.w2b.to(dt)[None] + self.b2b.to(dt)[None, :, None]
            return a[..., j % self.a] * b[..., torch.div(j, self.a, rounding_mode="floor")]
        rows = slice(mask.q_start + q0, mask.q_start + q0 + q.shape[2])
        if o.factorized:
            return (self.r1[:, rows].to(dt) @ self.r2[:, :lk].to(dt).transpose(-1, -2))[None]
        return self.r[:, rows, :lk].to(dt)[None]

    # ---- the efficient path -----------------------------------------------------------------------
    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, dropout_p: float = 0.0) -> Tensor:
        self._check(mask)
        lk = k.shape[2]

        def chunk(q_blk: Tensor, v_: Tensor, q0: int) -> Tensor:
            s = self.logits(q_blk, q0, lk, mask)
            p = masked_softmax(s, mask.additive(s.dtype, s.device, q0, q0 + q_blk.shape[2]))
            return torch.matmul(p, v_) if p.shape[0] == v_.shape[0] else torch.einsum("xhqk,bhkd->bhqd", p, v_)

        out = query_chunked(chunk, q, v, chunk=self.options.query_chunk)
        return out + (q[..., :1] * 0).sum() + (k[..., :1] * 0).sum()  # q, k stay in the graph (zero grads)

    # ---- the formula ------------------------------------------------------------------------------
    def reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
        self._check(mask)
        o, dt, lk, lq = self.options, q.dtype, k.shape[2], q.shape[2]
        if o.variant == "dense":
            hid = torch.relu(torch.einsum("bhie,hef->bhif", q, self.w1.to(dt)) + self.b1.to(dt)[None, :, None])
            if o.factorized:
                a = torch.einsum("bhif,hfa->bhia", hid, self.w2a.to(dt)) + self.b2a.to(dt)[None, :, None]
                b = torch.einsum("bhif,hfc->bhic", hid, self.w2b.to(dt)) + self.b2b.to(dt)[None, :, None]
                tiled = a.repeat(1, 1, 1, b.shape[-1])  # tile(a_i): a_i, a_i, ... (b times)
                repeated = b.repeat_interleave(a.shape[-1], dim=-1)  # repeat(b_i): each entry a times
                logits = (tiled * repeated)[..., :lk]
            else:
                full = torch.einsum("bhif,hfn->bhin", hid, self.w2.to(dt)) + self.b2.to(dt)[None, :, None]
                logits = full[..., :lk]
        else:
            r = self.r1 @ self.r2.transpose(-1, -2) if o.factorized else self.r  # (H, n_max, n_max)
            logits = r.to(dt)[None, :, mask.q_start:mask.q_start + lq, :lk].expand(q.shape[0], -1, -1, -1)
        out = masked_softmax(logits, mask.additive(dt, q.device)) @ v
        return out + (q[..., :1] * 0).sum() + (k[..., :1] * 0).sum()
