"""GHA: Grouped Head Attention, "Finding the Pillars of Strength for Multi-Head Attention" (Ni, Mao, Yang,
Lei and Cambria, ACL 2023, arXiv:2305.14380).

The forward pass is multi-head attention (any sequence mechanism as the heads: ``core="softmax"`` by
default). What GHA adds is a training signal and a pruning procedure:

* **Group-constrained training** (GCT, the paper's Eq. 3 and 4(B), the metric-learning form its
  experiments use). Each head ``i`` has a feature map ``e_i``: its output before the output projection
  (``feature="output"``, the paper's ``O``) or its values (``feature="value"``, ``V W^V``), over the
  batch's real tokens, flattened. K-means (Eq. 3, squared Euclidean, deterministic farthest-point
  initialisation; :func:`fastattn.ops.cluster.kmeans`) splits the ``h`` heads into ``C`` groups; the
  hidden unit ``z_j`` of group ``j`` is the mean feature map of its heads. The loss

      L_z = alpha / h * sum_i phi(e_i; z_{g(i)})  -  beta / C(C, 2) * sum_{j1 < j2} phi(z_j1; z_j2)

  pulls heads towards their group's unit (homogenisation) and pushes the units apart (diversification);
  ``phi`` is the cosine *distance* ``1 - cos`` (the paper calls it a cosine similarity measurement; only
  the distance makes minimising Eq. 4(B) homogenise, and makes the Voting-to-Stay score ``-phi`` pick the
  head closest to its unit, as the paper intends). ``aux_loss`` is ``L_z`` in training mode (zero in
  eval mode); the paper adds it to the task loss as it is (``L = L_t + L_z``).
* **Voting-to-Stay** (V2S, Algorithm 1): over an epoch of training batches (model frozen), each batch
  votes, in every group, for the head closest to its group's unit (:meth:`GHA.vote` returns a batch's
  0/1 votes and its groups); :meth:`GHA.pillars` keeps, in each group, the head with the most votes (the
  *pillar of strength*); :meth:`GHA.prune` removes every other head (their rows of ``W^Q, W^K, W^V`` and
  columns of ``W^out``), after which the layer is multi-head attention over the kept heads; fine-tune
  after pruning, as the paper does.

With singleton groups (``C = h``) every head is its own unit: the homogenisation term is 0, every head
is a pillar and pruning keeps them all.

Decoding is the core's over the current heads (a KV cache of the kept heads after pruning).

Cost: multi-head attention's, plus in training the k-means over ``h`` points of dimension ``B n d``
(``O(iters h C B n d)``) and the loss.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor, nn

from fastattn.core.checks import repeat_kv
from fastattn.core.layer import LayerConfig, ProjectedAttention, make_core
from fastattn.ops.cluster import cosine_distance, group_means, kmeans
from fastattn.registry import register

FEATURES = ("output", "value")


@register(
    "gha", complexity="O(n^2 d)", causal=True, decoding=True, padding=True,
    attn_mask=True, dropout=True, weights=True, level="layer",
    time_growth=2.0, memory_growth=2.0,
)
class GHA(ProjectedAttention):
    """Multi-head attention trained with a group constraint on its heads (k-means groups, homogenise
    within, diversify between), pruned by Voting-to-Stay to one pillar head per group."""

    test_options: ClassVar[dict[str, Any]] = {"groups": 3}
    deviations: ClassVar[tuple[str, ...]] = (
        "group constraint in the metric-learning form (Eq. 4(B)) only, on one feature map (head outputs or "
        "values; not the attention maps, nor the paper's tau-weighted sum of the three)",
        "phi in Eq. 4(B) is read as the cosine distance 1 - cos (the reading under which the loss "
        "homogenises groups and V2S keeps the most representative head)",
        "pruning removes the heads' weights (the paper masks the head outputs during fine-tuning); "
        "grouped-query layers cannot be pruned",
    )

    @dataclass(frozen=True)
    class Options(ProjectedAttention.Options):
        groups: int = 2  # C, the number of head groups (pillars kept by pruning)
        feature: str = "output"  # the heads' feature map the groups are built on: "output" or "value"
        alpha: float = 1.0  # weight of the homogenisation term
        beta: float = 1.0  # weight of the diversification term
        kmeans_iters: int = 10

    def __init__(self, options: Any, config: LayerConfig, *, generator: torch.Generator | None = None) -> None:
        super().__init__(options, config, generator=generator)
        o = self.options
        if not 1 <= o.groups <= self.num_heads:
            raise ValueError(f"groups must be in [1, num_heads={self.num_heads}], got {o.groups}")
        if o.feature not in FEATURES:
            raise ValueError(f"feature must be one of {FEATURES}, got {o.feature!r}")
        if o.alpha < 0 or o.beta < 0:
            raise ValueError(f"alpha and beta must be >= 0, got {o.alpha}, {o.beta}")
        if o.kmeans_iters < 1:
            raise ValueError(f"kmeans_iters must be >= 1, got {o.kmeans_iters}")
        self.groups = o.groups

    # ---- the group constraint -------------------------------------------------------------------
    def feature_maps(self, heads: Tensor, valid: Tensor | None) -> Tensor:
        """One vector per head ``(H, B * L * E)`` from per-head features ``(B, H, L, E)``, padding
        tokens zeroed."""
        if valid is not None:
            heads = heads * valid[:, None, :, None].to(heads.dtype)
        return heads.transpose(0, 1).reshape(heads.shape[1], -1)

    def group(self, maps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """K-means groups of the heads ``(H,)``, the groups' units ``(C, F)`` (means of their heads'
        maps, differentiable) and which groups are non-empty ``(C,)``."""
        k = min(self.groups, maps.shape[0])
        assign = kmeans(maps, k, self.options.kmeans_iters)
        units, present = group_means(maps, assign, k)
        return assign, units, present

    def group_loss(self, maps: Tensor) -> Tensor:
        """``L_z`` (module docstring) on the heads' feature maps ``(H, F)``."""
        assign, units, present = self.group(maps)
        homogenise = cosine_distance(maps, units[assign]).mean()
        z = units[present]
        c = z.shape[0]
        if c < 2:
            return self.options.alpha * homogenise
        pairs = torch.triu_indices(c, c, offset=1, device=z.device)
        diversify = cosine_distance(z[pairs[0]], z[pairs[1]]).mean()
        return self.options.alpha * homogenise - self.options.beta * diversify

    def _value_maps(self, context: Tensor, value: Tensor | None, valid_keys: Tensor | None) -> Tensor:
        v = self.heads(self.v_proj(context if value is None else value), self.num_kv_heads)
        return self.feature_maps(repeat_kv(v, self.num_heads // self.num_kv_heads), valid_keys)

    def mix(self, x: Tensor, heads: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor | None]:
        aux = None
        if self.training and self.options.feature == "output":
            aux = self.group_loss(self.feature_maps(heads, valid))
        return heads, aux

    def project_loss(
        self, x: Tensor, context: Tensor | None, value: Tensor | None, valid_keys: Tensor | None
    ) -> Tensor | None:
        if self.options.feature != "value":
            return None
        return self.group_loss(self._value_maps(x if context is None else context, value, valid_keys))

    # ---- Voting-to-Stay -------------------------------------------------------------------------
    @torch.no_grad()
    def vote(
        self, x: Tensor, context: Tensor | None = None, value: Tensor | None = None, *,
        key_padding_mask: Tensor | None = None, is_causal: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """One batch's votes (batch-first ``x``): long ``(H,)``, 1 for the head of each group closest to
        its group's unit (cosine distance), 0 elsewhere; and the groups ``(H,)``."""
        valid_keys = None if key_padding_mask is None else ~key_padding_mask
        if self.options.feature == "output":
            q, k, v = self.project(x, context, value)
            heads = self.attend(q, k, v, key_padding_mask=key_padding_mask, is_causal=is_causal)
            maps = self.feature_maps(heads, self._valid_queries(context, key_padding_mask))
        else:
            maps = self._value_maps(x if context is None else context, value, valid_keys)
        assign, units, _ = self.group(maps)
        dist = cosine_distance(maps, units[assign])
        votes = torch.zeros(self.num_heads, dtype=torch.long, device=x.device)
        for j in assign.unique().tolist():
            members = (assign == j).nonzero().flatten()
            votes[members[dist[members].argmin()]] = 1
        return votes, assign

    @staticmethod
    def pillars(votes: Tensor, groups: Tensor) -> list[int]:
        """The head with the most votes in each group (ties: the lower index), in head order. ``votes``
        ``(H,)`` summed over the voting epoch; ``groups`` ``(H,)`` the heads' groups."""
        keep = []
        for j in groups.unique().tolist():
            members = (groups == j).nonzero().flatten()
            keep.append(int(members[votes[members].argmax()]))
        return sorted(keep)

    @torch.no_grad()
    def prune(self, keep: Sequence[int]) -> None:
        """Keep only the heads ``keep`` (e.g. :meth:`pillars`): slices the projections, rebuilds the core
        for ``len(keep)`` heads. Changes the parameter shapes (a pruned layer loads only a pruned
        state dict). Grouped-query layers cannot be pruned."""
        keep = sorted(set(int(i) for i in keep))
        if not keep or keep[0] < 0 or keep[-1] >= self.num_heads:
            raise ValueError(f"keep must list head indices in [0, {self.num_heads}), got {keep}")
        if self.num_kv_heads != self.num_heads:
            raise ValueError("pruning needs one key/value head per query head (num_kv_heads == num_heads)")
        if any(True for _ in self.core.parameters()) or any(True for _ in self.core.buffers()):
            raise ValueError(
                f"core {self.options.core!r} holds per-head parameters or buffers; pruning rebuilds the core, "
                f"so it supports only stateless cores"
            )
        d = self.head_dim
        rows = torch.cat([torch.arange(i * d, (i + 1) * d) for i in keep]).to(self.q_proj.weight.device)
        for name in ("q_proj", "k_proj", "v_proj"):
            old = getattr(self, name)
            new = nn.Linear(old.in_features, len(rows), bias=old.bias is not None,
                            device=old.weight.device, dtype=old.weight.dtype)
            new.weight.copy_(old.weight[rows])
            if old.bias is not None:
                new.bias.copy_(old.bias[rows])
            setattr(self, name, new)
        old = self.out_proj
        new = nn.Linear(len(rows), old.out_features, bias=old.bias is not None,
                        device=old.weight.device, dtype=old.weight.dtype)
        new.weight.copy_(old.weight[:, rows])
        if old.bias is not None:
            new.bias.copy_(old.bias)
        self.out_proj = new
        h = len(keep)
        core_config = replace(self.config, embed_dim=h * d, num_heads=h, num_kv_heads=h, kdim=None, vdim=None)
        self.core = make_core(self.options.core, self.options.core_options, core_config)
        self.num_heads = self.num_kv_heads = h
        self.groups = min(self.groups, h)
