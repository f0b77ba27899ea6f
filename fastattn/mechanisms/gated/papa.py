"""PAPA: "How Much Does Attention Actually Attend? Questioning the Importance of Attention in Pretrained
Transformers" (Hassid, Peng, Rotem, Kasai, Montero, Smith and Schwartz, 2022, arXiv:2211.03495).

PAPA replaces the attention matrix of some heads by a **constant** one: per static head ``h`` a table
``Abar_h (n_max, n_max)``, the average of that head's attention maps over a corpus (calibrated offline,
stored as a buffer, not learned). With the padding mask ``m`` (1 = real token) and, in causal mode, the
lower triangle (bottom-right aligned), the weights are

    A_h = Abar_h[:n, :n] * (m m^T) * tril,      every row renormalised to sum 1 (L1),    out_h = A_h V_h

as the authors' ``mask_and_normalize`` (``schwartz-lab-NLP/papa``, ``papa_modules.py``). A row with no
weight left outputs zeros. A static head's output depends on the values only: never on queries or keys.
The other heads stay dynamic: any sequence mechanism (``core="softmax"`` by default), over those heads
only. ``static_heads`` chooses the constant heads (default: all, the paper's main setting); the paper
picks them by a head-importance order (its ``sorted_heads``).

**Calibration workflow.** Train (or take) a layer with dynamic heads, average its attention maps with
:func:`calibrate` over a corpus -- each position pair averaged over the examples containing it (both
tokens real), absolute positions aligned -- and load them with :meth:`PAPA.load_table` into a PAPA layer
holding the same weights. Before calibration the table is uniform: each static head averages the values
it may see.

Positions: a forward looks up rows and columns at the tokens' absolute positions (query ``i`` of ``Lq``
at ``Lk - Lq + i``); decoding counts positions from each row's first real token, so a left-padded batch
decodes like each row alone. A length above ``max_length`` is a ``ValueError``. A float ``attn_mask``
multiplies the constant weights by ``exp(mask)`` (``-inf`` removes a key), the probability-space form of
adding it to scores.

Cost: ``O(n^2 d)`` per static head (no ``q k^T``; the table lookup and the weighted sum of values), the
core's for the dynamic heads; memory ``O(h_static n_max^2)`` for the tables.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import Tensor

from fastattn.core.checks import build_mask, repeat_kv
from fastattn.core.layer import LayerConfig, ProjectedAttention, make_core
from fastattn.core.state import DecodingState
from fastattn.ops.constant import table_attention
from fastattn.registry import register


class PAPAState(DecodingState):
    """Decoding state of :class:`PAPA`: the static heads' values ``v (B, Hs, L, E)``, which cached tokens
    are padding (``key_padding``, bool ``(B, L)`` or ``None``) and the dynamic heads' core state
    (``core``, ``None`` without dynamic heads)."""

    batched = ("v", "key_padding")

    def __init__(self, v: Tensor, key_padding: Tensor | None, core: Any) -> None:
        self.v, self.key_padding, self.core = v, key_padding, core

    @property
    def length(self) -> int:
        return self.v.shape[2]

    def select(self, index: Tensor | Sequence[int] | int) -> PAPAState:
        out = super().select(index)
        out.core = None if self.core is None else self.core.select(index)
        return out

    def to(self, device: torch.device | str) -> PAPAState:
        out = super().to(device)
        out.core = None if self.core is None else self.core.to(device)
        return out


@register(
    "papa", complexity="O(n^2 d)", causal=True, decoding=True, padding=True,
    attn_mask=True, dropout=True, level="layer",
    time_growth=2.0, memory_growth=2.0,
)
class PAPA(ProjectedAttention):
    """Constant (corpus-average) attention matrices for the static heads, renormalised after masking;
    the other heads dynamic."""

    returns_core_weights: ClassVar[bool] = False
    test_options: ClassVar[dict[str, Any]] = {"static_heads": (1, 2), "max_length": 24}
    deviations: ClassVar[tuple[str, ...]] = (
        "the constant tables start uniform; the paper's averages come from calibrate() on a trained model",
    )

    @dataclass(frozen=True)
    class Options(ProjectedAttention.Options):
        static_heads: tuple[int, ...] | None = None  # the constant heads; default: every head
        max_length: int = 512  # n_max, the size of the constant tables

    def __init__(self, options: Any, config: LayerConfig, *, generator: torch.Generator | None = None) -> None:
        super().__init__(options, config, generator=generator)
        h, o = self.num_heads, self.options
        static = tuple(range(h)) if o.static_heads is None else tuple(sorted(set(o.static_heads)))
        if not static or static[0] < 0 or static[-1] >= h or len(static) != len(tuple(o.static_heads or static)):
            raise ValueError(f"static_heads must be distinct head indices in [0, {h}), got {o.static_heads}")
        if o.max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {o.max_length}")
        self.static = list(static)
        self.dynamic = [i for i in range(h) if i not in static]
        self.order = torch.argsort(torch.tensor(self.dynamic + self.static)).tolist()  # back to head order
        if self.dynamic:  # the core runs over the dynamic heads only
            n = len(self.dynamic)
            core_config = replace(config, embed_dim=n * self.head_dim, num_heads=n, num_kv_heads=n, kdim=None, vdim=None)
            self.core = make_core(o.core, o.core_options, core_config, generator=generator)
        n = o.max_length
        self.register_buffer(
            "table", torch.full((len(static), n, n), 1.0 / n, device=config.device, dtype=config.dtype or torch.float32)
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", static heads: {self.static}"

    @torch.no_grad()
    def load_table(self, table: Tensor) -> None:
        """Set the static heads' tables from ``table (H, n_max, n_max)`` (e.g. :func:`calibrate`'s)."""
        if table.shape != (self.num_heads, *self.table.shape[1:]):
            raise ValueError(f"table must be (num_heads, max_length, max_length) = "
                             f"{(self.num_heads, *self.table.shape[1:])}, got {tuple(table.shape)}")
        self.table.copy_(table[self.static])

    def _split(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Keys and values expanded to every query head: the dynamic heads' ``k, v`` and the static heads' ``v``."""
        groups = self.num_heads // self.num_kv_heads
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        return k[:, self.dynamic], v[:, self.dynamic], v[:, self.static]

    def _merge_heads(self, dynamic: Tensor | None, static: Tensor) -> Tensor:
        heads = static if dynamic is None else torch.cat([dynamic, static], dim=1)
        return heads[:, self.order]

    def _mask_of(self, attn_mask: Tensor | None, heads: list[int]) -> Tensor | None:
        """A per-head ``attn_mask (B, H, Lq, Lk)`` restricted to ``heads``; others unchanged."""
        if attn_mask is not None and attn_mask.dim() == 4 and attn_mask.shape[1] == self.num_heads:
            return attn_mask[:, heads]
        return attn_mask

    def static_mask(
        self, q: Tensor, v: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None, is_causal: bool
    ) -> tuple[Tensor | None, Tensor | None]:
        """What the static heads may see: bool ``allowed`` and float ``bias``, both for the static heads."""
        mask = build_mask(q, v, key_padding_mask, self._mask_of(attn_mask, self.static), is_causal)
        return mask.allowed(v.device), mask.bias

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, reference: bool = False, **masks: Any) -> Tensor:
        lq, lk = q.shape[2], k.shape[2]
        k_dyn, v_dyn, v_static = self._split(k, v)
        dynamic = None
        if self.dynamic:
            dyn_masks = {**masks, "attn_mask": self._mask_of(masks.get("attn_mask"), self.dynamic)}
            dropout_p = self.config.dropout if self.training and not reference else 0.0
            backend = "reference" if reference else self.config.backend
            dynamic = self.core.run(q[:, self.dynamic], k_dyn, v_dyn, dropout_p=dropout_p, backend=backend, **dyn_masks)
        q_static = q[:, self.static]
        allowed, bias = self.static_mask(
            q_static, v_static, masks.get("key_padding_mask"), masks.get("attn_mask"), masks.get("is_causal", False)
        )
        if reference:
            static = self._reference_static(v_static, lq, allowed, bias)
        else:
            pos = torch.arange(lk, device=q.device)
            static, _ = table_attention(self.table, v_static, pos[None, lk - lq:], pos[None], allowed=allowed, bias=bias)
        return self._merge_heads(dynamic, static)

    def _reference_static(self, v: Tensor, lq: int, allowed: Tensor | None, bias: Tensor | None) -> Tensor:
        """``A = Abar[rows, :Lk] * mask``, each row divided by its sum (0 for an empty row), ``out = A V``,
        row by row."""
        b, hs, lk, _ = v.shape
        if lk > self.table.shape[-1]:
            raise ValueError(f"length {lk} is beyond the constant attention table (max_length={self.table.shape[-1]})")
        out = v.new_zeros(b, hs, lq, v.shape[-1])
        for i in range(lq):
            row = self.table[:, lk - lq + i, :lk].to(v.dtype)[None].expand(b, hs, lk)
            if allowed is not None:
                row = row * allowed.expand(b, hs, lq, lk)[:, :, i]
            if bias is not None:
                row = row * torch.exp(bias.to(v.dtype)).expand(b, hs, lq, lk)[:, :, i]
            total = row.sum(-1, keepdim=True)
            row = torch.where(total > 0, row / torch.where(total > 0, total, 1), 0)
            out[:, :, i] = (row[..., None] * v).sum(-2)
        return out

    def step(self, x: Tensor, state: Any, *, key_padding_mask: Tensor | None = None) -> tuple[Tensor, Any]:
        """Decode ``x (B, T, D)``: the dynamic heads by the core's ``step``, the static heads over the
        cached values with positions counted from each row's first real token."""
        if self.dynamic and not self.core.spec.decoding:
            raise ValueError(f"method {self.options.core!r} does not support incremental decoding")
        q, k, v = self.project(x, None, None)
        t = x.shape[1]
        k_dyn, v_dyn, v_static = self._split(k, v)
        dynamic, core_state = None, None
        if self.dynamic:
            dynamic, core_state = self.core.step(
                q[:, self.dynamic], k_dyn, v_dyn, None if state is None else state.core, self.head_dim ** -0.5,
                key_padding_mask,
            )
        old_pad = None if state is None else state.key_padding
        values = v_static if state is None else torch.cat([state.v, v_static], dim=2)
        pad = None
        if old_pad is not None or key_padding_mask is not None:
            n_old = values.shape[2] - t
            pad = torch.cat([
                old_pad if old_pad is not None else x.new_zeros(x.shape[0], n_old, dtype=torch.bool),
                key_padding_mask if key_padding_mask is not None else x.new_zeros(x.shape[0], t, dtype=torch.bool),
            ], dim=1)
        lk = values.shape[2]
        if pad is None:
            k_pos = torch.arange(lk, device=x.device)[None]
            allowed = k_pos[:, None, :] <= k_pos[:, -t:, None]
        else:
            real = ~pad
            k_pos = (real.long().cumsum(1) - 1).clamp_min(0)
            allowed = (k_pos[:, None, :] <= k_pos[:, -t:, None]) & real[:, None, :]
        static, _ = table_attention(self.table, values, k_pos[:, -t:], k_pos, allowed=allowed[:, None])
        heads = self._merge_heads(dynamic, static)
        out, aux = self.output(x, heads, None if key_padding_mask is None else ~key_padding_mask)
        self.aux_loss = self.core.aux_loss if aux is None else self.core.aux_loss + aux
        return out, PAPAState(values, pad, core_state)


@torch.no_grad()
def calibrate(
    layer: Any, batches: Iterable[Tensor | tuple[Tensor, Tensor | None]], *, max_length: int, is_causal: bool = False
) -> Tensor:
    """The corpus-average attention map of every head of ``layer`` (a ``fastattn.MultiheadAttention`` or
    its mechanism, whose core reports attention weights) over ``batches`` of self-attention inputs ``x``
    (batch first) or ``(x, key_padding_mask)``: ``(H, max_length, max_length)``; entry ``(i, j)`` is the
    mean over the examples where both positions are real tokens (0 where none is). Load it into a PAPA
    layer with :meth:`PAPA.load_table`."""
    mech = getattr(layer, "mechanism", layer)
    if not isinstance(mech, ProjectedAttention) or not mech.core.spec.weights:
        raise ValueError("calibrate needs a layer whose attention core reports its attention weights")
    sums = counts = None
    for batch in batches:
        x, kpm = (batch, None) if isinstance(batch, Tensor) else batch
        n = x.shape[1]
        if n > max_length:
            raise ValueError(f"a calibration batch has length {n} > max_length={max_length}")
        q, k, _ = mech.project(x, None, None)
        w = mech.core.attention_weights(q, k, key_padding_mask=kpm, is_causal=is_causal)
        real = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if kpm is None else ~kpm
        pairs = (real[:, :, None] & real[:, None, :]).to(w.dtype)  # (B, n, n)
        if sums is None:
            sums = w.new_zeros(w.shape[1], max_length, max_length)
            counts = w.new_zeros(max_length, max_length)
        sums[:, :n, :n] += (w * pairs[:, None]).sum(0)
        counts[:n, :n] += pairs.sum(0)
    if sums is None:
        raise ValueError("calibrate needs at least one batch")
    return sums / counts.clamp_min(1)
