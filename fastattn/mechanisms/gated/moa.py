"""MoA: Mixture of Attention Heads (Zhang, Shen, Huang, Zhou, Rong and Xiong, 2022, arXiv:2210.05144).

``E`` attention *experts*, each with its own query projection ``W_q^e`` and output projection ``W_o^e``;
the key and value projections are **shared** by the experts. A router on the layer input picks ``k`` of
the ``E`` experts per token ``t`` and weighs them:

    G(x_t) = softmax over the top k of (x_t W_g)          (0 for the other experts)
    y_t    = sum_{e in topk} G_e(x_t) * (softmax(s q_t^e K^T) V)_t W_o^e,     q_t^e = x_t W_q^e

The gates are a softmax over the *selected* logits (top-k first, then softmax: renormalised), so they
sum to 1 over the ``k`` chosen experts.

Here the experts are the layer's heads: ``MultiheadAttention(D, E, "moa", active_heads=k)`` has ``E``
experts of width ``D / E``; ``W_q = [W_q^1 ... W_q^E]`` and ``W_o = [W_o^1; ...; W_o^E]`` are the layer's
``q_proj`` and ``out_proj``, so one matmul computes every expert's queries and one the gated sum of the
expert outputs. The shared keys and values are the ``num_kv_heads`` heads of ``k_proj`` / ``v_proj``,
each shared by a group of ``E / num_kv_heads`` experts: ``num_kv_heads=1`` is the paper's single shared
``K, V``; with ``num_kv_heads = E`` and ``k = E`` and uniform gates the layer is multi-head attention
(with ``W_o`` scaled by ``1 / E``). Any sequence mechanism can be the attention of the experts
(``core="softmax"`` by default).

Routing is per token and dropless (no capacity: a capacity limit would let future tokens evict a past
token from its expert), so a token's gates never depend on another token; the causal form is the core's
and the decoding cache holds the shared keys and values, which every expert reads.

``aux_loss`` (training mode only; zero in eval mode): ``balance_weight * L_a + z_weight * L_z`` with
``L_a = E * sum_e f_e P_e`` the load-balance loss (``f_e`` the fraction of tokens routed to ``e``, ``P_e``
its mean router probability over all ``E``) and ``L_z = mean_t logsumexp(x_t W_g)^2`` the router z-loss,
over the real (unpadded) tokens; the weights default to the paper's 0.01 and 0.001, so ``aux_loss`` is
added to the training loss as it is (the convention of :mod:`fastattn.ops.routing`).

Cost: the core over the ``E`` expert heads plus the router's ``O(n D E)``. The fast path attends only on
the selected ``(token, expert)`` pairs -- the tokens grouped by expert, each group's queries over all keys
(:class:`~fastattn.mechanisms.gated.base.HeadGatedAttention`) -- where the core allows it and it is
cheaper; otherwise it computes every expert for every token and zeroes the unselected ones by their gate
(batched, no loop over experts). :meth:`MoA.reference` writes the formula per token: an explicit sort of the router
logits, the softmax over the chosen ones, and the sum of the chosen experts' projected outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from fastattn.core.layer import LayerConfig
from fastattn.ops.routing import Routing, gate_heads, loss_weights, route, router_loss
from fastattn.registry import register

from .base import HeadGatedAttention


@register(
    "moa", complexity="O(n^2 d E + n D E)", causal=True, decoding=True, padding=True,
    attn_mask=True, dropout=True, level="layer",
    time_growth=2.0, memory_growth=2.0,
)
class MoA(HeadGatedAttention):
    """Mixture of attention heads: a router picks k of E experts (query/output projections) per token;
    keys and values shared."""

    returns_core_weights: ClassVar[bool] = False  # the output mixes experts by gates: no single attention matrix
    test_options: ClassVar[dict[str, Any]] = {"active_heads": 2}  # 6 experts, 2 per token
    deviations: ClassVar[tuple[str, ...]] = (
        "the experts are the layer's heads: expert width is embed_dim / num_heads, and the shared keys and "
        "values are num_kv_heads heads, each shared by a group of experts (num_kv_heads=1 is the paper's "
        "single shared K, V)",
        "with a core that owns no state and is not positional (softmax, flash, ...), only the selected "
        "(token, expert) pairs attend; other cores compute every expert and zero the unselected ones by their gate",
    )

    @dataclass(frozen=True)
    class Options(HeadGatedAttention.Options):
        active_heads: int | None = None  # k experts per token; default min(num_heads, 4)
        balance_weight: float = 0.01  # weight of the load-balance loss in aux_loss
        z_weight: float = 0.001  # weight of the router z-loss in aux_loss

    def __init__(self, options: Any, config: LayerConfig, *, generator: torch.Generator | None = None) -> None:
        super().__init__(options, config, generator=generator)
        e, o = self.num_heads, self.options
        active = min(e, 4) if o.active_heads is None else o.active_heads
        if not 1 <= active <= e:
            raise ValueError(f"active_heads must be in [1, {e}] (the experts are the {e} heads), got {active}")
        self.loss_weights = loss_weights(o, "balance", "z")
        self.experts, self.active_heads = e, active
        self.w_gate = nn.Linear(config.embed_dim, e, bias=False, device=config.device, dtype=config.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", experts per token: {self.active_heads} of {self.experts}"

    def routing(self, x: Tensor) -> tuple[Tensor, Routing]:
        """The router logits ``(B, L, E)`` and the routing: ``gates`` 0 where an expert is not selected,
        a softmax over the selected logits elsewhere."""
        logits = self.w_gate(x)
        return logits, route(logits, self.active_heads, gate="softmax", renormalize=True)

    def selection(self, x: Tensor) -> Tensor:
        """The top-k experts (heads) of each token."""
        return self.routing(x)[1].mask

    def mix(self, x: Tensor, heads: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor | None]:
        logits, r = self.routing(x)
        aux = None
        if self.training:
            aux = router_loss(r, self.loss_weights, valid)
        return gate_heads(heads, r.gates), aux

    def reference(
        self, x: Tensor, context: Tensor | None = None, value: Tensor | None = None, *,
        key_padding_mask: Tensor | None = None, attn_mask: Tensor | None = None, is_causal: bool = False,
    ) -> Tensor:
        """``y_t = sum_{e in topk} G_e (A^e V)_t W_o^e`` token by token (the core's reference for the
        expert attentions ``A^e V``)."""
        heads = self.reference_heads(
            x, context, value, key_padding_mask=key_padding_mask, attn_mask=attn_mask, is_causal=is_causal
        )
        d, top = self.head_dim, self.active_heads
        w_o, w_g = self.out_proj.weight, self.w_gate.weight
        rows = []
        for b in range(x.shape[0]):
            for t in range(x.shape[1]):
                logits = w_g @ x[b, t]
                chosen = torch.argsort(logits, descending=True, stable=True)[:top].tolist()
                g = torch.softmax(torch.stack([logits[e] for e in chosen]), 0)
                out = sum(g[i] * (w_o[:, e * d:(e + 1) * d] @ heads[b, e, t]) for i, e in enumerate(chosen))
                rows.append(out if self.out_proj.bias is None else out + self.out_proj.bias)
        return torch.stack(rows).view(*x.shape[:2], -1)
