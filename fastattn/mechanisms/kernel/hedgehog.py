"""Hedgehog (Zhang et al., 2024, arXiv:2402.04347): "The Hedgehog & the Porcupine: Expressive Linear
Attentions with Softmax Mimicry".

A learnable feature map per head (separate ones for queries and keys)::

    z = W x + b,   phi(x) = [softmax(z), softmax(-z)]      (2d features; W initialised to the identity)

-- the paper writes ``[exp(z), exp(-z)]``; the authors' code (followed here) normalises each half by
its own softmax over the d features, which keeps the features bounded. Each half of a token's features
is divided by a factor of that token alone, so the causal form leaks nothing -- but the two factors
differ, so this is not a rescaling of the paper's map: it is the kernel the released models were trained
with. ``softmax="joint"`` gives one softmax over all 2d features, ``softmax([z, -z])`` (the default
before): a rescaling of the paper's map by one factor per token, which cancels for queries but not for
keys (it divides each key by a key-dependent factor). Linear attention over ``phi``: O(n d^2). The maps
are trained to mimic softmax attention: with ``distill=True`` every forward sets ``self.aux_loss`` to the
mean KL divergence ``KL(softmax(q k^T * scale) || A_phi)`` over query rows, where ``A_phi`` is the
row-normalised ``phi(q) phi(k)^T`` (same masks). The loss sees detached ``q, k`` (it trains the feature
maps only, as in the paper's distillation stage) and costs O(n^2) -- it is opt-in. The learned maps
make this mechanism layer-only.

``window=w`` (LoLCATs, Zhang et al., 2024, arXiv:2410.10254, the same authors' follow-up): each query
reads its last ``w`` keys (non-causal: the band ``|i - j| < w``) with softmax scores and all older ones
through the feature maps, under one normaliser (:mod:`fastattn.ops.linear.window`)::

    y_i = [sum_win g e^{s_ij - m_i} v_j + sum_older phi(q_i).phi(k_j) v_j]
          / [sum_win g e^{s_ij - m_i} + sum_older phi(q_i).phi(k_j)]

``m_i`` the row maximum of the window scores, ``g = sigmoid(window_factor)`` a learned per-head factor on
the window term, initialised to 0.1 (the authors' released configs: logit -2.197, the linear term unscaled).
O(n w d + n d^2); decoding keeps the linear state of keys that left the window plus a ring of the last ``w``
keys / values. Attention transfer follows each paper (``mimicry="auto"``): Hedgehog's KL of weights without
a window; with one, LoLCATs' mean squared error between the hybrid's output and softmax attention's
(``mimicry="kl"`` instead compares the softmax weights with the hybrid's normalised weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

import math

from fastattn.core.base import repeat_kv
from fastattn.core.masks import Mask, masked_softmax
from fastattn.ops.softmax.dense import dense_attention
from fastattn.ops.linear.window import (
    WindowLinearState, dense_window_linear_attention, dense_window_linear_weights, window_linear_attention,
)
from fastattn.registry import register
from .base import KernelMechanism

__all__ = ["Hedgehog"]


@register("hedgehog", complexity="O(n d^2); O(n (d^2 + w d)) with window=w", causal=True, decoding=True, padding=True, time_growth=1.0, memory_growth=1.0)
class Hedgehog(KernelMechanism):
    """Learned softmax-mimicking feature maps ``[softmax(Wx + b), softmax(-(Wx + b))]``."""

    test_options = {"chunk": 16}
    heads_independent = False  # per-head learned feature maps
    deviations = (
        (
            "Feature map as in the authors' code, [softmax(z), softmax(-z)] (each half normalised), not the "
            "paper's [exp(z), exp(-z)]; softmax='joint' gives one softmax over both halves."
        ),
        (
            "window > 0 (LoLCATs) on encoders: LoLCATs defines the causal hybrid only; non-causal here takes "
            "the band |i - j| < window for the softmax term and linear attention on both sides of it."
        ),
    )

    @dataclass(frozen=True)
    class Options:
        distill: bool = False  # compute the mimicry loss (KL to softmax weights) as aux_loss
        chunk: int = 128  # chunk length of the causal scan
        softmax: str = "halves"  # halves: [softmax(z), softmax(-z)] (authors) | joint: softmax([z, -z])
        window: int = 0  # > 0: LoLCATs -- softmax over the last `window` keys, linear attention before them
        # the attention-transfer loss: kl (weights, Hedgehog) | mse (outputs, LoLCATs) | auto (mse iff window)
        mimicry: str = "auto"

        def __post_init__(self) -> None:
            if self.mimicry not in ("auto", "kl", "mse"):
                raise ValueError(f"mimicry must be 'auto', 'kl' or 'mse', got {self.mimicry!r}")
            if self.window < 0:
                raise ValueError(f"window must be >= 0 (0: no softmax window), got {self.window}")
            if self.chunk < 1:
                raise ValueError(f"chunk must be >= 1, got {self.chunk}")
            if self.softmax not in ("halves", "joint"):
                raise ValueError(f"softmax must be 'halves' or 'joint', got {self.softmax!r}")

    def __init__(self, options=None, **kw) -> None:
        super().__init__(options, **kw)
        h, d = self.num_heads, self.head_dim
        eye = torch.eye(d).expand(h, d, d)
        self.q_weight = nn.Parameter(eye.clone())
        self.q_bias = nn.Parameter(torch.zeros(h, d))
        self.k_weight = nn.Parameter(eye.clone())
        self.k_bias = nn.Parameter(torch.zeros(h, d))
        if self.options.window:  # g = sigmoid(window_factor), 0.1 at init (LoLCATs' released configs)
            self.window_factor = nn.Parameter(torch.full((h,), math.log(0.1 / 0.9)))

    @property
    def mimics_weights(self) -> bool:
        """True when attention transfer compares weights (:meth:`mimicry_loss`), False when it compares
        outputs with softmax attention's (:meth:`output_mimicry_loss`)."""
        m = self.options.mimicry
        return m == "kl" or (m == "auto" and not self.window)

    @property
    def window(self) -> int:
        return int(self.options.window)

    def window_weight(self, dtype: torch.dtype) -> Tensor:
        """The window term's per-head factor ``g = sigmoid(window_factor)`` ``(H,)``."""
        return torch.sigmoid(self.window_factor.to(dtype))

    def features(self, x: Tensor, *, is_query: bool, scale: float, mask: Mask) -> Tensor:
        dt = x.dtype
        w, b = (self.q_weight, self.q_bias) if is_query else (self.k_weight, self.k_bias)
        z = torch.einsum("bhld,hed->bhle", x.to(dt), w.to(dt)) + b.to(dt)[:, None]
        if self.options.softmax == "joint":
            return torch.softmax(torch.cat([z, -z], dim=-1), dim=-1)
        return torch.cat([torch.softmax(z, dim=-1), torch.softmax(-z, dim=-1)], dim=-1)

    def mimicry_loss(self, q: Tensor, k: Tensor, mask: Mask, scale: float) -> Tensor:
        """Mean over (unmasked) query rows of ``KL(softmax weights || Hedgehog weights)``."""
        dt = q.dtype
        q, k = q.detach().to(dt), k.detach().to(dt)
        s = torch.matmul(q, k.transpose(-1, -2)) * scale
        teacher = masked_softmax(s, mask.additive(dt, q.device))
        fq = self.features(q, is_query=True, scale=scale, mask=mask)
        fk = self.features(k, is_query=False, scale=scale, mask=mask)
        if self.window:  # the hybrid's weights (masked already)
            a = dense_window_linear_weights(q, k, fq, fk, mask, window=self.window, scale=scale,
                                            weight=self.window_weight(dt))
        else:
            a = torch.matmul(fq, fk.transpose(-1, -2))
            allowed = mask.allowed(q.device)
            if allowed is not None:
                a = a * allowed.to(a.dtype)
        student = a / a.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(dt).tiny)
        tiny = torch.finfo(dt).tiny
        kl = (teacher * (torch.log(teacher.clamp_min(tiny)) - torch.log(student.clamp_min(tiny)))).sum(-1)
        rows = teacher.sum(-1) > 0  # rows with at least one visible key
        return (kl * rows).sum() / rows.sum().clamp_min(1)

    def output_mimicry_loss(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
        """Mean squared error between this mechanism's output and softmax attention's on detached
        ``q, k, v`` (LoLCATs' attention transfer), over the queries that see a key."""
        q, k, v = q.detach(), k.detach(), v.detach()
        with torch.no_grad():
            teacher = dense_attention(q, k, v, mask, scale)
        err = ((self.forward_hybrid(q, k, v, mask, scale) - teacher) ** 2).mean(-1)
        allowed = mask.allowed(q.device)
        rows = torch.ones_like(err) if allowed is None else allowed.any(-1).to(err.dtype).expand_as(err)
        return (err * rows).sum() / rows.sum().clamp_min(1)

    def forward_hybrid(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
        if not self.window:
            return super().forward(q, k, v, mask, scale)
        fq = self.features(q, is_query=True, scale=scale, mask=mask)
        fk = self.features(k, is_query=False, scale=scale, mask=mask)
        return window_linear_attention(q, k, fq, fk, v, mask, window=self.window, scale=scale,
                                       weight=self.window_weight(q.dtype), chunk=self.chunk)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, dropout_p: float = 0.0) -> Tensor:
        if self.options.distill:
            self.aux_loss = (self.mimicry_loss(q, k, mask, scale) if self.mimics_weights
                             else self.output_mimicry_loss(q, k, v, mask, scale))
        return self.forward_hybrid(q, k, v, mask, scale)

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
        if not self.window:
            return super().reference(q, k, v, mask, scale)
        fq = self.features(q, is_query=True, scale=scale, mask=mask)
        fk = self.features(k, is_query=False, scale=scale, mask=mask)
        return dense_window_linear_attention(q, k, fq, fk, v, mask, window=self.window, scale=scale,
                                             weight=self.window_weight(q.dtype))

    def step(self, q: Tensor, k: Tensor, v: Tensor, state, scale: float, key_padding_mask: Tensor | None = None):
        if not self.window:
            return super().step(q, k, v, state, scale, key_padding_mask)
        if state is not None and not isinstance(state, WindowLinearState):
            raise ValueError(f"hedgehog with window={self.window} continues a WindowLinearState, got "
                             f"{type(state).__name__}")
        dtype = q.dtype
        q, k, v = self.upcast(q, k, v)
        groups = q.shape[1] // k.shape[1]
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)  # per-head feature maps
        mask = Mask(lq=q.shape[2], lk=k.shape[2], key_padding=key_padding_mask, causal=True)
        fq = self.features(q, is_query=True, scale=scale, mask=mask)
        fk = self.features(k, is_query=False, scale=scale, mask=mask)
        out, new_state = window_linear_attention(q, k, fq, fk, v, mask, window=self.window, scale=scale,
                                                 weight=self.window_weight(q.dtype), chunk=self.chunk,
                                                 state=state, return_state=True)
        return out.to(dtype), new_state
