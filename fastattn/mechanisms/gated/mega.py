"""Mega: Moving Average Equipped Gated Attention (Ma, Zhou, Kong, He, Gui, Neubig, May and Zettlemoyer, 2022,
arXiv:2209.10655), checked against the authors' code (``facebookresearch/mega``,
``fairseq/modules/moving_average_gated_attention.py`` and ``exponential_moving_average.py``).

A whole layer (pre-norm, residual inside) with single-head attention; per token, with ``x`` the layer
input and ``x' = LayerNorm(x)``:

* **Multi-dimensional damped EMA** per channel ``d`` with ``N = ndim`` dimensions: ``p = sigmoid(alpha)``,
  ``q = 1 - p * sigmoid(delta)``; ``h_t = p beta x'_t + q h_{t-1}``, ``ema_t = sum_n gamma / sqrt(N) h_t``
  (:func:`fastattn.ops.ema.damped_ema`, an FFT convolution); ``mx = SiLU(ema + omega * x')``. Padded
  tokens enter the EMA as zeros (else they would leak forward). ``bidirectional=True`` (non-causal only)
  adds a second EMA run backwards over the following tokens (the current one excluded, the authors'
  ``shift``).
* **Gates and projections**: ``v = SiLU(x' W_v)`` (width ``hdim``); ``[u, zr, hx] = mx W_mx``;
  ``u = sigmoid(u)``; ``z, r = SiLU(zr)`` (widths ``zdim``, ``hdim``); ``q = z * gamma_q + beta_q``,
  ``k = z * gamma_k + beta_k``.
* **Single-head attention** within chunks of ``chunk`` tokens (Mega-chunk: a block-diagonal pattern;
  ``chunk=-1``: the whole sequence): ``softmax(q k^T / sqrt(zdim) + b)`` with ``b`` a learned bias per
  relative offset ``j - i``, or the element-wise ``laplace`` / ``relu2`` of ``q k^T / n_i + b``, ``n_i``
  the number of keys query ``i`` may see (padding and causality taken out), those keys weighed by it.
* ``h = SiLU(hx + ((A v) * r) W_h)``; ``out = x + u * (h - x)``.

``num_heads`` must be 1 (the attention is single-head; ``MultiheadAttention(D, 1, method="mega")``), and
the layer is self-attention only (its keys come from the EMA of its own input).

Causal: the EMA is causal by construction; ``is_causal=True`` masks the future inside each chunk. Decoding
(:class:`MegaState`) carries the EMA state ``(B, D, N)`` and the keys and values of the *current chunk*
only: they are dropped when a chunk is complete (the authors delete ``prev_key`` when ``len % chunk ==
0``), so the cache never exceeds ``chunk`` tokens. Positions count each row's real tokens, so a
left-padded batch decodes like each row alone.

The relative-position table has ``2 c - 1`` entries, ``c = chunk``, or ``c = max_length`` with
``chunk=-1``: a longer sequence is then a ``ValueError`` (the table is never extended).

Cost: ``O(n c (zdim + hdim))`` for the attention (``O(n^2 ...)`` with ``chunk=-1``), ``O(n D (N + log n))``
for the EMA, and the projections' ``O(n D (D + zdim + hdim))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastattn.core.checks import check_table_length
from fastattn.core.layer import LayerConfig, LayerMechanism
from fastattn.core.masks import masked_softmax
from fastattn.core.state import DecodingState
from fastattn.ops.ema import damped_ema, damped_ema_recurrence
from fastattn.registry import register

__all__ = ["Mega", "MegaState"]

ATTENTIONS = ("softmax", "laplace", "relu2")
_MU, _SIGMA = math.sqrt(0.5), math.sqrt(0.25 / math.pi)  # laplace: the authors' constants


def _activate(scores: Tensor, kind: str) -> Tensor:
    if kind == "relu2":
        return F.relu(scores).square()
    return 0.5 * (1.0 + torch.erf((scores - _MU) / (_SIGMA * math.sqrt(2.0))))


class MegaState(DecodingState):
    """Mega's decoding state: the EMA's hidden state ``ema (B, D, N)``; the current chunk's keys ``k (B,
    Lc, zdim)`` and values ``v (B, Lc, hdim)`` with their positions ``pos (B, Lc)`` (each row's real-token
    count) and which are real tokens (``real``, bool ``(B, Lc)``); ``count (B,)`` the real tokens seen;
    ``length`` the positions seen (padding included)."""

    batched: ClassVar[tuple[str, ...]] = ("ema", "k", "v", "pos", "real", "count")

    def __init__(
        self, ema: Tensor, k: Tensor, v: Tensor, pos: Tensor, real: Tensor, count: Tensor, length: int
    ) -> None:
        self.ema, self.k, self.v, self.pos, self.real, self.count, self.length = ema, k, v, pos, real, count, length


@register(
    "mega", complexity="O(n c (z + h) + n D (N + log n))", causal=True, decoding=True, padding=True,
    dropout=True, level="layer", time_growth=1.1, memory_growth=1.0,
)
class Mega(LayerMechanism):
    """Damped multi-dimensional EMA of the input, then single-head gated attention in chunks."""

    fixed_heads: ClassVar[int | None] = 1
    self_attention_only: ClassVar[bool] = True
    test_options: ClassVar[dict[str, Any]] = {"zdim": 8, "hdim": 10, "ndim": 3, "chunk": 5}
    deviations: ClassVar[tuple[str, ...]] = (
        (
            "the simple learned relative-position bias only (not the rotary one); no hidden or feature dropout "
            "(attention dropout only); a last chunk shorter than chunk is allowed (the authors' code needs the "
            "length to be a multiple of chunk)"
        ),
    )

    @dataclass(frozen=True)
    class Options:
        zdim: int = 128  # width of the shared query/key representation z
        hdim: int | None = None  # width of the values (and the gate r); default 2 * embed_dim
        ndim: int = 16  # N, the EMA's dimensions per channel (the paper's h)
        chunk: int = 128  # attention chunk c; -1: the whole sequence (then at most max_length tokens)
        attention: str = "softmax"  # "softmax", "laplace" or "relu2"
        max_length: int = 1024  # size of the relative-position table when chunk = -1
        bidirectional: bool = False  # a second, backward EMA (non-causal calls only)
        prenorm: bool = True  # LayerNorm before (True) or after (False) the layer

    def __init__(self, options: Any, config: LayerConfig, *, generator: torch.Generator | None = None) -> None:
        super().__init__(options, config, generator=generator)
        o, d = self.options, config.embed_dim
        hdim = 2 * d if o.hdim is None else o.hdim
        if o.zdim < 1 or hdim < 1 or o.ndim < 1:
            raise ValueError(f"zdim, hdim and ndim must be >= 1, got {o.zdim}, {hdim}, {o.ndim}")
        if o.chunk == 0 or o.chunk < -1:
            raise ValueError(f"chunk must be >= 1 or -1 (the whole sequence), got {o.chunk}")
        if o.max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {o.max_length}")
        if o.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {o.attention!r}")
        self.zdim, self.hdim, self.ndim = o.zdim, hdim, o.ndim
        self.span = o.chunk if o.chunk > 0 else o.max_length  # the relative-position table's reach
        fk = {"device": config.device, "dtype": config.dtype}
        dirs = 2 if o.bidirectional else 1
        self.norm = nn.LayerNorm(d, **fk)
        # the EMA (the authors' initialisation: beta alternates +-1 over the dimensions)
        self.alpha = nn.Parameter(torch.randn(dirs, d, o.ndim, **fk) * 0.2)
        self.delta = nn.Parameter(torch.randn(dirs, d, o.ndim, **fk) * 0.2)
        sign = torch.ones(o.ndim, **fk)
        sign[1::2] = -1.0
        self.beta = nn.Parameter(torch.randn(dirs, d, o.ndim, **fk) * 0.02 + sign)
        self.gamma = nn.Parameter(torch.randn(dirs, d, o.ndim, **fk))
        self.omega = nn.Parameter(torch.randn(d, **fk))
        self.v_proj = nn.Linear(d, hdim, bias=config.bias, **fk)
        self.mx_proj = nn.Linear(d, 2 * d + o.zdim + hdim, bias=config.bias, **fk)
        self.h_proj = nn.Linear(hdim, d, bias=config.bias, **fk)
        for lin in (self.v_proj, self.mx_proj, self.h_proj):
            nn.init.normal_(lin.weight, std=0.02)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        self.qk_gamma = nn.Parameter(torch.randn(2, o.zdim, **fk) * 0.02)
        self.qk_beta = nn.Parameter(torch.zeros(2, o.zdim, **fk))
        self.rel_pos = nn.Parameter(torch.randn(2 * self.span - 1, **fk) * 0.02)

    def dims(self) -> str:
        return f"embed_dim={self.embed_dim}, zdim={self.zdim}, hdim={self.hdim}, ndim={self.ndim}"

    # ---- pieces ---------------------------------------------------------------------------------
    def ema_coefficients(self, direction: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """``(decay q, input weight p beta, output weight gamma / sqrt(N))``, each ``(D, N)``."""
        p = torch.sigmoid(self.alpha[direction])
        q = 1.0 - p * torch.sigmoid(self.delta[direction])
        return q, p * self.beta[direction], self.gamma[direction] * self.ndim ** -0.5

    def _ema(self, xn: Tensor, keep: Tensor | None, state: Tensor | None, *, reference: bool = False) -> tuple[Tensor, Tensor]:
        """``mx = SiLU(EMA(x') + omega x')`` and the forward EMA's state after the last token."""
        run = damped_ema_recurrence if reference else damped_ema
        xz = xn if keep is None else xn * keep[..., None].to(xn.dtype)
        y, h = run(xz, *self.ema_coefficients(0), state)
        if self.options.bidirectional:  # the following tokens, the current one excluded
            q, a, c = self.ema_coefficients(1)
            back, _ = run(xz.flip(1), q, a, c)
            y = y + back.flip(1) - (a * c).sum(-1) * xz
        return F.silu(y + self.omega * xn), h

    def _gates(self, xn: Tensor, mx: Tensor) -> tuple[Tensor, ...]:
        """``u, q, k, v, r, hx`` from the normalised input and the EMA output."""
        d = self.embed_dim
        v = F.silu(self.v_proj(xn))
        u, zr, hx = torch.split(self.mx_proj(mx), [d, self.zdim + self.hdim, d], dim=-1)
        z, r = torch.split(F.silu(zr), [self.zdim, self.hdim], dim=-1)
        qk = z.unsqueeze(-2) * self.qk_gamma + self.qk_beta
        return torch.sigmoid(u), qk[..., 0, :], qk[..., 1, :], v, r, hx

    def _bias(self, offset: Tensor) -> Tensor:
        """The relative-position bias at offsets ``j - i`` (clamped into the table; out-of-reach pairs are
        masked by the caller)."""
        return self.rel_pos[(offset + self.span - 1).clamp(0, 2 * self.span - 2)]

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, bias: Tensor, *, reference: bool) -> Tensor:
        """``A v`` for ``q (..., Lq, z)``, ``k (..., Lk, z)``, ``v (..., Lk, h)``, ``allowed`` bool and
        ``bias`` float broadcastable to ``(..., Lq, Lk)``."""
        s = q @ k.transpose(-1, -2)
        if self.options.attention == "softmax":
            w = masked_softmax((s * self.zdim ** -0.5 + bias).masked_fill(~allowed, float("-inf")))
        else:
            n = allowed.sum(-1, keepdim=True).clamp_min(1).to(s.dtype)
            w = _activate(s / n + bias, self.options.attention) * allowed.to(s.dtype)
        if self.training and self.config.dropout > 0 and not reference:
            w = F.dropout(w, self.config.dropout)
        return w @ v

    def _out(self, x: Tensor, u: Tensor, r: Tensor, hx: Tensor, attn: Tensor) -> Tensor:
        h = F.silu(hx + self.h_proj(attn * r))
        out = torch.addcmul(x, u, h - x)
        return out if self.options.prenorm else self.norm(out)

    def _check(self, context: Tensor | None, value: Tensor | None, attn_mask: Tensor | None, is_causal: bool) -> None:
        self.check_self_attention(context, value)
        if attn_mask is not None:
            raise ValueError("mega does not support attn_mask (it would be ignored); use key_padding_mask / is_causal")
        if is_causal and self.options.bidirectional:
            raise ValueError("a bidirectional mega layer has no causal form (its backward EMA reads the future)")

    def _chunk_length(self, n: int) -> int:
        if self.options.chunk > 0:
            return self.options.chunk
        check_table_length(n, self.options.max_length, "sequence length")
        return n

    # ---- the contract ---------------------------------------------------------------------------
    def forward(
        self, x: Tensor, context: Tensor | None = None, value: Tensor | None = None, *,
        key_padding_mask: Tensor | None = None, attn_mask: Tensor | None = None, is_causal: bool = False,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        self._check(context, value, attn_mask, is_causal)
        b, n, _ = x.shape
        keep = None if key_padding_mask is None else ~key_padding_mask
        xn = self.norm(x) if self.options.prenorm else x
        mx, _ = self._ema(xn, keep, None)
        u, q, k, v, r, hx = self._gates(xn, mx)
        c = self._chunk_length(n)
        nc = -(-n // c)
        extra = nc * c - n  # slots that complete the last chunk: masked keys

        def chunks(t: Tensor) -> Tensor:
            return F.pad(t, (0, 0, 0, extra)).view(b, nc, c, t.shape[-1])

        real = torch.ones(b, n, dtype=torch.bool, device=x.device) if keep is None else keep
        allowed = F.pad(real, (0, extra)).view(b, nc, 1, c)
        pos = torch.arange(c, device=x.device)
        if is_causal:
            allowed = allowed & (pos[None, :] <= pos[:, None])
        attn = self._attend(chunks(q), chunks(k), chunks(v), allowed, self._bias(pos[None, :] - pos[:, None]),
                            reference=False)
        return self._out(x, u, r, hx, attn.reshape(b, nc * c, self.hdim)[:, :n]), None

    def reference(
        self, x: Tensor, context: Tensor | None = None, value: Tensor | None = None, *,
        key_padding_mask: Tensor | None = None, attn_mask: Tensor | None = None, is_causal: bool = False,
    ) -> Tensor:
        """The EMA by its recurrence, the attention over the whole sequence with the chunk structure as a
        mask (query ``i`` sees key ``j`` when both lie in the same chunk, ``j`` is real and, if causal,
        ``j <= i``) and the bias looked up at ``j - i``."""
        self._check(context, value, attn_mask, is_causal)
        n = x.shape[1]
        keep = None if key_padding_mask is None else ~key_padding_mask
        xn = self.norm(x) if self.options.prenorm else x
        mx, _ = self._ema(xn, keep, None, reference=True)
        u, q, k, v, r, hx = self._gates(xn, mx)
        c = self._chunk_length(n)
        i = torch.arange(n, device=x.device)
        allowed = (i[:, None] // c == i[None, :] // c)[None]
        if keep is not None:
            allowed = allowed & keep[:, None, :]
        if is_causal:
            allowed = allowed & (i[None, :] <= i[:, None])
        attn = self._attend(q, k, v, allowed, self._bias(i[None, :] - i[:, None]), reference=True)
        return self._out(x, u, r, hx, attn)

    def step(self, x: Tensor, state: Any, *, key_padding_mask: Tensor | None = None) -> tuple[Tensor, Any]:
        """Decode ``x (B, T, D)`` after ``state`` (``None`` at the start): the EMA from its carried state,
        the new queries against the current chunk's cached keys and the new ones."""
        if self.options.bidirectional:
            raise ValueError("a bidirectional mega layer has no causal form, so it cannot decode")
        b, t, _ = x.shape
        keep = torch.ones(b, t, dtype=torch.bool, device=x.device) if key_padding_mask is None else ~key_padding_mask
        xn = self.norm(x) if self.options.prenorm else x
        mx, ema = self._ema(xn, keep, None if state is None else state.ema)
        u, q, k, v, r, hx = self._gates(xn, mx)
        count = x.new_zeros(b, dtype=torch.long) if state is None else state.count
        pos = count[:, None] + keep.long().cumsum(1) - 1  # each row's real-token positions
        count = count + keep.long().sum(1)
        if self.options.chunk < 0:
            check_table_length(int(count.max()), self.options.max_length, "decoded length")
        if state is not None:
            k, v = torch.cat([state.k, k], 1), torch.cat([state.v, v], 1)
            kpos, real = torch.cat([state.pos, pos], 1), torch.cat([state.real, keep], 1)
        else:
            kpos, real = pos, keep
        c = self.options.chunk if self.options.chunk > 0 else self.options.max_length
        qpos = pos.clamp_min(0)
        allowed = real[:, None, :] & (kpos[:, None, :] <= qpos[:, :, None])
        allowed = allowed & (kpos[:, None, :] // c == qpos[:, :, None] // c)
        attn = self._attend(q, k, v, allowed, self._bias(kpos[:, None, :] - qpos[:, :, None]), reference=False)
        out = self._out(x, u, r, hx, attn)
        # keep only the keys a later token can see: real ones of each row's current chunk
        live = real & (kpos // c == (count // c)[:, None])
        first = int(live.any(0).long().argmax()) if bool(live.any()) else k.shape[1]
        length = t + (0 if state is None else state.length)
        return out, MegaState(ema, k[:, first:], v[:, first:], kpos[:, first:], real[:, first:], count, length)
