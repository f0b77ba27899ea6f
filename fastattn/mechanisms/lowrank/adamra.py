"""AdaMRA: Adaptive Multi-Resolution Attention with Linear Complexity (Zhang et al., 2021, arXiv:2108.04962).

The heads see the sequence at several resolutions, coarse to fine: head ``h`` attends over keys and
values average-pooled at rate ``r_h`` (blocks of ``r_h`` positions from position 0, padding excluded,
an all-padding block masked), with kernel (linear) attention::

    A_h(i) = phi(q_i) (phi(Kbar_h)^T Vbar_h) / phi(q_i) . sum_r phi(kbar_{h,r}),   phi(x) = elu(x) + 1

Each query chooses its resolution: a router on the query's representation (the concatenation of its
per-head queries, ``x W_q``) gives weights ``g(i)`` over the heads -- ``routing="soft"``: the softmax;
``"hard"``: the top-1 head only, weighted by its softmax probability (so the router is trained) -- and
head ``h``'s output is ``g_h(i) A_h(i)``; the layer's output projection ``W_o`` then mixes the heads.
O(n d^2) time and memory per head (linear).

Only the abstract of the paper could be consulted here: the pooling (average), the kernel (``elu + 1``,
Katharopoulos et al.), the default rates (``r_h = 2^(H - 1 - h)``, capped at ``max_rate``) and the router
form are this implementation's reading of it, listed as deviations.

No causal form (pooled keys mix the future): ``is_causal=True`` is a ValueError; no decoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from fastattn.core.base import Mechanism
from fastattn.core.masks import Mask
from fastattn.ops.compress import block_compress
from fastattn.ops.features import elu_plus_one
from fastattn.ops.linear.engine import linear_attention
from fastattn.registry import register

__all__ = ["AdaMRA"]

ROUTINGS = ("soft", "hard")


@register(
    "adamra", complexity="O(n d^2)", causal=False, decoding=False, padding=True,
    time_growth=1.0, memory_growth=1.0,
)
class AdaMRA(Mechanism):
    """Heads over average-pooled keys/values at rates coarse to fine, kernel attention, a per-query router."""

    test_options: ClassVar[dict[str, Any]] = {"max_rate": 4}
    heads_independent = False  # each head pools at its own rate; the router reads every head's query
    deviations = (
        (
            "Checked against the abstract only (no PDF or code reachable): average pooling, phi = elu + 1, the "
            "default rates 2^(H-1-h) capped at max_rate and a linear router on the concatenated queries are this "
            "implementation's choices."
        ),
    )

    @dataclass(frozen=True)
    class Options:
        rates: tuple[int, ...] = ()  # r_h per query head; () = 2^(H - 1 - h) capped at max_rate
        max_rate: int = 64  # cap of the default rates
        routing: str = "soft"  # "soft" (softmax over heads) | "hard" (top-1 head, weighted by its probability)
        chunk: int = 64  # chunk of the linear engine

        def __post_init__(self) -> None:
            if any(r < 1 for r in self.rates) or self.max_rate < 1 or self.chunk < 1:
                raise ValueError(f"rates, max_rate and chunk must be >= 1, got {self.rates}, {self.max_rate}, {self.chunk}")
            if self.routing not in ROUTINGS:
                raise ValueError(f"routing must be one of {ROUTINGS}, got {self.routing!r}")

    def __init__(self, options=None, *, head_dim: int, num_heads: int, num_kv_heads: int | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(options, head_dim=head_dim, num_heads=num_heads, num_kv_heads=num_kv_heads)
        o = self.options
        if o.rates and len(o.rates) != num_heads:
            raise ValueError(f"rates needs one rate per head ({num_heads}), got {len(o.rates)}")
        self.rates = tuple(o.rates) or tuple(min(2 ** (num_heads - 1 - h), o.max_rate) for h in range(num_heads))
        self.router = nn.Linear(num_heads * head_dim, num_heads)

    # ---- pieces ---------------------------------------------------------------------------------
    def router_weights(self, q: Tensor) -> Tensor:
        """``g (B, H, Lq)``: each query's weight on each head (soft: sums to 1; hard: one nonzero)."""
        b, h, lq, e = q.shape
        logits = self.router(q.transpose(1, 2).reshape(b, lq, h * e).to(self.router.weight.dtype)).to(q.dtype)
        p = torch.softmax(logits, -1)
        if self.options.routing == "hard":
            p = p * torch.nn.functional.one_hot(p.argmax(-1), h).to(p.dtype)
        return p.transpose(1, 2)

    def _check(self, mask: Mask) -> None:
        mask.require_only("key_padding", op="adamra")

    # ---- the efficient path ---------------------------------------------------------------------
    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, dropout_p: float = 0.0) -> Tensor:
        self._check(mask)
        keep = None if mask.key_padding is None else ~mask.key_padding
        out = q.new_zeros(*q.shape[:3], v.shape[3])
        for rate in sorted(set(self.rates)):
            heads = [h for h, r in enumerate(self.rates) if r == rate]
            kh, vh = k[:, heads], v[:, heads]
            kb, alive = block_compress(kh, keep, rate, "mean")
            vb, _ = block_compress(vh, keep, rate, "mean")
            node_mask = Mask(q.shape[2], kb.shape[2], key_padding=~alive)
            out[:, heads] = linear_attention(elu_plus_one(q[:, heads]), elu_plus_one(kb), vb, node_mask, chunk=self.options.chunk)
        return out * self.router_weights(q).unsqueeze(-1)

    # ---- the formula ----------------------------------------------------------------------------
    def reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
        self._check(mask)
        lk = k.shape[2]
        real = torch.ones(k.shape[0], lk, dtype=torch.bool, device=k.device) if mask.key_padding is None else ~mask.key_padding
        g = self.router_weights(q)
        outs = []
        for h, r in enumerate(self.rates):
            kb, vb, ok = [], [], []
            for start in range(0, lk, r):
                w = real[:, start:start + r].to(k.dtype)  # (B, r)
                cnt = w.sum(1).clamp(min=1)[:, None]
                kb.append((k[:, h, start:start + r] * w[..., None]).sum(1) / cnt)
                vb.append((v[:, h, start:start + r] * w[..., None]).sum(1) / cnt)
                ok.append(w.sum(1) > 0)
            kb, vb, ok = torch.stack(kb, 1), torch.stack(vb, 1), torch.stack(ok, 1)  # (B, m, .)
            sim = elu_plus_one(q[:, h]) @ elu_plus_one(kb).transpose(-1, -2) * ok[:, None, :].to(q.dtype)
            den = sim.sum(-1, keepdim=True)
            a = sim / torch.where(den > 0, den, torch.ones_like(den))
            outs.append(g[:, h, :, None] * (a @ vb))
        return torch.stack(outs, 1)
