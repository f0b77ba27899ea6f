"""SwitchHead: Accelerating Transformers with Mixture-of-Experts Attention (Csordás, Piękos, Irie and
Schmidhuber, 2023, arXiv:2312.07987).

Few heads, and per head the **value** and **output** projections are mixtures of ``E`` experts; the
query and key projections are dense. Each head ``h`` has two routers on the layer input, with
non-competitive sigmoid gates over the top ``k`` of their logits (top-k on the logits, before the
sigmoid; the kept gates are not renormalised):

* the *source* router picks the value experts of token ``j`` **as a key/value token**:
  ``s_j = sigmoid(x_j W_S^h)``, ``V^h_j = sum_{e in topk(s_j)} s_{j,e} x_j W_V^{h,e}``;
* the *destination* router picks the output experts of token ``i`` **as a query token**:
  ``d_i = sigmoid(x_i W_D^h)``, ``y_i = sum_h sum_{e in topk(d_i)} d_{i,e} (A^h V^h)_i W_O^{h,e}``

with ``A^h`` head ``h``'s attention (any sequence mechanism: ``core="softmax"`` by default) of the dense
``q^h = x W_Q^h`` over ``k^h = x W_K^h``. With grouped-query heads the value experts and the source
router belong to the ``num_kv_heads`` key/value heads, the output experts and the destination router to
the query heads. The expert weights have no biases; the output has one shared bias (``bias=True``).
Weights as the authors' code (``RobertCsordas/moe_attention``): experts ``N(0, 1/fan_in)`` (the output
experts ``N(0, 1/(h d))``).

A token's value is fixed when it is written (it depends on that token only), so the causal form is the
core's and decoding caches the mixed values per key/value head; routing is dropless.

``aux_loss`` (training mode only; zero in eval mode): the authors' selection-entropy regulariser for the
source and the destination routers, ``sum_e pbar_e log pbar_e`` with ``pbar`` the softmax of the router
logits averaged over the batch's real tokens, averaged over heads, the two summed. It is minimal when
each head's batch spreads evenly over its experts; it is multiplied by ``entropy_weight`` (the authors'
``perplexity_reg``; default 0.01, a typical MoE regularisation weight -- the authors tune it per
experiment), so that, by the convention of :mod:`fastattn.ops.routing`, ``aux_loss`` is added to the
training loss as it is.

Defaults: ``E = 4`` experts per head, ``k = 2`` active (``moe_k = 2`` in the authors' code).

**Few, narrower heads** (option ``head_dim``): the paper's point is to compute fewer attention matrices
than the dense baseline of the same ``d_model`` -- a few heads, each of a width ``d_head`` of its own, not
``d_model / h`` (the abstract: 4 to 8 times fewer attention matrices than the standard Transformer). With
``head_dim`` set, ``q``/``k``, the core and the experts use ``h * head_dim`` channels while the layer's
input and output stay ``embed_dim``; ``None`` (the default) keeps ``embed_dim / num_heads``. With as many
heads as the baseline and ``d_model / h`` each, the attention costs what the baseline's does and the
expert projections come on top. Forward+backward at n=4096, ``embed_dim`` 512, 2 of 4 experts, against
8-head multi-head attention in one run (``benchmarks/gated_heads.py``, results in
``benchmarks/results/gated_heads.md``, shared 2-core machine): 8 heads of 64 1.07x its speed non-causal,
0.65x causal (earlier runs 0.71x non-causal); 4 heads of 64 1.72x and 1.29x; 2 heads of 128 2.04x and 1.30x.

Cost: the core over the ``h`` heads plus ``O(n D h E d)`` for the expert projections and ``O(n D h E)``
for the routers. The fast path computes every expert in one batched einsum (value side) and one matmul
(output side) and weighs unselected experts by 0 (the authors' Triton kernel computes only the selected
ones). On CPU both selected forms measured slower than the one einsum over every expert
(``benchmarks/switchhead_experts.py``, forward+backward of the value experts, shared 2-core machine):
tokens grouped by expert, padded, one batched matmul (1815 ms against 913 ms at n=4096, 8 heads of 64),
and the selections sorted by (head, expert) with one matmul per segment, ``index_select`` in and
``index_add`` out (1364 ms against 328 ms at n=4096, 2 heads of 128, ``--heads 2 --head-dim 128``,
``benchmarks/results/switchhead_experts_2x128.json``; bimodal under the machine's load, its best runs
about the einsum's; the padded form 450 ms): the gathers and scatters of the selected rows cost as much as
the half of the matmul they save, and the loop of smaller matmuls suffers most from a shared machine. So
the layer keeps the einsum. :meth:`SwitchHead.reference` writes the sums over the selected experts token by
token.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from fastattn.core.layer import LayerConfig, ProjectedAttention, make_core
from fastattn.ops.routing import Routing, experts_in, experts_out, loss_weights, route, router_loss
from fastattn.registry import register


@register(
    "switchhead", complexity="O(n^2 d + n D h E d)", causal=True, decoding=True, padding=True,
    attn_mask=True, dropout=True, weights=True, level="layer",
    time_growth=2.0, memory_growth=2.0,
)
class SwitchHead(ProjectedAttention):
    """Mixture-of-experts value and output projections per head: value experts chosen by the key token,
    output experts by the query token (sigmoid gates, top-k)."""

    test_options: ClassVar[dict[str, Any]] = {"experts": 3, "active_experts": 2, "head_dim": 6}
    deviations: ClassVar[tuple[str, ...]] = (
        "every expert is computed and unselected ones are weighed by 0 (the authors' kernel computes only "
        "the selected ones; on CPU the grouped form measured slower, benchmarks/switchhead_experts.py); no "
        "expert dropout",
    )

    @dataclass(frozen=True)
    class Options(ProjectedAttention.Options):
        experts: int = 4  # E value / output experts per head
        active_experts: int = 2  # k experts per token and head (moe_k)
        entropy_weight: float = 0.01  # weight of the selection-entropy regulariser in aux_loss (perplexity_reg)
        head_dim: int | None = None  # width of each head; None: embed_dim / num_heads (the paper decouples it)

    def __init__(self, options: Any, config: LayerConfig, *, generator: torch.Generator | None = None) -> None:
        super().__init__(options, config, generator=generator)
        e, k = self.options.experts, self.options.active_experts
        if e < 1:
            raise ValueError(f"experts must be >= 1, got {e}")
        if not 1 <= k <= e:
            raise ValueError(f"active_experts must be in [1, experts={e}], got {k}")
        self.experts, self.active_experts = e, k
        self.loss_weights = loss_weights(self.options, "entropy")
        fk = {"device": config.device, "dtype": config.dtype}
        dh = self.options.head_dim
        if dh is not None and dh != self.head_dim:
            if dh < 1:
                raise ValueError(f"head_dim must be >= 1 (or None for embed_dim / num_heads), got {dh}")
            # the paper's few, narrower heads: q/k and the core at h * head_dim, not embed_dim
            self.head_dim = dh
            h, hkv = self.num_heads, self.num_kv_heads
            core_config = replace(config, embed_dim=h * dh, kdim=None, vdim=None)
            self.core = make_core(self.options.core, self.options.core_options, core_config, generator=generator)
            self.q_proj = nn.Linear(config.embed_dim, h * dh, bias=config.bias, **fk)
            self.k_proj = nn.Linear(config.kdim, hkv * dh, bias=config.bias, **fk)
            for lin in (self.q_proj, self.k_proj):
                nn.init.xavier_uniform_(lin.weight)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
        h, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        # the expert projections replace the dense value and output projections
        self.v_proj = None
        self.out_proj = None
        self.w_v = nn.Parameter(torch.randn(hkv, e, config.vdim, d, **fk) * config.vdim ** -0.5)
        self.w_o = nn.Parameter(torch.randn(h, e, d, config.embed_dim, **fk) * (h * d) ** -0.5)
        self.out_bias = nn.Parameter(torch.zeros(config.embed_dim, **fk)) if config.bias else None
        self.w_source = nn.Linear(config.vdim, hkv * e, bias=False, **fk)
        self.w_dest = nn.Linear(config.embed_dim, h * e, bias=False, **fk)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", experts per token and head: {self.active_experts} of {self.experts}"

    def _route(self, router: nn.Linear, x: Tensor) -> tuple[Tensor, Routing]:
        logits = router(x).unflatten(-1, (-1, self.experts))  # (B, L, heads, E)
        return logits, route(logits, self.active_experts, gate="sigmoid", renormalize=False)

    def source_routing(self, value: Tensor) -> tuple[Tensor, Routing]:
        """Router logits ``(B, Lk, Hkv, E)`` and routing of the value experts, from the key/value tokens."""
        return self._route(self.w_source, value)

    def dest_routing(self, x: Tensor) -> tuple[Tensor, Routing]:
        """Router logits ``(B, Lq, H, E)`` and routing of the output experts, from the query tokens."""
        return self._route(self.w_dest, x)

    def project(self, x: Tensor, context: Tensor | None, value: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        context = x if context is None else context
        value = context if value is None else value
        _, r = self.source_routing(value)
        v = experts_in(value, self.w_v, r.gates).transpose(1, 2)  # (B, Hkv, Lk, d)
        return self.heads(self.q_proj(x), self.num_heads), self.heads(self.k_proj(context), self.num_kv_heads), v

    def project_loss(
        self, x: Tensor, context: Tensor | None, value: Tensor | None, valid_keys: Tensor | None
    ) -> Tensor | None:
        value = (x if context is None else context) if value is None else value
        return router_loss(self.source_routing(value)[1], self.loss_weights, valid_keys)

    def output(self, x: Tensor, heads: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor | None]:
        logits, r = self.dest_routing(x)
        out = experts_out(heads.transpose(1, 2), self.w_o, r.gates)
        if self.out_bias is not None:
            out = out + self.out_bias
        return out, router_loss(r, self.loss_weights, valid) if self.training else None

    def reference(
        self, x: Tensor, context: Tensor | None = None, value: Tensor | None = None, *,
        key_padding_mask: Tensor | None = None, attn_mask: Tensor | None = None, is_causal: bool = False,
    ) -> Tensor:
        """Token by token: each key token's value per key/value head from its own top-k source experts,
        the core's reference attention, each query token's output from its own top-k output experts."""
        context = x if context is None else context
        value = context if value is None else value
        top = self.active_experts

        def selected(router: nn.Linear, token: Tensor, head: int) -> list[tuple[int, Tensor]]:
            logits = router.weight[head * self.experts:(head + 1) * self.experts] @ token
            chosen = torch.argsort(logits, descending=True, stable=True)[:top].tolist()
            return [(e, torch.sigmoid(logits[e])) for e in chosen]

        b, lk = value.shape[:2]
        v = torch.stack([
            torch.stack([
                torch.stack([
                    sum(s * (value[i, j] @ self.w_v[g, e]) for e, s in selected(self.w_source, value[i, j], g))
                    for j in range(lk)
                ]) for g in range(self.num_kv_heads)
            ]) for i in range(b)
        ])
        q, k = self.heads(self.q_proj(x), self.num_heads), self.heads(self.k_proj(context), self.num_kv_heads)
        heads = self.attend(
            q, k, v, reference=True, key_padding_mask=key_padding_mask, is_causal=is_causal,
            attn_mask=self._attn_mask(attn_mask, b, q.shape[2], k.shape[2]),
        )
        rows = []
        for i in range(b):
            for t in range(x.shape[1]):
                out = sum(
                    d * (heads[i, h, t] @ self.w_o[h, e])
                    for h in range(self.num_heads) for e, d in selected(self.w_dest, x[i, t], h)
                )
                rows.append(out if self.out_bias is None else out + self.out_bias)
        return torch.stack(rows).view(*x.shape[:2], -1)
