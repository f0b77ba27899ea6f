"""``fastattn.MultiheadAttention``: a drop-in for ``torch.nn.MultiheadAttention`` with any mechanism."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .core.base import Mechanism
from .core.checks import check_key_padding
from .core.dispatch import Call, check_backend_name, choose_backend
from .core.state import DecodingState
from .registry import get_method

__all__ = ["MultiheadAttention"]


class MultiheadAttention(nn.Module):
    """Multi-head attention whose core is any registered sequence mechanism.

    Same constructor defaults and forward signature as ``torch.nn.MultiheadAttention`` (including
    ``batch_first=False``), plus ``method``, ``num_kv_heads`` (grouped-query attention) and the
    mechanism's ``**options``. ``weights`` is ``None`` unless the mechanism can produce them.

    Example:
        >>> layer = fastattn.MultiheadAttention(256, 8, method="flash", batch_first=True)
        >>> x = torch.randn(2, 1000, 256)
        >>> out, _ = layer(x, is_causal=True)
        >>> state = None
        >>> for chunk in x.split(100, dim=1):   # incremental decoding, equal to the causal forward
        ...     y, state = layer.step(chunk, state)

    ``backend`` picks the implementation (:mod:`fastattn.core.dispatch`): ``"auto"`` (default),
    ``"torch"`` (the efficient one) or ``"reference"`` (the paper's formula; no dropout, no decoding).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        method: str = "softmax",
        *,
        num_kv_heads: int | None = None,
        dropout: float = 0.0,
        bias: bool = True,
        batch_first: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        backend: str = "auto",
        **options: Any,
    ) -> None:
        super().__init__()
        spec = get_method(method)
        check_backend_name(backend)
        if spec.kind != "sequence":
            raise ValueError(
                f"method {method!r} is a {spec.kind} mechanism; it is not a sequence attention layer"
            )
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be a positive multiple of num_heads ({num_heads})")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if dropout > 0 and not spec.dropout:
            raise ValueError(
                f"method {method!r} has no attention weights to drop out; use dropout=0 "
                f"(and dropout on the layer output if you want one)"
            )
        if generator is not None and not spec.randomized:
            raise ValueError(f"method {method!r} draws no random numbers; it takes no generator")
        self.spec = spec
        self.method = method
        self.backend = backend
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = embed_dim if vdim is None else vdim
        self.dropout, self.batch_first = dropout, batch_first
        fk = {"device": device, "dtype": dtype}
        kv_dim = num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **fk)
        self.k_proj = nn.Linear(self.kdim, kv_dim, bias=bias, **fk)
        self.v_proj = nn.Linear(self.vdim, kv_dim, bias=bias, **fk)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **fk)
        for lin in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(lin.weight)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        if self.out_proj.bias is not None:
            nn.init.zeros_(self.out_proj.bias)
        kwargs = {"generator": generator} if spec.randomized else {}
        self.attn: Mechanism = spec.cls(  # type: ignore[misc]
            spec.make_options(**options), head_dim=self.head_dim, num_heads=num_heads,
            num_kv_heads=num_kv_heads, **kwargs,
        ).to(device)

    @property
    def aux_loss(self) -> Tensor:
        """The mechanism's auxiliary loss from the last forward (zero where it defines none)."""
        return self.attn.aux_loss

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"

    # ---- helpers ------------------------------------------------------------------------------
    def _heads(self, x: Tensor, heads: int) -> Tensor:
        b, n, _ = x.shape
        return x.view(b, n, heads, self.head_dim).transpose(1, 2)

    def _to_batch_first(self, x: Tensor, name: str, width: int) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 3:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name} must be 3-D {'(B, L, E)' if self.batch_first else '(L, B, E)'}, got {shape}")
        if x.shape[-1] != width:
            raise ValueError(f"{name} has {x.shape[-1]} features, the layer expects {width}")
        return x if self.batch_first else x.transpose(0, 1)

    def _attn_mask(self, attn_mask: Tensor | None, b: int, lq: int, lk: int) -> Tensor | None:
        if attn_mask is None or attn_mask.dim() != 3:
            return attn_mask
        if attn_mask.shape[0] != b * self.num_heads:
            raise ValueError(
                f"3-D attn_mask must be (batch * num_heads, Lq, Lk) = ({b * self.num_heads}, {lq}, {lk}), "
                f"got {tuple(attn_mask.shape)}"
            )
        return attn_mask.view(b, self.num_heads, *attn_mask.shape[1:])

    # ---- forward and decoding -----------------------------------------------------------------
    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = False,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        average_attn_weights: bool = True,
    ) -> tuple[Tensor, Tensor | None]:
        unbatched = isinstance(query, Tensor) and query.dim() == 2
        if unbatched:
            bdim = 0 if self.batch_first else 1
            query = query.unsqueeze(bdim)
            key = None if key is None else key.unsqueeze(bdim)
            value = None if value is None else value.unsqueeze(bdim)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        key = query if key is None else key
        value = key if value is None else value
        q = self._to_batch_first(query, "query", self.embed_dim)
        k = self._to_batch_first(key, "key", self.kdim)
        v = self._to_batch_first(value, "value", self.vdim)
        if k.shape[:2] != v.shape[:2]:
            raise ValueError(f"key and value must share batch and length, got {tuple(k.shape)} and {tuple(v.shape)}")
        if q.shape[0] != k.shape[0]:
            raise ValueError(f"query and key batch sizes differ: {q.shape[0]} vs {k.shape[0]}")
        b, lq, lk = q.shape[0], q.shape[1], k.shape[1]
        qh = self._heads(self.q_proj(q), self.num_heads)
        kh = self._heads(self.k_proj(k), self.num_kv_heads)
        vh = self._heads(self.v_proj(v), self.num_kv_heads)
        attn_mask = self._attn_mask(attn_mask, b, lq, lk)
        out = self.attn.run(
            qh, kh, vh, key_padding_mask=key_padding_mask, is_causal=is_causal, attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0, backend=self.backend,
        )
        out = self.out_proj(out.transpose(1, 2).reshape(b, lq, self.embed_dim))
        weights = None
        if need_weights:
            weights = self.attn.attention_weights(
                qh, kh, key_padding_mask=key_padding_mask, is_causal=is_causal, attn_mask=attn_mask
            )
            if weights is not None and average_attn_weights:
                weights = weights.mean(dim=1)
        if not self.batch_first:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(0 if self.batch_first else 1)
            weights = None if weights is None else weights.squeeze(0)
        return out, weights

    def step(
        self, chunk: Tensor, state: DecodingState | None = None, *, key_padding_mask: Tensor | None = None
    ) -> tuple[Tensor, DecodingState]:
        """Decode ``T >= 1`` new tokens (laid out like ``forward``'s query) given the previous ``state``
        (``None`` at the start). The outputs equal the causal forward over the whole prefix.

        ``key_padding_mask``: bool ``(B, T)``, True marks padding among the new tokens (a batch of
        left-padded prompts). Padding tokens are never attended to later and each row decodes as if it
        were alone, without its padding; the outputs at padding positions are unspecified. The returned
        state has ``length`` (positions seen), ``select(index)`` (reorder or subset the batch, e.g. for
        beam search) and ``to(device)``."""
        if not self.spec.decoding:
            raise ValueError(f"method {self.method!r} does not support incremental decoding")
        x = self._to_batch_first(chunk, "chunk", self.embed_dim)
        b, t, _ = x.shape
        check_key_padding(self.spec, key_padding_mask, b, t, what="(batch, new tokens)")
        if state is not None and not isinstance(state, DecodingState):
            raise TypeError(f"state must be None or the state a previous step returned, got {type(state).__name__}")
        choose_backend(self.backend, self.spec, Call(device=x.device, dtype=x.dtype, decoding=True))
        qh = self._heads(self.q_proj(x), self.num_heads)
        kh = self._heads(self.k_proj(x), self.num_kv_heads)
        vh = self._heads(self.v_proj(x), self.num_kv_heads)
        out, state = self.attn.step(qh, kh, vh, state, self.head_dim ** -0.5, key_padding_mask)
        out = self.out_proj(out.transpose(1, 2).reshape(b, t, self.embed_dim))
        return (out if self.batch_first else out.transpose(0, 1)), state

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention, method: str = "softmax", **options: Any) -> "MultiheadAttention":
        """A fastattn layer with the weights of a ``torch.nn.MultiheadAttention`` (same outputs for
        ``method="softmax"``)."""
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError(
                "from_torch supports nn.MultiheadAttention with kdim == vdim == embed_dim, "
                "no add_bias_kv and no add_zero_attn"
            )
        w = mha.in_proj_weight
        layer = cls(
            mha.embed_dim, mha.num_heads, method, dropout=mha.dropout, bias=mha.in_proj_bias is not None,
            batch_first=mha.batch_first, device=w.device, dtype=w.dtype, **options,
        )
        e = mha.embed_dim
        with torch.no_grad():
            for i, lin in enumerate((layer.q_proj, layer.k_proj, layer.v_proj)):
                lin.weight.copy_(w[i * e:(i + 1) * e])
                if mha.in_proj_bias is not None:
                    lin.bias.copy_(mha.in_proj_bias[i * e:(i + 1) * e])
            layer.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                layer.out_proj.bias.copy_(mha.out_proj.bias)
        return layer
