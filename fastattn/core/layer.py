"""Layer-level mechanisms: attention that sees the layer's input, not only per-head ``q, k, v``.

A sequence-level :class:`~fastattn.core.base.Mechanism` receives per-head ``q, k, v`` after fixed linear
projections. A :class:`LayerMechanism` receives the layer's inputs themselves, batch first --
``x (B, Lq, D)`` (the query side) and ``context (B, Lk, kdim)`` / ``value (B, Lk, vdim)`` (the key and
value sides; ``None`` in self-attention) -- and owns everything between them and the output
``(B, Lq, D)``: projections or their replacement, routers, gates, memories and, usually, an attention
*core*: any registered sequence-level mechanism, chosen by the options ``core="softmax"`` and
``core_options={...}``.

:class:`ProjectedAttention` is the standard layer -- projections, core, output projection -- and is what
``MultiheadAttention(method=<sequence-level id>)`` runs, so every layer takes one path: a sequence-level
mechanism is the trivial layer-level one. A mechanism that changes only what happens around the core
(mixture of heads: gates on the head outputs) derives from :class:`ProjectedAttention` and overrides
:meth:`~ProjectedAttention.mix`; one that replaces the projections overrides
:meth:`~ProjectedAttention.project` or derives from :class:`LayerMechanism` directly.

The contract (``tests/kinds/test_layer_contract.py`` runs it on every registry entry with
``level="layer"``):

* ``forward(x, context=None, value=None, *, key_padding_mask, attn_mask, is_causal, need_weights)`` returns
  ``(out (B, Lq, D), weights (B, H, Lq, Lk) or None)``;
* ``reference(...)`` (same arguments) returns ``out`` by the paper's formula, written literally; it equals
  ``forward`` in float64, values and gradients;
* ``step(x_chunk, state, *, key_padding_mask=None)`` where the registry says ``decoding``: ``(out, state)``,
  equal to the causal forward over the whole prefix (``state=None`` at the start);
* ``aux_loss``: a scalar tensor after each forward (zero where the mechanism defines none);
* memory carried across calls travels in the ``step`` state or a documented keyword argument, never in
  module attributes;
* ``generator=`` is accepted only where something random is drawn; otherwise it is a ``ValueError``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from ..registry import get_method
from .base import Mechanism

from .registered import Registered

if TYPE_CHECKING:
    pass

__all__ = ["LayerConfig", "LayerMechanism", "ProjectedAttention", "make_core"]


@dataclass(frozen=True)
class LayerConfig:
    """The settings every layer shares (those of ``torch.nn.MultiheadAttention``, plus grouped-query
    heads). ``num_kv_heads``, ``kdim`` and ``vdim`` default to ``num_heads`` and ``embed_dim``."""

    embed_dim: int
    num_heads: int
    num_kv_heads: int | None = None
    kdim: int | None = None
    vdim: int | None = None
    bias: bool = True
    dropout: float = 0.0
    device: torch.device | str | None = None
    dtype: torch.dtype | None = None
    backend: str = "auto"  # the core's implementation (fastattn.core.dispatch)

    def __post_init__(self) -> None:
        if self.embed_dim <= 0 or self.num_heads <= 0 or self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim ({self.embed_dim}) must be a positive multiple of num_heads ({self.num_heads})"
            )
        for name, default in (("num_kv_heads", self.num_heads), ("kdim", self.embed_dim), ("vdim", self.embed_dim)):
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        if self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads


def make_core(
    method: str, options: dict[str, Any], config: LayerConfig, *, generator: torch.Generator | None = None
) -> Mechanism:
    """The attention core of a layer: the sequence-level mechanism ``method`` with ``options``, built for
    the layer's heads. A layer-level id, an unknown option or a ``generator`` for a core that draws no
    random numbers is a ``ValueError``."""
    spec = get_method(method)
    if spec.kind != "sequence" or spec.level != "sequence":
        what = f"a {spec.kind} mechanism" if spec.kind != "sequence" else "a layer-level mechanism"
        raise ValueError(f"the attention core must be a sequence-level mechanism id; {method!r} is {what}")
    if not isinstance(options, dict):
        raise TypeError(f"core_options must be a dict of the core's options, got {type(options).__name__}")
    if generator is not None and not spec.randomized:
        raise ValueError(f"method {method!r} draws no random numbers; it takes no generator")
    kwargs = {"generator": generator} if spec.randomized else {}
    core = spec.cls(  # type: ignore[misc]
        spec.make_options(**options), head_dim=config.head_dim, num_heads=config.num_heads,
        num_kv_heads=config.num_kv_heads, **kwargs,
    )
    # the core's own parameters and buffers (rfa's random features, transnormer's LRPE angles) follow the
    # layer's device and dtype, as the projections do
    return core.to(config.device) if config.dtype is None else core.to(device=config.device, dtype=config.dtype)


class LayerMechanism(Registered):
    """Base class of layer-level mechanisms. See the module docstring for the contract."""

    # A layer with exactly this many heads (Mega's single-head attention): any other ``num_heads`` (or
    # ``num_kv_heads``) is a ``ValueError``; ``None``: any number.
    fixed_heads: ClassVar[int | None] = None
    # A self-attention layer only (its keys and values come from its own input, e.g. through a recurrence
    # over it): ``context``/``value`` inputs and ``kdim``/``vdim`` other than ``embed_dim`` are a ``ValueError``.
    self_attention_only: ClassVar[bool] = False

    def __init__(self, options: Any, config: LayerConfig, *, generator: torch.Generator | None = None) -> None:
        if generator is not None:  # subclasses that draw random numbers consume it and pass None
            raise ValueError(f"method {self.spec.name!r} draws no random numbers; it takes no generator")
        super().__init__(options)
        fixed = self.fixed_heads
        if fixed is not None and (config.num_heads != fixed or config.num_kv_heads != fixed):
            raise ValueError(
                f"method {self.spec.name!r} has exactly {fixed} head(s); got num_heads={config.num_heads}, "
                f"num_kv_heads={config.num_kv_heads}"
            )
        if self.self_attention_only and (config.kdim != config.embed_dim or config.vdim != config.embed_dim):
            raise ValueError(
                f"method {self.spec.name!r} is a self-attention layer: kdim and vdim must equal embed_dim "
                f"({config.embed_dim}), got {config.kdim}, {config.vdim}"
            )
        self.config = config
        self.embed_dim, self.num_heads = config.embed_dim, config.num_heads
        self.num_kv_heads, self.head_dim = config.num_kv_heads, config.head_dim

    def check_self_attention(self, context: Tensor | None, value: Tensor | None) -> None:
        """A ``ValueError`` for key/value inputs on a :attr:`self_attention_only` layer."""
        if self.self_attention_only and (context is not None or value is not None):
            raise ValueError(f"method {self.spec.name!r} is a self-attention layer; it takes no key/value inputs")

    def dims(self) -> str:
        return f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}"

    @property
    def requires_causal(self) -> bool:
        """True when this layer, with its options, has only a causal form (gated rfa's recurrence): a
        call without ``is_causal=True`` is then a ``ValueError``."""
        return False

    # ---- to implement ---------------------------------------------------------------------------
    def forward(
        self, x: Tensor, context: Tensor | None = None, value: Tensor | None = None, *,
        key_padding_mask: Tensor | None = None, attn_mask: Tensor | None = None, is_causal: bool = False,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def reference(
        self, x: Tensor, context: Tensor | None = None, value: Tensor | None = None, *,
        key_padding_mask: Tensor | None = None, attn_mask: Tensor | None = None, is_causal: bool = False,
    ) -> Tensor:
        """The paper's formula, literally. Defaults to ``forward``; override where they differ."""
        return self.forward(
            x, context, value, key_padding_mask=key_padding_mask, attn_mask=attn_mask, is_causal=is_causal
        )[0]

    def step(self, x: Tensor, state: Any, *, key_padding_mask: Tensor | None = None) -> tuple[Tensor, Any]:
        raise ValueError(f"method {self.spec.name!r} does not support incremental decoding")


class ProjectedAttention(LayerMechanism):
    """The standard layer: ``q, k, v`` projections, the attention core over the heads, the output
    projection. ``MultiheadAttention(method=<sequence id>, **options)`` is this with
    ``Options(core=<id>, core_options=options)``; its parameters are ``q_proj``, ``k_proj``, ``v_proj``,
    ``out_proj`` (Xavier-uniform, zero biases, as torch's) and the core's, under ``core``.

    Subclasses change what happens around the core through :meth:`project` (the per-head ``q, k, v``;
    :meth:`project_loss`, its auxiliary loss), :meth:`mix` (the per-head outputs, before the output
    projection, and an auxiliary loss) or :meth:`output` (the output projection itself).
    """

    # Whether ``need_weights`` returns the core's attention matrix; a subclass whose output is not an
    # average of value rows under those weights (gated heads) sets it to False.
    returns_core_weights: ClassVar[bool] = True
    # A layer form (``Mechanism.layer_form``) whose extra parts act on each token alone and reach the core
    # only through :meth:`attend` (extra keywords such as per-token ``gate_logits`` included) sets True:
    # it then has a sequence-parallel version (``MultiheadAttention(..., sequence_parallel_group=g)``).
    sequence_parallel: ClassVar[bool] = False

    @dataclass(frozen=True)
    class Options:
        core: str = "softmax"  # the attention core: any sequence-level method id
        core_options: dict[str, Any] = field(default_factory=dict)  # the core's own options

    def __init__(self, options: Any, config: LayerConfig, *, generator: torch.Generator | None = None) -> None:
        super().__init__(options, config)
        self.core = make_core(self.options.core, self.options.core_options, config, generator=generator)
        if config.dropout > 0 and not self.core.spec.dropout:
            raise ValueError(
                f"method {self.options.core!r} has no attention weights to drop out; use dropout=0 "
                f"(and dropout on the layer output if you want one)"
            )
        fk = {"device": config.device, "dtype": config.dtype}
        d, kv_dim = config.embed_dim, config.num_kv_heads * config.head_dim
        self.q_proj = nn.Linear(d, d, bias=config.bias, **fk)
        self.k_proj = nn.Linear(config.kdim, kv_dim, bias=config.bias, **fk)
        self.v_proj = nn.Linear(config.vdim, kv_dim, bias=config.bias, **fk)
        self.out_proj = nn.Linear(d, d, bias=config.bias, **fk)
        for lin in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(lin.weight)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        if self.out_proj.bias is not None:
            nn.init.zeros_(self.out_proj.bias)

    # ---- pieces subclasses reuse ----------------------------------------------------------------
    def heads(self, x: Tensor, n: int) -> Tensor:
        """``(B, L, n * E) -> (B, n, L, E)``."""
        b, length, _ = x.shape
        return x.view(b, length, n, self.head_dim).transpose(1, 2)

    def merge(self, heads: Tensor) -> Tensor:
        """``(B, H, L, E) -> (B, L, H * E)``."""
        b, h, length, e = heads.shape
        return heads.transpose(1, 2).reshape(b, length, h * e)

    def project(self, x: Tensor, context: Tensor | None, value: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Per-head ``q (B, H, Lq, E)``, ``k, v (B, Hkv, Lk, E)``; ``context``/``value`` default to ``x``."""
        context = x if context is None else context
        value = context if value is None else value
        return (
            self.heads(self.q_proj(x), self.num_heads),
            self.heads(self.k_proj(context), self.num_kv_heads),
            self.heads(self.v_proj(value), self.num_kv_heads),
        )

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, reference: bool = False, **masks: Any) -> Tensor:
        """The core over the heads (``masks``: ``key_padding_mask``, ``attn_mask``, ``is_causal``), with
        the layer's attention dropout in training mode."""
        dropout_p = self.config.dropout if self.training and not reference else 0.0
        backend = "reference" if reference else self.config.backend
        return self.core.run(q, k, v, dropout_p=dropout_p, backend=backend, **masks)

    def attend_heads(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, **masks: Any) -> Tensor:
        """The head outputs of the efficient forward, given the query-side input ``x`` too: :meth:`attend`.
        A subclass whose output ignores some (token, head) pairs (mixture of heads: gates of 0) may compute
        only the others here."""
        return self.attend(q, k, v, **masks)

    def mix(self, x: Tensor, heads: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The head outputs ``(B, H, Lq, E)`` as they enter the output projection, and this layer's
        auxiliary loss (``None``: none). ``x`` is the query-side input; ``valid`` ``(B, Lq)`` marks the
        real query tokens where padding is known (self-attention with a padding mask), else ``None``.
        The standard layer passes the heads through."""
        return heads, None

    def output(self, x: Tensor, heads: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The layer output ``(B, Lq, D)`` from the head outputs ``(B, H, Lq, E)``, and the auxiliary loss
        of this stage (arguments as :meth:`mix`). The standard layer: :meth:`mix`, then the output
        projection of the concatenated heads; a subclass whose output projection depends on the token
        (experts) overrides this instead."""
        heads, aux = self.mix(x, heads, valid)
        return self.out_proj(self.merge(heads)), aux

    def project_loss(
        self, x: Tensor, context: Tensor | None, value: Tensor | None, valid_keys: Tensor | None
    ) -> Tensor | None:
        """The auxiliary loss of :meth:`project` (routers on the key/value side), computed in training
        mode only; ``valid_keys`` ``(B, Lk)`` marks the real key tokens where padding is known. The
        standard layer has none."""
        return None

    @staticmethod
    def _sum_losses(*losses: Tensor | None) -> Tensor | None:
        present = [a for a in losses if a is not None]
        return sum(present[1:], present[0]) if present else None

    def _attn_mask(self, attn_mask: Tensor | None, b: int, lq: int, lk: int) -> Tensor | None:
        """torch's 3-D ``(B * H, Lq, Lk)`` attention mask as ``(B, H, Lq, Lk)``."""
        if attn_mask is None or attn_mask.dim() != 3:
            return attn_mask
        if attn_mask.shape[0] != b * self.num_heads:
            raise ValueError(
                f"3-D attn_mask must be (batch * num_heads, Lq, Lk) = ({b * self.num_heads}, {lq}, {lk}), "
                f"got {tuple(attn_mask.shape)}"
            )
        return attn_mask.view(b, self.num_heads, *attn_mask.shape[1:])

    @staticmethod
    def _valid_queries(context: Tensor | None, key_padding_mask: Tensor | None) -> Tensor | None:
        """In self-attention the padding mask of the keys is that of the queries too."""
        return None if context is not None or key_padding_mask is None else ~key_padding_mask

    # ---- the contract ---------------------------------------------------------------------------
    def forward(
        self, x: Tensor, context: Tensor | None = None, value: Tensor | None = None, *,
        key_padding_mask: Tensor | None = None, attn_mask: Tensor | None = None, is_causal: bool = False,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        q, k, v = self.project(x, context, value)
        masks = {
            "key_padding_mask": key_padding_mask, "is_causal": is_causal,
            "attn_mask": self._attn_mask(attn_mask, x.shape[0], q.shape[2], k.shape[2]),
        }
        out, aux = self.output(x, self.attend_heads(x, q, k, v, **masks), self._valid_queries(context, key_padding_mask))
        if self.training:
            valid_keys = None if key_padding_mask is None else ~key_padding_mask
            aux = self._sum_losses(aux, self.project_loss(x, context, value, valid_keys))
        self.aux_loss = self.core.aux_loss if aux is None else self.core.aux_loss + aux
        weights = None
        if need_weights and self.returns_core_weights:
            weights = self.core.attention_weights(q, k, **masks)
        return out, weights

    def reference_heads(
        self, x: Tensor, context: Tensor | None, value: Tensor | None, *,
        key_padding_mask: Tensor | None, attn_mask: Tensor | None, is_causal: bool,
    ) -> Tensor:
        """The head outputs ``(B, H, Lq, E)`` by the projections and the core's reference."""
        q, k, v = self.project(x, context, value)
        return self.attend(
            q, k, v, reference=True, key_padding_mask=key_padding_mask, is_causal=is_causal,
            attn_mask=self._attn_mask(attn_mask, x.shape[0], q.shape[2], k.shape[2]),
        )

    def reference(
        self, x: Tensor, context: Tensor | None = None, value: Tensor | None = None, *,
        key_padding_mask: Tensor | None = None, attn_mask: Tensor | None = None, is_causal: bool = False,
    ) -> Tensor:
        """Projections, the core's reference, the output projection."""
        heads = self.reference_heads(
            x, context, value, key_padding_mask=key_padding_mask, attn_mask=attn_mask, is_causal=is_causal
        )
        return self.output(x, heads, self._valid_queries(context, key_padding_mask))[0]

    def step(self, x: Tensor, state: Any, *, key_padding_mask: Tensor | None = None) -> tuple[Tensor, Any]:
        """Decode the tokens ``x (B, T, D)`` (self-attention) after ``state``; ``key_padding_mask (B, T)``
        marks padding among the new tokens (left padding of a batch of prompts)."""
        if not self.core.spec.decoding:
            raise ValueError(f"method {self.options.core!r} does not support incremental decoding")
        q, k, v = self.project(x, None, None)
        heads, state = self.core.step(q, k, v, state, self.head_dim ** -0.5, key_padding_mask)
        valid = None if key_padding_mask is None else ~key_padding_mask
        out, aux = self.output(x, heads, valid)
        if self.training:
            aux = self._sum_losses(aux, self.project_loss(x, None, None, valid))
        self.aux_loss = self.core.aux_loss if aux is None else self.core.aux_loss + aux
        return out, state
