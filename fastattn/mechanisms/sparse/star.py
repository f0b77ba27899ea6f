"""Star-Transformer (Guo et al., 2019, arXiv:1902.09113).

Satellite nodes (the tokens) on a ring and one relay node linked to all. One update cycle:
the relay reads every satellite, ``s = softmax(q_s K^T * scale) V`` (its query ``q_s`` learned), then
each satellite attends to its ring neighbours ``i - r .. i + r`` (cyclic: the first and last token are
neighbours), itself, and the relay (whose key is learned), one softmax over all of them:
``out_i = softmax([q_i K_ring(i)^T, q_i k_s] * scale) [V_ring(i); s]``. The paper's short-range
ring plus long-range relay; O(n (r + 1) d). Layer-only (learned relay). Non-causal.

The ring closes over each sequence's own tokens: from its first to its last non-padding position, so a
padded batch gives what the truncated sequences give. In the engine the ring is the plain window
``|i - j| <= r`` plus, as extra nodes, the first and last ``r`` tokens of each sequence (the only keys a
wrap-around edge can reach), each allowed where its cyclic distance is ``<= r`` and its linear one is not.

Deviations from the paper (see ``deviations``): the paper's cycle updates the satellites from the
relay of the *previous* step ``s^(t-1)`` and then the relay from the updated satellites (and itself);
one attention call has no previous relay state, so here the relay reads this call's satellites first
and the satellites read that relay. The relay has no value of its own: it does not attend to itself,
and the satellites do not see the token embeddings ``e_i`` beside their neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fastattn.ops.softmax.dense import dense_attention
from fastattn.core.masks import Mask
from fastattn.registry import register
from .base import PatternMechanism, check_positive
from fastattn.ops.sparse.nodes import MemoryNodes, Nodes
from fastattn.ops.sparse.patterns import Pattern, Window


def sequence_span(mask: Mask, batch: int, lk: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """First and one-past-last non-padding key position of each sequence, ``(B,)`` each (a sequence
    that is all padding gets the empty span ``(0, 0)``)."""
    if mask.key_padding is None:
        start = torch.zeros(batch, dtype=torch.long, device=device)
        return start, torch.full_like(start, lk)
    real = ~mask.key_padding.to(device)
    pos = torch.arange(lk, device=device)
    start = torch.where(real, pos, lk).min(1).values
    end = torch.where(real, pos + 1, 0).max(1).values
    return torch.where(end > 0, start, 0), end


@register("star", complexity="O(n r d)", causal=False, decoding=False, padding=True, time_growth=1.0, memory_growth=1.0)
class StarAttention(PatternMechanism):
    """Ring of satellites (radius ``radius``) plus one learned relay node."""

    test_options = {"radius": 2, "block": 8}
    heads_independent = False  # a per-head relay node
    deviations = (
        (
            "The relay reads this call's satellites before they read it (the paper: satellites read the "
            "previous step's relay); the relay does not attend to itself."
        ),
        "Satellites do not attend to their token embedding e_i (an attention call has no embeddings).",
    )

    @dataclass(frozen=True)
    class Options:
        radius: int = 1  # ring neighbours on each side (the paper: 1)
        block: int = 64  # engine block size (speed only)

        def __post_init__(self) -> None:
            check_positive(radius=self.radius, block=self.block)

    def __init__(self, options=None, **kw) -> None:
        super().__init__(options, **kw)
        self.relay = MemoryNodes(self.num_heads, 1, self.head_dim)

    def pattern(self, lq: int, lk: int, device: torch.device) -> Pattern:
        return Pattern(self.options.block, (Window(self.options.radius),))

    def nodes(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float | None = None) -> Nodes | None:
        """The relay, then the wrap-around nodes: the first and the last ``r`` tokens of each sequence."""
        relay = self.relay.read(k, v, mask, q.shape[-1] ** -0.5 if scale is None else scale)
        r, (b, h, lk, _), dev = self.options.radius, k.shape, k.device
        start, end = sequence_span(mask, b, lk, dev)
        ar = torch.arange(r, device=dev)
        wpos = torch.cat([start[:, None] + ar, end[:, None] - r + ar], 1)  # (B, 2r)
        ok = torch.cat([start[:, None] + ar < end[:, None], end[:, None] - r + ar >= start[:, None] + r], 1)
        ok &= (wpos >= 0) & (wpos < lk)
        wpos = wpos.clamp(0, lk - 1)
        if mask.key_padding is not None:
            ok &= ~torch.gather(mask.key_padding.to(dev), 1, wpos)
        dt = relay.k.dtype
        idx = wpos[:, None, :, None].expand(b, h, 2 * r, 1)
        wk = torch.gather(k.to(dt), 2, idx.expand(-1, -1, -1, k.shape[3]))
        wv = torch.gather(v.to(dt), 2, idx.expand(-1, -1, -1, v.shape[3]))
        length = end - start

        def allow(qpos: Tensor) -> Tensor:
            view = (b, 1) + (1,) * (qpos.dim() - 1)
            rel_q = qpos[None, None] - start.view(*view, 1)  # (B, 1, ..., 1)
            n = length.view(*view, 1)
            d = (rel_q - (wpos - start[:, None]).view(*view, 2 * r)).abs()
            wrap = (d > r) & (n - d <= r) & (rel_q >= 0) & (rel_q < n) & ok.view(*view, 2 * r)
            return torch.cat([torch.ones_like(wrap[..., :1]), wrap], -1)

        return Nodes(torch.cat([relay.k, wk], 2), torch.cat([relay.v, wv], 2), allow)

    def dense_mask(self, lq: int, lk: int, causal: bool = False, device: torch.device | str = "cpu") -> Tensor:
        """The ring (wrap-around edges included) on an unpadded sequence, bool ``(Lq, Lk)``; the relay is
        not included."""
        if causal:
            raise ValueError("star has no causal form")
        qpos = torch.arange(lk - lq, lk, device=device)[:, None]
        d = (qpos - torch.arange(lk, device=device)[None, :]).abs()
        return torch.minimum(d, lk - d) <= self.options.radius

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
        """Literally: the cyclic distance on each sequence's own span, plus the relay, one softmax."""
        dt, dev = q.dtype, q.device
        b, lk, r = q.shape[0], k.shape[2], self.options.radius
        relay = self.relay.read(k, v, mask, scale)
        start, end = sequence_span(mask, b, lk, dev)
        qpos = (mask.offset + torch.arange(mask.lq, device=dev))[None, :, None] - start[:, None, None]
        kpos = torch.arange(lk, device=dev)[None, None, :] - start[:, None, None]
        n = (end - start)[:, None, None]
        d = (qpos - kpos).abs()
        inside = (qpos >= 0) & (qpos < n) & (kpos >= 0) & (kpos < n)
        ring = (d <= r) | (inside & (n - d <= r))
        if mask.key_padding is not None:
            ring &= ~mask.key_padding[:, None, :]
        allowed = torch.cat([ring, torch.ones_like(ring[..., :1])], -1)[:, None]  # (B, 1, Lq, Lk + 1)
        bias = torch.zeros(allowed.shape, dtype=dt, device=dev).masked_fill(~allowed, float("-inf"))
        kk = torch.cat([k.to(dt), relay.k.to(dt)], 2)
        vv = torch.cat([v.to(dt), relay.v.to(dt)], 2)
        out = dense_attention(q.to(dt), kk, vv, Mask(mask.lq, lk + 1), scale, extra_bias=bias)
        return out.to(q.dtype)
