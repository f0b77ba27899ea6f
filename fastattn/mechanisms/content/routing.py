"""Routing attention, "Efficient Content-Based Sparse Attention with Routing Transformers" (Roy, Saffar,
Vaswani and Grangier, 2021, arXiv:2003.05997).

Online spherical k-means: ``C`` unit centroids per head ``mu (H, C, E)``, a buffer drawn from
``generator`` at construction. A query or key ``x`` belongs to cluster ``c(x) = argmax_c mu_c . x^``
(``x^ = x / |x|``); query ``i`` attends, with ordinary softmax scores ``scale q_i . k_j``, to keys of its
own cluster only -- the ``window`` keys of its cluster nearest in the cluster's position order (causal:
the last ``window`` keys ``j <= i`` of its cluster), on the bucketed engine (:mod:`fastattn.ops.bucketed`,
label-window mode). A query whose cluster has no visible key outputs zeros.

Training (``module.train()`` with gradients enabled, never in :meth:`step`): after each forward the
centroids move towards the mean of their members, ``mu <- normalise(decay mu + (1 - decay) mean(x^))``
(no gradient; queries and real keys of the whole batch), and ``aux_loss`` is the commitment loss
``commitment * mean |x^ - mu_{c(x)}|^2`` (add it to the training loss). Evaluation leaves the
centroids alone and ``aux_loss`` is zero.

Causal form: the assignment is per token and the window counts past keys only, so the future never
changes the past (the paper's balanced top-``w`` membership is not causal: a future token nearer a
centroid evicts a past key). Decoding: the KV cache, the new queries over it with frozen centroids.
Cost ``O(n w d + n C d)`` time, ``O(n w)`` memory (``w`` = ``window``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fastattn.core.base import Mechanism
from fastattn.core.masks import Mask
from fastattn.ops.bucketed import bucketed_attention, bucketed_reference, selection_mask
from fastattn.registry import register


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


@register(
    "routing", complexity="O(n w d + n C d)", causal=True, decoding=True, padding=True, randomized=True,
    time_growth=1.1, memory_growth=1.0,
)
class Routing(Mechanism):
    """Attention within online k-means clusters of queries and keys (argmax membership, bounded window)."""

    test_options = {"clusters": 3, "window": 24}
    heads_independent = False  # per-head centroids
    discontinuous = True  # a token changes cluster under rounding: half-precision contract compares per-row medians
    deviations = (
        "Membership is the argmax centroid of every token (causal-safe) with a window of the cluster's "
        "nearest keys, not the paper's balanced top-w tokens per centroid.",
        "Centroids start as random unit vectors from the generator, not from the first batch.",
        "A query whose cluster has no visible key outputs zeros (the peer adds a learned null key).",
    )

    @dataclass(frozen=True)
    class Options:
        clusters: int = 64  # C (the paper: about sqrt(n))
        window: int = 256  # keys of its cluster a query sees (the paper: about n / C); >= 2n: the whole cluster
        decay: float = 0.999  # EMA decay of the centroids
        commitment: float = 1e-4  # weight of the commitment loss in aux_loss

        def __post_init__(self) -> None:
            if self.clusters < 1 or self.window < 1:
                raise ValueError(f"routing: clusters and window must be >= 1, got {self.clusters}, {self.window}")
            if not 0.0 <= self.decay < 1.0 or self.commitment < 0:
                raise ValueError(f"routing: need 0 <= decay < 1 and commitment >= 0, got {self.decay}, {self.commitment}")

    def __init__(self, options=None, *, head_dim: int, num_heads: int, num_kv_heads: int | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(options, head_dim=head_dim, num_heads=num_heads, num_kv_heads=num_kv_heads)
        mu = torch.randn(num_heads, self.options.clusters, head_dim, generator=generator, dtype=torch.float64)
        self.register_buffer("centroids", _unit(mu).float())
        self._frozen = False

    def assign(self, x: Tensor) -> Tensor:
        """Cluster ids ``(B, H, L)`` of ``x (B, H, L, E)``."""
        return torch.einsum("bhle,hce->bhlc", _unit(x.detach()), self.centroids.to(x.dtype)).argmax(-1)

    def _labels(self, q: Tensor, k: Tensor, mask: Mask) -> tuple[Tensor, Tensor]:
        hq, hk = self.assign(q), self.assign(k)
        if self.training and torch.is_grad_enabled() and not self._frozen:
            self._learn(q, k, hq, hk, mask)
        else:
            self.aux_loss = torch.zeros((), device=q.device)
        return hq[None], hk[None]

    def _learn(self, q: Tensor, k: Tensor, hq: Tensor, hk: Tensor, mask: Mask) -> None:
        """The commitment loss (``aux_loss``) and the EMA step of the centroids over the real tokens."""
        keep = mask.key_keep(q.dtype)
        kw = torch.ones(k.shape[:3], dtype=q.dtype, device=q.device) if keep is None else keep[..., 0].expand(k.shape[:3])
        mu = self.centroids.to(q.dtype)
        xs, labels = (_unit(q), _unit(k)), (hq, hk)
        weights = (torch.ones(q.shape[:3], dtype=q.dtype, device=q.device), kw)
        loss, total = q.new_zeros(()), q.new_zeros(())
        sums = torch.zeros_like(mu)
        counts = mu.new_zeros(mu.shape[:2])
        for x, lab, w in zip(xs, labels, weights):
            near = mu[torch.arange(mu.shape[0], device=q.device)[None, :, None], lab]  # (B, H, L, E)
            loss = loss + (((x - near) ** 2).sum(-1) * w).sum()
            total = total + w.sum()
            with torch.no_grad():
                oh = torch.nn.functional.one_hot(lab, mu.shape[1]).to(q.dtype) * w[..., None]  # (B, H, L, C)
                sums += torch.einsum("bhlc,bhle->hce", oh, x.detach())
                counts += oh.sum((0, 2))
        self.aux_loss = self.options.commitment * loss / total.clamp_min(1)
        with torch.no_grad():
            d = self.options.decay
            moved = _unit(d * mu + (1 - d) * sums / counts.clamp_min(1)[..., None])
            self.centroids.copy_(torch.where(counts[..., None] > 0, moved, mu).to(self.centroids.dtype))

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, dropout_p: float = 0.0) -> Tensor:
        hq, hk = self._labels(q, k, mask)
        return bucketed_attention(q, k, v, hq, hk, self.options.clusters, mask, scale, chunk=1,
                                  window=self.options.window, dedup=False, same_label=True)

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
        hq, hk = self._labels(q, k, mask)
        allowed = selection_mask(hq, hk, self.options.clusters, mask, chunk=1, window=self.options.window,
                                 same_label=True)
        return bucketed_reference(q, k, v, allowed, mask, scale, dedup=False)

    def step(self, q: Tensor, k: Tensor, v: Tensor, state: Any, scale: float,
             key_padding_mask: Tensor | None = None) -> tuple[Tensor, Any]:
        """Decoding with frozen centroids (no EMA step, whatever the mode)."""
        self._frozen = True
        try:
            return super().step(q, k, v, state, scale, key_padding_mask)
        finally:
            self._frozen = False
