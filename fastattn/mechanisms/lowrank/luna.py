"""Luna: Linear Unified Nested Attention (Ma et al., 2021, arXiv:2106.01540), checked against the authors'
code (``facebookresearch/mega``, ``fairseq/modules/luna_attention.py``).

A layer-level mechanism: besides the input ``x (n x D)`` it owns an extra sequence ``P (l x D)`` -- here a
learned per-layer parameter (the drop-in form; in the paper's stack ``P`` is the previous layer's packed
output, which :meth:`LunaAttention.pack` returns for that use). Keys and values are tied (``tie_kv``).

* Pack (``pack_heads`` heads of width ``D / pack_heads``): ``Y_P = softmax(s' (P W_pq)(C W_pc)^T)
  (C W_pc)``, ``l x D``, where ``C`` is the context (``x`` in self-attention; with a ``value`` input the
  values are ``value W_pc``, or ``value W_pv`` when the value width differs from the key width).
* Unpack: ``out = softmax(s (X W_q)(Y_P W_c)^T)(Y_P W_c) W_o``. O(n l D) time and memory.
* Causal (self-attention only; a different formula, not a mask -- the non-causal pack would leak the
  future): pack weights ``pi_j = softplus_beta((x_j W_pc) . s p_l)`` with ``beta = ln 2`` (so
  ``softplus(0) = 1``), ``a_t = (1 / t) sum_{j <= t} (s q_t . k_j) pi_j`` (``k_j = x_j W_c``),
  ``A_t = softmax(a_t)`` over the ``l`` packed positions, ``out_t = (1 / t) sum_{j <= t} (A_t . pi_j)
  v_j`` (``v_j = k_j``). The efficient path keeps running sums ``K = sum k_j pi_j^T (d x l)``,
  ``V = sum pi_j v_j^T (l x d)`` as the states of two unnormalised causal linear attentions (``a_t = q_t K_t``:
  keys ``k``, values ``pi``; ``out_t = A_t V_t``: keys ``pi``, values ``v``) on the tiled kernel of
  ``fastattn.ops.linear``, so no ``n x d x l`` prefix sums are formed; decoding carries them and ``t``
  (:class:`LunaState`). With padding, ``t`` counts real tokens and padded ``pi_j`` are zero, so a
  padded row decodes as if alone.
* Grouped-query heads: ``W_c`` has ``Hkv`` heads, repeated over the query heads. The causal form needs
  ``pack_heads == num_heads`` (the pack weights are per unpack head).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastattn.core.base import repeat_kv
from fastattn.core.layer import LayerMechanism
from fastattn.core.masks import Mask, masked_softmax
from fastattn.core.state import DecodingState
from fastattn.ops.linear.engine import linear_attention
from fastattn.ops.linear.state import LinearState
from fastattn.ops.softmax.dense import dense_attention
from fastattn.registry import register

__all__ = ["LunaAttention", "LunaState"]

BETA = math.log(2.0)


class LunaState(DecodingState):
    """Causal Luna's decoding state: ``key_sum (B, H, d, l)`` = ``sum_j k_j pi_j^T``, ``value_sum
    (B, H, l, d)`` = ``sum_j pi_j v_j^T`` and ``count (B,)`` real tokens so far; ``length`` positions."""

    batched: ClassVar[tuple[str, ...]] = ("key_sum", "value_sum", "count")

    def __init__(self, key_sum: Tensor, value_sum: Tensor, count: Tensor, length: int) -> None:
        self.key_sum, self.value_sum, self.count, self.length = key_sum, value_sum, count, length


@register(
    "luna", complexity="O(n l D)", causal=True, decoding=True, padding=True, level="layer",
    time_growth=1.0, memory_growth=1.0,
)
class LunaAttention(LayerMechanism):
    """Pack the input into ``l`` positions with a learned sequence ``P``, attend to the packed sequence."""

    test_options: ClassVar[dict[str, Any]] = {"pack_length": 4, "chunk": 5}
    deviations = (
        (
            "P is a learned per-layer parameter (the drop-in form); the paper propagates each layer's packed "
            "output to the next layer, available here through LunaAttention.pack but not threaded by the layer."
        ),
    )

    @dataclass(frozen=True)
    class Options:
        pack_length: int = 16  # l: length of the packed sequence P
        pack_heads: int = 0  # heads of the pack attention (0: the layer's heads)
        chunk: int = 64  # causal form: chunk length of the linear-attention kernel (values do not depend on it)

        def __post_init__(self) -> None:
            if self.chunk < 1:
                raise ValueError(f"chunk must be >= 1, got {self.chunk}")
            if self.pack_length < 1 or self.pack_heads < 0:
                raise ValueError(f"pack_length must be >= 1 and pack_heads >= 0, got {self.pack_length}, {self.pack_heads}")

    def __init__(self, options: Any, config, *, generator: torch.Generator | None = None) -> None:
        super().__init__(options, config, generator=generator)
        d, o = config.embed_dim, self.options
        self.pack_heads = o.pack_heads or self.num_heads
        if d % self.pack_heads:
            raise ValueError(f"embed_dim ({d}) must be a multiple of pack_heads ({self.pack_heads})")
        if config.dropout > 0:
            raise ValueError("luna has no attention dropout; use dropout=0")
        fk = {"device": config.device, "dtype": config.dtype}
        kv_dim = self.num_kv_heads * self.head_dim
        self.p = nn.Parameter(torch.randn(o.pack_length, d, **fk) * d ** -0.5)
        self.pq_proj = nn.Linear(d, d, bias=config.bias, **fk)
        self.pc_proj = nn.Linear(config.kdim, d, bias=config.bias, **fk)
        # values of another width cannot share the pack projection
        self.pv_proj = nn.Linear(config.vdim, d, bias=config.bias, **fk) if config.vdim != config.kdim else None
        self.q_proj = nn.Linear(d, d, bias=config.bias, **fk)
        self.c_proj = nn.Linear(d, kv_dim, bias=config.bias, **fk)
        self.out_proj = nn.Linear(d, d, bias=config.bias, **fk)
        for lin in (self.pq_proj, self.pc_proj, self.pv_proj, self.q_proj, self.c_proj):
            if lin is not None:
                nn.init.xavier_uniform_(lin.weight, gain=2 ** -0.5)
        nn.init.xavier_uniform_(self.out_proj.weight)
        if self.out_proj.bias is not None:
            nn.init.zeros_(self.out_proj.bias)

    # ---- pieces ---------------------------------------------------------------------------------
    @staticmethod
    def _heads(x: Tensor, n: int) -> Tensor:
        b, length, d = x.shape
        return x.view(b, length, n, d // n).transpose(1, 2)

    @staticmethod
    def _merge(x: Tensor) -> Tensor:
        b, h, length, e = x.shape
        return x.transpose(1, 2).reshape(b, length, h * e)

    def _check(self, attn_mask: Tensor | None, is_causal: bool, context: Tensor | None) -> None:
        if attn_mask is not None:
            raise ValueError("luna does not support attn_mask (it would be ignored); use key_padding_mask / is_causal")
        if is_causal and context is not None:
            raise ValueError("causal luna is self-attention only (the packed context would leak the future)")
        if is_causal and self.pack_heads != self.num_heads:
            raise ValueError(f"causal luna needs pack_heads == num_heads ({self.num_heads}), got {self.pack_heads}")

    def _pack_inputs(self, x: Tensor, context: Tensor | None, value: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Pack queries ``(1, Hp, l, dp)`` and pack keys / values ``(B, Hp, n, dp)``."""
        context = x if context is None else context
        keys = self.pc_proj(context)
        if value is None or value is context:
            values = keys
        else:
            values = (self.pv_proj or self.pc_proj)(value)
        hp = self.pack_heads
        return self._heads(self.pq_proj(self.p)[None], hp), self._heads(keys, hp), self._heads(values, hp)

    def pack(
        self, x: Tensor, context: Tensor | None = None, value: Tensor | None = None, *,
        key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """The packed sequence ``Y_P (B, l, D)`` of the non-causal layer (batch first): what the paper feeds
        the next layer as its ``P``."""
        pq, pk, pv = self._pack_inputs(x, context, value)
        pq = pq.expand(pk.shape[0], -1, -1, -1)
        mask = Mask(pq.shape[2], pk.shape[2], key_padding=key_padding_mask)
        return self._merge(dense_attention(pq, pk, pv, mask, pq.shape[-1] ** -0.5))

    def _unpack(self, x: Tensor, packed: Tensor) -> Tensor:
        q = self._heads(self.q_proj(x), self.num_heads)
        kv = repeat_kv(self._heads(self.c_proj(packed), self.num_kv_heads), self.num_heads // self.num_kv_heads)
        return self._merge(dense_attention(q, kv, kv, Mask(q.shape[2], kv.shape[2]), self.head_dim ** -0.5))

    def _causal_inputs(self, x: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Scaled queries ``(B, H, n, d)``, tied keys/values ``(B, H, n, d)`` and pack weights ``pi (B, H, n, l)``
        (zero at padding)."""
        s = self.head_dim ** -0.5
        pq = self._heads(self.pq_proj(self.p)[None], self.num_heads) * s
        pi = F.softplus(self._heads(self.pc_proj(x), self.num_heads) @ pq.transpose(-1, -2), beta=BETA)
        if keep is not None:
            pi = pi * keep[:, None, :, None].to(pi.dtype)
        q = self._heads(self.q_proj(x), self.num_heads) * s
        kv = repeat_kv(self._heads(self.c_proj(x), self.num_kv_heads), self.num_heads // self.num_kv_heads)
        return q, kv, pi

    def _causal(self, x: Tensor, keep: Tensor | None, state: LunaState | None) -> tuple[Tensor, LunaState]:
        """The parallel causal form: ``a_t = q_t K_t`` and ``out_t = A_t V_t`` are two unnormalised causal
        linear attentions (keys ``k``, values ``pi``; then keys ``pi``, values ``v``), run by the tiled
        linear-attention kernel with the running sums as its initial and final states, and divided by the
        running count of real tokens. Nothing ``n x d x l`` is formed or saved: memory beyond the inputs is
        O(n l) per head."""
        b, n, _ = x.shape
        real = torch.ones(b, n, dtype=x.dtype, device=x.device) if keep is None else keep.to(x.dtype)
        q, kv, pi = self._causal_inputs(x, keep)
        count = x.new_zeros(b) if state is None else state.count.to(x.dtype)
        t = (real.cumsum(1) + count[:, None]).clamp(min=1)[:, None, :, None]
        past = 0 if state is None else state.length
        key0 = None if state is None else LinearState(state.key_sum, None, past)
        value0 = None if state is None else LinearState(state.value_sum, None, past)
        mask, chunk = Mask(n, n, causal=True), self.options.chunk
        a, keys = linear_attention(q, kv, pi, mask, normalize=False, chunk=chunk, state=key0, return_state=True)
        weights = torch.softmax(a / t, dim=-1)
        out, values = linear_attention(weights, pi, kv, mask, normalize=False, chunk=chunk, state=value0,
                                       return_state=True)
        sums = LunaState(keys.kv, values.kv, (count + real.sum(1)).round().long(), past + n)
        return self._merge(out / t), sums

    # ---- the contract ---------------------------------------------------------------------------
    def forward(
        self, x: Tensor, context: Tensor | None = None, value: Tensor | None = None, *,
        key_padding_mask: Tensor | None = None, attn_mask: Tensor | None = None, is_causal: bool = False,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        self._check(attn_mask, is_causal, context)
        if is_causal:
            heads, _ = self._causal(x, None if key_padding_mask is None else ~key_padding_mask, None)
        else:
            heads = self._unpack(x, self.pack(x, context, value, key_padding_mask=key_padding_mask))
        return self.out_proj(heads), None

    def reference(
        self, x: Tensor, context: Tensor | None = None, value: Tensor | None = None, *,
        key_padding_mask: Tensor | None = None, attn_mask: Tensor | None = None, is_causal: bool = False,
    ) -> Tensor:
        """Non-causal: the two softmax formulas written out. Causal: the authors' sequential loop
        (``incremental_causal_attention``), one token at a time."""
        self._check(attn_mask, is_causal, context)
        if not is_causal:
            pq, pk, pv = self._pack_inputs(x, context, value)
            scores = (pq * pq.shape[-1] ** -0.5) @ pk.transpose(-1, -2)  # (B, Hp, l, n)
            if key_padding_mask is not None:
                scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
            packed = self._merge(masked_softmax(scores) @ pv)  # Y_P (B, l, D)
            q = self._heads(self.q_proj(x), self.num_heads) * self.head_dim ** -0.5
            c = repeat_kv(self._heads(self.c_proj(packed), self.num_kv_heads), self.num_heads // self.num_kv_heads)
            return self.out_proj(self._merge(torch.softmax(q @ c.transpose(-1, -2), dim=-1) @ c))
        keep = None if key_padding_mask is None else ~key_padding_mask
        q, kv, pi = self._causal_inputs(x, keep)
        b, h, n, d = q.shape
        key_acc = q.new_zeros(b, h, d, pi.shape[-1])
        value_acc = q.new_zeros(b, h, pi.shape[-1], d)
        steps = q.new_zeros(b)
        outs = []
        for t in range(n):
            if keep is not None:
                steps = steps + keep[:, t].to(q.dtype)
            else:
                steps = steps + 1
            div = steps.clamp(min=1)[:, None, None, None]
            key_acc = key_acc + kv[:, :, t, :, None] * pi[:, :, t, None, :]
            a = (q[:, :, t:t + 1] @ key_acc) / div  # (B, H, 1, l)
            value_acc = value_acc + pi[:, :, t, :, None] * kv[:, :, t, None, :]
            outs.append((torch.softmax(a, dim=-1) @ value_acc) / div)
        return self.out_proj(self._merge(torch.cat(outs, 2)))

    def step(self, x: Tensor, state: Any, *, key_padding_mask: Tensor | None = None) -> tuple[Tensor, Any]:
        """Decode ``x (B, T, D)`` after ``state`` (``None`` at the start): the causal form with its running sums."""
        heads, state = self._causal(x, None if key_padding_mask is None else ~key_padding_mask, state)
        return self.out_proj(heads), state
