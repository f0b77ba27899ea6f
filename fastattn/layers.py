"""``fastattn.MultiheadAttention``: a drop-in for ``torch.nn.MultiheadAttention`` with any mechanism."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from .core.base import Mechanism
from .core.checks import check_key_padding
from .core.dispatch import Call, check_backend_name, choose_backend
from .core.layer import LayerConfig, LayerMechanism, ProjectedAttention
from .core.state import DecodingState
from .registry import get_method

__all__ = ["MultiheadAttention"]


class MultiheadAttention(nn.Module):
    """Multi-head attention whose mechanism is any registered sequence mechanism.

    Same constructor defaults and forward signature as ``torch.nn.MultiheadAttention`` (including
    ``batch_first=False``), plus ``method``, ``num_kv_heads`` (grouped-query attention) and the
    mechanism's ``**options``. ``weights`` is ``None`` unless the mechanism can produce them.

    The layer is a façade over one :class:`~fastattn.core.layer.LayerMechanism` (``self.mechanism``):
    for a sequence-level method it is :class:`~fastattn.core.layer.ProjectedAttention` -- projections,
    the method as the attention core (``self.attn``), output projection -- or the method's own
    ``layer_form`` where its paper's layer does more (rfa's gate from the layer input, transnormer's
    output gate, interlaced's two attention stages); for a layer-level method
    (registry ``level="layer"``: mixture of heads, memories, ...) it is that mechanism, which sees the
    layer input and owns its projections. The façade handles the layout (``batch_first``, unbatched
    input), checks shapes, and forwards.

    Example:
        >>> layer = fastattn.MultiheadAttention(256, 8, method="flash", batch_first=True)
        >>> x = torch.randn(2, 1000, 256)
        >>> out, _ = layer(x, is_causal=True)
        >>> state = None
        >>> for chunk in x.split(100, dim=1):   # incremental decoding, equal to the causal forward
        ...     y, state = layer.step(chunk, state)
        >>> moh = fastattn.MultiheadAttention(256, 8, method="moh", core="flash", batch_first=True)
        >>> out, _ = moh(x, is_causal=True)
        >>> loss = out.square().mean() + moh.aux_loss   # the router's losses, already weighted

    ``sequence_parallel_group=g`` (a ``torch.distributed`` process group): the layer's input is this
    rank's shard of the sequence, and the attention core runs across the group
    (:class:`fastattn.distributed.SequenceParallelAttention`; ``sequence_parallel_strategy`` and
    ``sequence_parallel_layout`` as in :func:`fastattn.distributed.sequence_parallel_attention`).

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
        sequence_parallel_group: Any = None,
        sequence_parallel_strategy: str = "auto",
        sequence_parallel_layout: str = "contiguous",
        **options: Any,
    ) -> None:
        super().__init__()
        spec = get_method(method)
        check_backend_name(backend)
        if spec.kind != "sequence":
            raise ValueError(
                f"method {method!r} is a {spec.kind} mechanism; it is not a sequence attention layer"
            )
        config = LayerConfig(
            embed_dim, num_heads, num_kv_heads=num_kv_heads, kdim=kdim, vdim=vdim, bias=bias,
            dropout=dropout, device=device, dtype=dtype, backend=backend,
        )
        self.spec = spec
        self.method = method
        self.config = config
        self.embed_dim, self.head_dim, self.kdim, self.vdim = embed_dim, config.head_dim, config.kdim, config.vdim
        self.dropout, self.batch_first = dropout, batch_first
        if sequence_parallel_group is not None:  # inputs are this rank's shard (fastattn.distributed)
            form = getattr(spec.cls, "layer_form", None)
            if spec.level == "layer" or not (form is None or form.sequence_parallel):
                raise ValueError(f"method {method!r} has its own layer form; it has no sequence-parallel version")
            from .distributed import sequence_parallel_layer

            mechanism = sequence_parallel_layer(form)(
                ProjectedAttention.Options(core=method, core_options=options), config, generator=generator,
                group=sequence_parallel_group, strategy=sequence_parallel_strategy, layout=sequence_parallel_layout,
            )
        elif spec.level == "layer":
            mechanism = spec.cls(spec.make_options(**options), config, generator=generator)  # type: ignore[misc]
        else:
            layer_cls = getattr(spec.cls, "layer_form", None) or ProjectedAttention  # the paper's layer, if any
            mechanism = layer_cls(
                ProjectedAttention.Options(core=method, core_options=options), config, generator=generator
            )
        self.mechanism: LayerMechanism = mechanism

    @property
    def backend(self) -> str:
        """The backend the layer's attention runs on; assigning it (``layer.backend = "cpp"``) reaches the
        forward and ``step`` alike (every module of the layer that holds the shared settings)."""
        return self.config.backend

    @backend.setter
    def backend(self, value: str) -> None:
        check_backend_name(value)
        for m in self.modules():
            if isinstance(getattr(m, "config", None), LayerConfig):
                m.config = dataclasses.replace(m.config, backend=value)

    @property
    def aux_loss(self) -> Tensor:
        """The mechanism's auxiliary loss from the last forward (zero where it defines none)."""
        return self.mechanism.aux_loss

    # The head counts are the mechanism's: they change when it is pruned (gha.prune keeps fewer heads).
    @property
    def num_heads(self) -> int:
        """The query heads the layer has now (after any pruning)."""
        return self.mechanism.num_heads

    @property
    def num_kv_heads(self) -> int:
        """The key/value heads the layer has now (after any pruning)."""
        return self.mechanism.num_kv_heads

    # The standard layer's parts, under the names they have always had.
    @property
    def attn(self) -> Mechanism:
        """The attention core (the sequence-level mechanism)."""
        return self.mechanism.core  # type: ignore[return-value]

    @property
    def q_proj(self) -> nn.Linear:
        return self.mechanism.q_proj

    @property
    def k_proj(self) -> nn.Linear:
        return self.mechanism.k_proj

    @property
    def v_proj(self) -> nn.Linear:
        return self.mechanism.v_proj

    @property
    def out_proj(self) -> nn.Linear:
        return self.mechanism.out_proj

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"

    # ---- helpers ------------------------------------------------------------------------------
    def _heads(self, x: Tensor, heads: int) -> Tensor:
        return self.mechanism.heads(x, heads)

    def _to_batch_first(self, x: Tensor, name: str, width: int) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 3:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name} must be 3-D {'(B, L, E)' if self.batch_first else '(L, B, E)'}, got {shape}")
        if x.shape[-1] != width:
            raise ValueError(f"{name} has {x.shape[-1]} features, the layer expects {width}")
        return x if self.batch_first else x.transpose(0, 1)

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
        # Self-attention (the mechanism is told so by context=None) when key and value are omitted or
        # are the query tensor itself, as in torch's idiom layer(x, x, x).
        self_attention = key is None or (key is query and (value is None or value is query))
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
        x = self._to_batch_first(query, "query", self.embed_dim)
        k = self._to_batch_first(key, "key", self.kdim)
        v = self._to_batch_first(value, "value", self.vdim)
        if k.shape[:2] != v.shape[:2]:
            raise ValueError(f"key and value must share batch and length, got {tuple(k.shape)} and {tuple(v.shape)}")
        if x.shape[0] != k.shape[0]:
            raise ValueError(f"query and key batch sizes differ: {x.shape[0]} vs {k.shape[0]}")
        out, weights = self.mechanism(
            x, None if self_attention else k, None if self_attention else v,
            key_padding_mask=key_padding_mask, attn_mask=attn_mask, is_causal=is_causal, need_weights=need_weights,
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
        check_key_padding(self.spec, key_padding_mask, x.shape[0], x.shape[1], what="(batch, new tokens)")
        if state is not None and not isinstance(state, DecodingState):
            raise TypeError(f"state must be None or the state a previous step returned, got {type(state).__name__}")
        chosen = choose_backend(self.backend, self.spec, Call(device=x.device, dtype=x.dtype, decoding=True))
        with chosen.context():
            out, state = self.mechanism.step(x, state, key_padding_mask=key_padding_mask)
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
        if not isinstance(layer.mechanism, ProjectedAttention):
            raise ValueError(
                f"from_torch needs a method whose layer is one set of q, k, v and output projections; "
                f"{method!r} builds another layer ({type(layer.mechanism).__name__})"
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
