"""MoH: Multi-Head Attention as Mixture-of-Head Attention (Jin, Zhu, Yuan and Yan, 2024, arXiv:2410.11842).

Multi-head attention is a sum over heads, ``O = sum_i H^i W_O^i`` (``H^i`` the output of head ``i``,
``W_O^i`` its block of the output projection). MoH treats the heads as experts and makes the sum a
weighted, sparse one, per token ``t``:

    O_t = sum_i g_i(x_t) H^i_t W_O^i

The first ``h_s`` heads are *shared* (always on), the other ``h - h_s`` are *routed*: a router on the
layer input keeps the top ``k`` of them for each token and the rest get ``g = 0``. The gates, with the
rescalings of the authors' code (``SkyworkAI/MoH``, ``MoH-ViT``), which make every gate 1 when the routers
are uniform and all heads are on -- so that MoH then *is* multi-head attention:

* routed: ``p = softmax(x_t W_r)`` over the routed heads; the top ``k`` keep ``p``, renormalised over the
  top ``k``, times ``k``;
* shared: ``h_s * softmax(x_t W_s)`` over the shared heads (``1`` when ``h_s = 1``; no ``W_s``);
* both present: ``[a_1, a_2] = 2 * softmax(x_t W_h)`` scales the shared and the routed gates (the paper's
  two-stage routing ``[alpha_1, alpha_2]``).

``W_r, W_s, W_h`` are bias-free linear maps of the layer input (``x``, the query side). The heads are
those of any sequence mechanism, ``core="softmax"`` by default; the gates multiply the head outputs
before the output projection. Routing is per token and dropless (no capacity), so a token's gates never
depend on another token: the causal form is the core's causal form, and decoding keeps the core's state
for every head (a future token may pick a head no past token used).

``aux_loss`` (training mode only; zero in eval mode) is ``balance_weight`` (default 0.01, the paper's
beta) times the load-balance loss of the routed heads, ``E * sum_e f_e P_e`` with ``E = h - h_s``, ``f_e``
the fraction of tokens selecting routed head ``e`` and ``P_e`` its mean router probability (``k`` when
the load is even), plus ``z_weight`` (default 0) times the router z-loss; padding tokens of a
self-attention call do not count. It is already weighted (the convention of :mod:`fastattn.ops.routing`):
add it to the training loss as it is.

Defaults: ``h_s = h // 4`` shared heads and ``k`` routed heads such that about 75% of the heads are on
(``round(0.75 h) - h_s``, at least 1): 12 heads give 3 shared + 6 of 9 routed, the paper's MoH-ViT-S/B
setting. The paper activates 50-90% of the heads.

Cost: the core's over every head (``O(n^2 d)`` for softmax, the registry's figure) plus the routers'
``O(n D h)``.

Implementation: the fast path attends only on the selected ``(token, head)`` pairs where the core allows
it and it is cheaper (:class:`~fastattn.mechanisms.gated.base.HeadGatedAttention`: the shared heads as
usual, the routed heads on the tokens that chose them), else over every head with the unselected pairs
scaled by 0 (as the authors' code does); then the gates scale the head outputs.
:meth:`MoH.reference` is the formula above written per token: an explicit sort of the router
probabilities, the gates, and the sum over heads of ``g_i H^i_t W_O^i``.
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
    "moh", complexity="O(n^2 d + n D h)", causal=True, decoding=True, padding=True,
    attn_mask=True, dropout=True, level="layer",
    time_growth=2.0, memory_growth=2.0,
)
class MoH(HeadGatedAttention):
    """Mixture-of-Head attention: shared heads plus top-k routed heads per token, gated head outputs."""

    returns_core_weights: ClassVar[bool] = False  # the output mixes head outputs by gates: no single attention matrix
    test_options: ClassVar[dict[str, Any]] = {"shared_heads": 2, "active_heads": 2}  # 6 heads: 2 shared, 2 of 4 routed

    @dataclass(frozen=True)
    class Options(HeadGatedAttention.Options):
        shared_heads: int | None = None  # h_s, always on; default num_heads // 4
        active_heads: int | None = None  # k routed heads per token; default round(0.75 h) - h_s, >= 1
        balance_weight: float = 0.01  # weight of the load-balance loss in aux_loss (the paper's beta)
        z_weight: float = 0.0  # weight of the router z-loss in aux_loss

    def __init__(self, options: Any, config: LayerConfig, *, generator: torch.Generator | None = None) -> None:
        super().__init__(options, config, generator=generator)
        h, o = self.num_heads, self.options
        shared = h // 4 if o.shared_heads is None else o.shared_heads
        if not 0 <= shared <= h:
            raise ValueError(f"shared_heads must be in [0, num_heads={h}], got {shared}")
        routed = h - shared
        if o.active_heads is None:
            active = min(routed, max(1, int(0.75 * h + 0.5) - shared)) if routed else 0
        elif routed == 0:
            if o.active_heads != 0:
                raise ValueError(f"all {h} heads are shared: there are no routed heads to activate")
            active = 0
        elif not 1 <= o.active_heads <= routed:
            raise ValueError(
                f"active_heads must be in [1, {routed}] (the {routed} routed heads = num_heads - shared_heads), "
                f"got {o.active_heads}"
            )
        else:
            active = o.active_heads
        self.shared_heads, self.routed_heads, self.active_heads = shared, routed, active
        self.loss_weights = loss_weights(o, "balance", "z")
        fk = {"device": config.device, "dtype": config.dtype}
        d = config.embed_dim
        self.w_route = nn.Linear(d, routed, bias=False, **fk) if routed else None
        self.w_shared = nn.Linear(d, shared, bias=False, **fk) if shared > 1 else None
        self.w_mix = nn.Linear(d, 2, bias=False, **fk) if shared and routed else None

    def extra_repr(self) -> str:
        return super().extra_repr() + (
            f", heads on per token: {self.shared_heads} shared + {self.active_heads} of {self.routed_heads} routed"
        )

    def gates(self, x: Tensor) -> tuple[Tensor, Routing | None]:
        """The gate of every head for every token ``(B, L, H)`` (0 for unselected routed heads), shared
        heads first, and the routing of the routed heads (``None`` when every head is shared)."""
        parts, routing = [], None
        if self.shared_heads:
            if self.w_shared is None:
                shared = x.new_ones(*x.shape[:-1], 1)
            else:
                shared = self.shared_heads * torch.softmax(self.w_shared(x), dim=-1)
            parts.append(shared)
        if self.routed_heads:
            routing = route(self.w_route(x), self.active_heads, gate="softmax", renormalize=True)
            parts.append(self.active_heads * routing.gates)
        if self.w_mix is not None:
            alpha = 2.0 * torch.softmax(self.w_mix(x), dim=-1)
            parts = [parts[0] * alpha[..., :1], parts[1] * alpha[..., 1:]]
        return torch.cat(parts, dim=-1), routing

    def selection(self, x: Tensor) -> Tensor:
        """The shared heads for every token, the top-k routed heads of each token."""
        shared = torch.ones(*x.shape[:-1], self.shared_heads, dtype=torch.bool, device=x.device)
        if not self.routed_heads:
            return shared
        routed = route(self.w_route(x), self.active_heads, gate="softmax", renormalize=True).mask
        return torch.cat([shared, routed], dim=-1)

    def mix(self, x: Tensor, heads: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor | None]:
        g, routing = self.gates(x)
        aux = None
        if self.training and routing is not None:
            aux = router_loss(routing, self.loss_weights, valid)
        return gate_heads(heads, g), aux

    def reference(
        self, x: Tensor, context: Tensor | None = None, value: Tensor | None = None, *,
        key_padding_mask: Tensor | None = None, attn_mask: Tensor | None = None, is_causal: bool = False,
    ) -> Tensor:
        """``O_t = sum_i g_i(x_t) H^i_t W_O^i``, token by token, with the core's reference for ``H``."""
        heads = self.reference_heads(
            x, context, value, key_padding_mask=key_padding_mask, attn_mask=attn_mask, is_causal=is_causal
        )
        e, hs, top = self.head_dim, self.shared_heads, self.active_heads
        w_o = self.out_proj.weight
        rows = []
        for b in range(x.shape[0]):
            for t in range(x.shape[1]):
                xt = x[b, t]
                g = [xt.new_zeros(())] * self.num_heads
                if hs:
                    shared = torch.softmax(self.w_shared.weight @ xt, 0) * hs if hs > 1 else xt.new_ones(1)
                    for i in range(hs):
                        g[i] = shared[i]
                if self.routed_heads:
                    p = torch.softmax(self.w_route.weight @ xt, 0)
                    chosen = torch.argsort(p, descending=True, stable=True)[:top].tolist()
                    total = sum(p[j] for j in chosen)
                    for j in chosen:
                        g[hs + j] = top * p[j] / total
                if hs and self.routed_heads:
                    a = 2.0 * torch.softmax(self.w_mix.weight @ xt, 0)
                    g = [gi * (a[0] if i < hs else a[1]) for i, gi in enumerate(g)]
                out = sum(g[i] * (w_o[:, i * e:(i + 1) * e] @ heads[b, i, t]) for i in range(self.num_heads))
                rows.append(out if self.out_proj.bias is None else out + self.out_proj.bias)
        return torch.stack(rows).view(*x.shape[:2], -1)
