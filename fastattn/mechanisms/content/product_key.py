"""Product-key memory, "Large Memory Layers with Product Keys" (Lample, Sablayrolles, Ranzato, Denoyer
and Jegou, 2019, arXiv:1907.05242); checked against the peer's structure (``product-key-memory==0.3.0``).

A layer-level mechanism that attends over a learned memory of ``|C|^2`` slots, not over the sequence:
every token ``x`` makes ``H`` queries (the layer's heads) ``q_h = LN(W_q x)_h`` of width ``d_k``, split
in halves ``q_h = [q1; q2]``. Each head owns two sub-key sets ``C1, C2`` (``|C| x d_k/2``); the slot
``(a, b)`` has the key ``[C1_a; C2_b]``, so its score is ``q1 . C1_a + q2 . C2_b``. The top-``k`` slots
are found without scoring all ``|C|^2``: ``I1 = topk(q1 C1^T)``, ``I2 = topk(q2 C2^T)``, then the top-``k``
of the ``k^2`` sums over ``I1 x I2`` (exact: a slot in the global top-``k`` has both halves in the
per-half top-``k``). ``w = softmax(top scores)``; the output is ``sum_h sum_i w_{h,i} V[a_i |C| + b_i]``,
values ``V (|C|^2 x D)`` shared by the heads (an ``nn.EmbeddingBag``; ``sparse=True`` for sparse
gradients, e.g. with the paper's separate optimiser for the values).

Token-wise, hence causal and stateless: :meth:`step` is the forward of the new tokens (a
:class:`~fastattn.core.state.PositionState` counts positions). Self-attention only: another key/value
sequence is a ``ValueError``. Padding never matters (outputs at padding positions are unspecified).
Cost ``O(n H (|C| d_k + k^2 + k D))`` time, ``O(n H (|C| + k^2))`` memory, plus ``|C|^2 D`` parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from fastattn.core.layer import LayerMechanism
from fastattn.core.state import PositionState
from fastattn.registry import register


@register(
    "product_key", complexity="O(n H (|C| d_k + k^2 + k D))", causal=True, decoding=True, padding=True,
    level="layer", time_growth=1.0, memory_growth=1.0,
)
class ProductKeyMemory(LayerMechanism):
    """A memory of ``|C|^2`` learned values read by a product-key top-k search per head."""

    test_options: ClassVar[dict[str, Any]] = {"num_keys": 7, "topk": 4, "key_dim": 8}
    self_attention_only = True
    deviations = (
        "The query norm is LayerNorm per head (the peer's choice; causal and batch-independent), not the "
        "paper's BatchNorm.",
        "The memory heads are the layer's num_heads; sub-keys are per head, values shared.",
    )

    @dataclass(frozen=True)
    class Options:
        num_keys: int = 128  # |C| sub-keys per half (|C|^2 memory slots; the paper: 512)
        topk: int = 32  # k slots read per head (the paper's default)
        key_dim: int = 128  # d_k: query width per head, split into two halves (the paper: 512)
        sparse: bool = False  # sparse gradients for the values (nn.EmbeddingBag(sparse=True))

        def __post_init__(self) -> None:
            if self.num_keys < 1 or self.topk < 1 or self.key_dim < 2 or self.key_dim % 2:
                raise ValueError(
                    f"product_key: num_keys and topk must be >= 1 and key_dim even >= 2, got "
                    f"{self.num_keys}, {self.topk}, {self.key_dim}"
                )
            if self.topk > self.num_keys:
                raise ValueError(f"product_key: topk ({self.topk}) cannot exceed num_keys ({self.num_keys})")

    def __init__(self, options: Any, config, *, generator: torch.Generator | None = None) -> None:
        super().__init__(options, config, generator=generator)
        if config.dropout > 0:
            raise ValueError("product_key has no attention dropout; use dropout=0")
        o, d, h = self.options, config.embed_dim, config.num_heads
        fk = {"device": config.device, "dtype": config.dtype}
        self.q_proj = nn.Linear(d, h * o.key_dim, bias=config.bias, **fk)
        self.norm = nn.LayerNorm(o.key_dim, **fk)
        self.subkeys = nn.Parameter(torch.randn(h, 2, o.num_keys, o.key_dim // 2, **fk) * (o.key_dim // 2) ** -0.5)
        self.values = nn.EmbeddingBag(o.num_keys ** 2, d, mode="sum", sparse=o.sparse, **fk)
        nn.init.normal_(self.values.weight, std=d ** -0.5)

    # ---- pieces ---------------------------------------------------------------------------------
    def _check(self, context: Tensor | None, value: Tensor | None, attn_mask: Tensor | None) -> None:
        self.check_self_attention(context, value)  # a memory read by the query tokens: no other sequence
        if attn_mask is not None:
            raise ValueError("product_key has no key axis to mask; attn_mask is not supported")

    def half_scores(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The scores of the two query halves against their sub-keys, ``(B, L, H, |C|)`` each."""
        o = self.options
        q = self.norm(self.q_proj(x).view(*x.shape[:2], self.num_heads, o.key_dim))
        q1, q2 = q.split(o.key_dim // 2, dim=-1)
        keys = self.subkeys.to(q.dtype)
        return torch.einsum("blhd,hcd->blhc", q1, keys[:, 0]), torch.einsum("blhd,hcd->blhc", q2, keys[:, 1])

    def lookup(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The product-key search: the top-``k`` slot ids ``(B, L, H, k)`` (``a |C| + b``) and their scores."""
        s1, s2 = self.half_scores(x)
        k, c = self.options.topk, self.options.num_keys
        t1, i1 = s1.topk(k, dim=-1)
        t2, i2 = s2.topk(k, dim=-1)
        cand = (t1[..., :, None] + t2[..., None, :]).flatten(-2)  # (B, L, H, k * k)
        top, at = cand.topk(k, dim=-1)
        a, b = i1.gather(-1, torch.div(at, k, rounding_mode="floor")), i2.gather(-1, at % k)
        return a * c + b, top

    def _read(self, idx: Tensor, scores: Tensor) -> Tensor:
        b, length = idx.shape[:2]
        w = torch.softmax(scores, dim=-1)
        out = self.values(idx.reshape(b * length, -1), per_sample_weights=w.reshape(b * length, -1).to(
            self.values.weight.dtype))
        return out.view(b, length, -1)

    # ---- the contract ---------------------------------------------------------------------------
    def forward(
        self, x: Tensor, context: Tensor | None = None, value: Tensor | None = None, *,
        key_padding_mask: Tensor | None = None, attn_mask: Tensor | None = None, is_causal: bool = False,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        self._check(context, value, attn_mask)
        self.aux_loss = torch.zeros((), device=x.device)
        return self._read(*self.lookup(x)), None

    def reference(
        self, x: Tensor, context: Tensor | None = None, value: Tensor | None = None, *,
        key_padding_mask: Tensor | None = None, attn_mask: Tensor | None = None, is_causal: bool = False,
    ) -> Tensor:
        """Brute force: every one of the ``|C|^2`` Cartesian keys ``[C1_a; C2_b]`` scored, top-``k``, softmax,
        the weighted sum of the value rows."""
        self._check(context, value, attn_mask)
        s1, s2 = self.half_scores(x)
        full = (s1[..., :, None] + s2[..., None, :]).flatten(-2)  # slot a |C| + b
        top, idx = full.topk(self.options.topk, dim=-1)
        w = torch.softmax(top, dim=-1)
        return torch.einsum("blhk,blhkd->bld", w, self.values.weight[idx])

    def step(self, x: Tensor, state: Any, *, key_padding_mask: Tensor | None = None) -> tuple[Tensor, Any]:
        """Token-wise: the forward of the new tokens; the state counts positions."""
        out, _ = self.forward(x)
        return out, PositionState.advance(state, x.shape[0], x.shape[1], x.device)
