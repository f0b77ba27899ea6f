"""LSTMN intra-attention (Cheng, Dong and Lapata, arXiv 1601.06733): an LSTM whose single memory cell is
replaced by a *tape* of every earlier hidden state ``h_i`` and memory ``c_i``; at each step it attends
over the tape (eq. 4-9 of the paper)::

    a_i^t = v^T tanh(W_h h_i + W_x x_t + W_h~ h~_{t-1})        i < t
    s^t   = softmax_i(a^t)
    h~_t  = sum_i s_i^t h_i,   c~_t = sum_i s_i^t c_i
    [i; f; o; c^] = [sigma; sigma; sigma; tanh](W [h~_t; x_t] + b)
    c_t = f * c~_t + i * c^_t,   h_t = o * tanh(c_t)

A layer-level mechanism (``MultiheadAttention(D, H, method="intra")``): ``x (B, L, D) -> h (B, L, D)``,
the hidden tape itself (no output projection, as in the paper). It is a recurrence, so it has only a
causal form (``is_causal=True``) and ``step`` is its natural form; it reads its own tape, so there is no
cross-attention (``context``) and no ``attn_mask``.

Heads (no paper meaning; ``num_heads=1`` is the paper): head ``g`` has its own ``v_g`` over its slice of
the ``attention_dim`` tanh features and its own weights ``s^t_g``, which average its slice of the tapes
(``D / H`` of ``h`` and ``c``); ``num_kv_heads < num_heads`` shares the tape projection ``W_h h_i``
between the heads of a group, as grouped-query attention shares keys.

Padding: a padding token never enters the tape (it is masked out of every later softmax) and does not
advance ``h~``; its own output is 0. The efficient forward hoists every ``x``-dependent projection out
of the loop and projects each tape entry once; the reference recomputes the formula at every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.layer import LayerConfig, LayerMechanism
from ...core.masks import masked_softmax
from ...core.state import DecodingState
from ...registry import register

__all__ = ["IntraAttention", "TapeState"]


class TapeState(DecodingState):
    """The LSTMN's memory: the hidden and memory tapes ``h, c (B, T, D)``, the tape projected once
    (``keys (B, T, Hkv, a)``, ``W_h h_i``), which entries are real tokens (``valid (B, T)``) and the
    last attended hidden summary ``h_tilde (B, D)`` (``h~_{t-1}``)."""

    batched = ("h", "c", "keys", "valid", "h_tilde")

    def __init__(self, h: Tensor, c: Tensor, keys: Tensor, valid: Tensor, h_tilde: Tensor) -> None:
        self.h, self.c, self.keys, self.valid, self.h_tilde = h, c, keys, valid, h_tilde

    @property
    def length(self) -> int:
        return self.h.shape[1]


@register(
    "intra", complexity="O(n^2 d) time, n sequential steps; O(n d) memory (the tapes)", causal=True,
    decoding=True, padding=True, weights=True, level="layer", time_growth=2.0, memory_growth=1.0,
)
class IntraAttention(LayerMechanism):
    """``MultiheadAttention(D, H, method="intra", attention_dim=None)``; see the module docstring.
    ``attention_dim`` (the width of the tanh features, a multiple of ``num_heads``) defaults to ``D``.
    Parameters: ``w_h``, ``w_x``, ``w_h_tilde`` (no biases, as eq. 4), ``v (H, attention_dim / H)``
    and ``gates`` (``[h~_t; x_t] -> 4D``, torch's LSTM gate order ``i, f, c^, o``)."""

    self_attention_only: ClassVar[bool] = True
    test_options: ClassVar[dict[str, Any]] = {"attention_dim": 12}
    deviations = (
        "num_heads > 1 (not in the paper) splits the tanh features and the tapes into heads, each with its "
        "own attention weights; num_heads=1 is the paper's LSTMN. Self-attention only: the paper's shallow "
        "and deep fusion with an encoder are left to the model around the layer.",
    )

    @dataclass(frozen=True)
    class Options:
        attention_dim: int | None = None  # width of the tanh features; None: embed_dim

    def __init__(self, options: Any, config: LayerConfig, *, generator: torch.Generator | None = None) -> None:
        super().__init__(options, config, generator=generator)
        d, h, hkv = config.embed_dim, config.num_heads, config.num_kv_heads
        if config.dropout:
            raise ValueError("method 'intra' has no dropout on its tape weights; use dropout=0")
        a = d if self.options.attention_dim is None else self.options.attention_dim
        if a <= 0 or a % h:
            raise ValueError(f"attention_dim ({a}) must be a positive multiple of num_heads ({h})")
        self.attention_dim, self.feat = a, a // h
        fk = {"device": config.device, "dtype": config.dtype}
        self.w_h = nn.Linear(d, hkv * self.feat, bias=False, **fk)
        self.w_x = nn.Linear(d, a, bias=False, **fk)
        self.w_h_tilde = nn.Linear(d, a, bias=False, **fk)
        self.v = nn.Parameter(torch.empty(h, self.feat, **fk))
        nn.init.uniform_(self.v, -self.feat ** -0.5, self.feat ** -0.5)
        self.gates = nn.Linear(2 * d, 4 * d, bias=config.bias, **fk)

    @property
    def requires_causal(self) -> bool:
        return True

    def dims(self) -> str:
        return super().dims() + f", attention_dim={self.attention_dim}"

    # ---- checks ---------------------------------------------------------------------------------
    def _check(self, context: Tensor | None, value: Tensor | None, attn_mask: Tensor | None, is_causal: bool) -> None:
        self.check_self_attention(context, value)  # its tape is its own input: no cross-attention
        if attn_mask is not None:
            raise ValueError("method 'intra' does not take an attn_mask (its tape is causal by construction)")
        if not is_causal:
            raise ValueError("method 'intra' is a recurrence (LSTMN) with only a causal form: pass is_causal=True")

    def _empty(self, x: Tensor) -> TapeState:
        b, d = x.shape[0], self.embed_dim
        return TapeState(
            x.new_zeros(b, 0, d), x.new_zeros(b, 0, d), x.new_zeros(b, 0, self.num_kv_heads, self.feat),
            torch.zeros(b, 0, dtype=torch.bool, device=x.device), x.new_zeros(b, d),
        )

    # ---- the efficient recurrence ---------------------------------------------------------------
    def _run(
        self, x: Tensor, valid: Tensor | None, state: TapeState, need_weights: bool = False,
    ) -> tuple[Tensor, TapeState, list[Tensor]]:
        """Read ``x (B, T, D)`` after ``state``: the hidden states ``(B, T, D)`` (0 at padding), the new
        state and, with ``need_weights``, each step's weights ``(B, H, length)``."""
        b, t_new, d = x.shape
        hh, e, groups = self.num_heads, self.head_dim, self.num_heads // self.num_kv_heads
        xq = self.w_x(x).view(b, t_new, hh, self.feat)  # W_x x_t for every t at once
        w_gate = self.gates.weight
        xg = F.linear(x, w_gate[:, d:], self.gates.bias)  # the x_t part of the gates, at once
        h_tape, c_tape, keys, ok, h_tilde = state.h, state.c, state.keys, state.valid, state.h_tilde
        outs, weights = [], []
        for t in range(t_new):
            q = xq[:, t] + self.w_h_tilde(h_tilde).view(b, hh, self.feat)  # (B, H, a)
            if h_tape.shape[1]:
                k = keys.repeat_interleave(groups, dim=2) if groups > 1 else keys  # (B, n, H, a)
                energy = (torch.tanh(k + q[:, None]) * self.v).sum(-1).transpose(1, 2)  # (B, H, n)
                bias = torch.zeros_like(ok, dtype=energy.dtype).masked_fill(~ok, float("-inf"))
                s = masked_softmax(energy, bias[:, None])
                h_sum = torch.einsum("bhn,bnhe->bhe", s, h_tape.view(b, -1, hh, e)).reshape(b, d)
                c_sum = torch.einsum("bhn,bnhe->bhe", s, c_tape.view(b, -1, hh, e)).reshape(b, d)
            else:
                s = x.new_zeros(b, hh, 0)
                h_sum, c_sum = x.new_zeros(b, d), x.new_zeros(b, d)
            i, f, g, o = (xg[:, t] + F.linear(h_sum, w_gate[:, :d])).chunk(4, dim=-1)
            c = torch.sigmoid(f) * c_sum + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            real = torch.ones(b, dtype=torch.bool, device=x.device) if valid is None else valid[:, t]
            keep = real[:, None]
            h, c = h * keep, c * keep  # a padding token enters the tape as a masked zero entry
            h_tilde = torch.where(keep, h_sum, h_tilde)
            h_tape = torch.cat([h_tape, h[:, None]], dim=1)
            c_tape = torch.cat([c_tape, c[:, None]], dim=1)
            keys = torch.cat([keys, self.w_h(h).view(b, 1, self.num_kv_heads, self.feat)], dim=1)
            ok = torch.cat([ok, real[:, None]], dim=1)
            outs.append(h)
            if need_weights:
                weights.append(s)
        return torch.stack(outs, dim=1), TapeState(h_tape, c_tape, keys, ok, h_tilde), weights

    def forward(
        self, x: Tensor, context: Tensor | None = None, value: Tensor | None = None, *,
        key_padding_mask: Tensor | None = None, attn_mask: Tensor | None = None, is_causal: bool = False,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        self._check(context, value, attn_mask, is_causal)
        valid = None if key_padding_mask is None else ~key_padding_mask
        out, _, steps = self._run(x, valid, self._empty(x), need_weights)
        self.aux_loss = x.new_zeros(())
        if not need_weights:
            return out, None
        n = x.shape[1]
        full = x.new_zeros(x.shape[0], self.num_heads, n, n)
        for t, s in enumerate(steps):
            full[:, :, t, :t] = s
        return out, full

    def step(self, x: Tensor, state: Any, *, key_padding_mask: Tensor | None = None) -> tuple[Tensor, TapeState]:
        """Read the new tokens ``x (B, T, D)``; ``state`` is ``None`` at the start."""
        if state is not None and not isinstance(state, TapeState):
            raise TypeError(f"method 'intra' needs the TapeState of its previous step, got {type(state).__name__}")
        valid = None if key_padding_mask is None else ~key_padding_mask
        out, state, _ = self._run(x, valid, self._empty(x) if state is None else state)
        self.aux_loss = x.new_zeros(())
        return out, state

    # ---- the paper, literally -------------------------------------------------------------------
    def reference(
        self, x: Tensor, context: Tensor | None = None, value: Tensor | None = None, *,
        key_padding_mask: Tensor | None = None, attn_mask: Tensor | None = None, is_causal: bool = False,
    ) -> Tensor:
        """Eq. 4-9 step by step: at step ``t`` every tape entry is projected again, the softmax is an
        explicit ``exp / sum`` over the real entries ``i < t``, the gates act on ``[h~_t; x_t]``."""
        self._check(context, value, attn_mask, is_causal)
        b, n, d = x.shape
        hh, e, groups = self.num_heads, self.head_dim, self.num_heads // self.num_kv_heads
        real = torch.ones(b, n, dtype=torch.bool, device=x.device) if key_padding_mask is None else ~key_padding_mask
        hs: list[Tensor] = []
        cs: list[Tensor] = []
        h_tilde_prev = x.new_zeros(b, d)
        for t in range(n):
            h_tilde, c_tilde = x.new_zeros(b, d), x.new_zeros(b, d)
            if t:
                tape_h, tape_c = torch.stack(hs, 1), torch.stack(cs, 1)  # (B, t, D)
                query = self.w_x(x[:, t]) + self.w_h_tilde(h_tilde_prev)  # (B, A)
                for g in range(hh):
                    cols = slice(g * self.feat, (g + 1) * self.feat)
                    kv = g // groups
                    w_h = self.w_h.weight[kv * self.feat:(kv + 1) * self.feat]  # this head's rows of W_h
                    a = torch.tanh(tape_h @ w_h.T + query[:, None, cols]) @ self.v[g]  # (B, t)
                    a = a.masked_fill(~real[:, :t], float("-inf"))
                    ex = torch.exp(a - a.max(dim=1, keepdim=True).values.nan_to_num(neginf=0.0))
                    z = ex.sum(1, keepdim=True)
                    s = ex / torch.where(z > 0, z, torch.ones_like(z))
                    part = slice(g * e, (g + 1) * e)
                    h_tilde[:, part] = (s[:, :, None] * tape_h[:, :, part]).sum(1)
                    c_tilde[:, part] = (s[:, :, None] * tape_c[:, :, part]).sum(1)
            i, f, g_, o = self.gates(torch.cat([h_tilde, x[:, t]], dim=-1)).chunk(4, dim=-1)
            c = torch.sigmoid(f) * c_tilde + torch.sigmoid(i) * torch.tanh(g_)
            h = torch.sigmoid(o) * torch.tanh(c)
            keep = real[:, t, None]
            hs.append(h * keep)
            cs.append(c * keep)
            h_tilde_prev = torch.where(keep, h_tilde, h_tilde_prev)
        return torch.stack(hs, 1)
