"""``fastattn.hf.register``: a fastattn mechanism as a transformers attention implementation.

transformers (5.x) picks a model's attention through two registries keyed by the same name:
``AttentionInterface`` (the function computing attention from the module's projected ``q, k, v``) and
``AttentionMaskInterface`` (the function building the mask handed to it). :func:`register` fills both:

* the mask function is the flash-attention style one -- ``None`` or the 2-D keep mask ``(B, L)`` (True =
  attend) -- because that is what every fastattn mechanism can honour (a padding mask), unlike the
  4-D boolean / additive masks of the ``sdpa`` / ``eager`` functions;
* the attention function reads causality from ``module.is_causal`` (overridden by an ``is_causal``
  keyword), turns the 2-D mask into ``key_padding_mask``, honours packed sequences (restarting
  ``position_ids`` and no mask: each document is attended on its own), passes grouped-query key/value heads
  unexpanded (fastattn expands them, or not, per mechanism), and refuses what the mechanism cannot
  honour -- a sliding window (except for ``local``, whose window it sets), logit soft-capping, attention
  sinks, attention dropout (policy: ``dropout="error"`` by default) -- with a ``ValueError`` naming the
  model setting;
* each attention module gets its own mechanism, built on first use and seeded from ``(seed,
  layer_idx)`` (random features are drawn once per layer: the same kernel at prefill and at every
  decoding step).

Layers swapped by :func:`fastattn.hf.linearize` carry their mechanism as a submodule
(``module.fastattn_core``) and, while decoding, fastattn's own state in the cache
(:class:`fastattn.hf.cache.FastattnStateLayer`); the same attention function serves them.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fastattn.registry import MethodSpec, get_method

__all__ = ["register", "Adapter", "DROPOUT_FIELDS", "packed_segments"]

DROPOUT_POLICIES = ("error", "ignore", "apply")
# config fields holding the attention-dropout probability, by model family (Llama / GPT-2 / BERT / others)
DROPOUT_FIELDS = ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob", "attention_dropout_prob",
                  "attn_dropout")
_ADAPTERS: dict[str, "Adapter"] = {}


def _transformers():
    try:
        import transformers  # noqa: F401
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as e:  # pragma: no cover - exercised without the extra
        raise ImportError("fastattn.hf needs transformers: pip install 'fastattn[hf]'") from e
    return AttentionInterface, AttentionMaskInterface


def dropout_field(module: nn.Module) -> str:
    """The name of the config field that sets this module's attention dropout (for error messages)."""
    config = getattr(module, "config", None)
    for name in DROPOUT_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, (int, float)) and value > 0:
            return f"config.{name}"
    return "the model's attention-dropout setting (" + " / ".join(f"config.{n}" for n in DROPOUT_FIELDS[:3]) + ")"


def packed_segments(position_ids: Tensor | None) -> Tensor | None:
    """Document ids ``(B, L)`` of packed sequences -- a new document wherever ``position_ids`` does not go
    up by one -- or ``None`` when every row holds one sequence."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[1] < 2:
        return None
    step = position_ids[:, 1:] - position_ids[:, :-1]
    starts = torch.cat([torch.zeros_like(position_ids[:, :1]), (step != 1).long()], dim=1)
    if not bool(starts.any()):
        return None
    return starts.cumsum(dim=1)


@dataclass
class Adapter:
    """What :func:`register` stored under one name: the mechanism, its options and the policies."""

    name: str
    spec: MethodSpec
    options: Any
    seed: int = 0
    dropout: str = "error"
    mechanisms: "weakref.WeakKeyDictionary[nn.Module, nn.Module]" = field(default_factory=weakref.WeakKeyDictionary)

    # ---- the mechanism of one attention module --------------------------------------------------
    def mechanism_for(self, module: nn.Module, query: Tensor, key: Tensor) -> nn.Module:
        core = getattr(module, "fastattn_core", None)
        if core is not None:
            return core
        mech = self.mechanisms.get(module)
        if mech is None or mech.num_heads != query.shape[1] or mech.num_kv_heads != key.shape[1]:
            mech = build_mechanism(self.spec, self.options, module, query.shape[1], key.shape[1],
                                   query.shape[-1], self.seed).to(query.device)
            self.mechanisms[module] = mech
        return mech

    def dropout_p(self, module: nn.Module, dropout: float, spec: MethodSpec) -> float:
        if not dropout or not module.training:
            return 0.0
        policy = getattr(module, "fastattn_dropout", self.dropout)  # set by linearize(dropout=...)
        if policy == "ignore":
            return 0.0
        where = dropout_field(module)
        if policy == "apply":
            if not spec.dropout:
                raise ValueError(
                    f"attention dropout {dropout} ({where}) cannot be applied by method {spec.name!r}; set "
                    f"{where} = 0.0, or register with dropout='ignore' to train without it"
                )
            return float(dropout)
        raise ValueError(
            f"the model trains with attention dropout {dropout} ({where}), which fastattn method {spec.name!r} "
            f"does not apply here; set {where} = 0.0, or register with dropout='ignore' (train without it)"
            + (" or dropout='apply'" if spec.dropout else "")
        )

    # ---- the attention function -----------------------------------------------------------------
    def __call__(
        self,
        module: nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        is_causal: bool | None = None,
        sliding_window: int | None = None,
        softcap: float | None = None,
        s_aux: Tensor | None = None,
        position_ids: Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, None]:
        mech = self.mechanism_for(module, query, key)
        spec = mech.spec
        causal = bool(getattr(module, "is_causal", False) if is_causal is None else is_causal)
        if softcap:
            raise ValueError(
                f"the model soft-caps attention logits (softcap={softcap}: config.attn_logit_softcapping), which "
                f"fastattn method {spec.name!r} cannot honour; set it to None or keep this layer's attention"
            )
        if s_aux is not None:
            raise ValueError(
                f"the model uses attention sinks (s_aux, the layer's `sinks` parameters), which fastattn method "
                f"{spec.name!r} cannot honour"
            )
        if sliding_window is not None and getattr(mech.options, "window", None) != sliding_window:
            hint = (f"register method='local' with window={sliding_window}" if spec.name == "local"
                    else "use method='local' for sliding-window layers")
            raise ValueError(
                f"the model's layer uses a sliding window of {sliding_window} (config.sliding_window), which "
                f"fastattn method {spec.name!r} with {mech.options} does not apply; {hint}, or set "
                f"config.sliding_window = None"
            )
        dropout_p = self.dropout_p(module, dropout, spec)
        keep = None
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError(
                    f"fastattn attention takes the 2-D padding mask (B, L) built by its own mask function; got a "
                    f"{attention_mask.dim()}-D mask (a custom 4-D attention_mask cannot be honoured)"
                )
            keep = attention_mask.bool()
        out = self.attend(module, mech, query, key, value, keep, causal, scaling, dropout_p, position_ids)
        return out.transpose(1, 2).contiguous(), None

    def attend(
        self, module: nn.Module, mech: nn.Module, q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None,
        causal: bool, scale: float | None, dropout_p: float, position_ids: Tensor | None,
    ) -> Tensor:
        if getattr(module, "fastattn_transfer", False):  # fastattn.hf.distill's attention-transfer stage
            from .distill import transfer_loss

            pad = None if keep is None else ~keep[:, -k.shape[2]:]
            captured = getattr(module, "fastattn_captured", None)
            if captured is not None:  # record this layer's inputs; train on them later without the model
                captured.append((q.detach(), k.detach(), v.detach(), pad, causal, scale))
            module.fastattn_transfer_loss, out = transfer_loss(mech, q, k, v, pad, causal, scale,
                                                               with_loss=captured is None)
            return out
        state_layer = getattr(module, "_fastattn_cache_layer", None)
        if state_layer is not None:  # a linearized layer decoding: fastattn's own state lives in the cache
            if not causal:
                raise ValueError("decoding with a cache needs a causal attention layer")
            t = q.shape[2]
            pad = None if keep is None else ~keep[:, -t:]
            if pad is not None and not bool(pad.any()):
                pad = None
            out, state_layer.state = mech.step(q, k, v, state_layer.state, scale if scale is not None
                                               else q.shape[-1] ** -0.5, key_padding_mask=pad)
            return out
        pad = None if keep is None else ~keep[:, -k.shape[2]:]
        if pad is not None and not bool(pad.any()):
            pad = None
        segments = packed_segments(position_ids) if pad is None and q.shape[2] == k.shape[2] else None
        if segments is None:
            return mech.run(q, k, v, key_padding_mask=pad, is_causal=causal, scale=scale, dropout_p=dropout_p)
        # packed sequences: each document attends to itself only (as if it were alone)
        if segments.shape[0] != q.shape[0]:
            segments = segments.expand(q.shape[0], -1)
        out = q.new_zeros(*q.shape[:3], v.shape[-1])
        for b in range(q.shape[0]):
            bounds = torch.nonzero(torch.diff(segments[b], prepend=segments[b, :1] - 1)).flatten().tolist()
            bounds.append(q.shape[2])
            for s0, s1 in zip(bounds[:-1], bounds[1:]):
                out[b:b + 1, :, s0:s1] = mech.run(
                    q[b:b + 1, :, s0:s1], k[b:b + 1, :, s0:s1], v[b:b + 1, :, s0:s1], is_causal=causal,
                    scale=scale, dropout_p=dropout_p,
                )
        return out


def layer_seed(seed: int, module: nn.Module) -> int:
    idx = getattr(module, "layer_idx", None)
    idx = 0 if idx is None else int(idx)
    return (int(seed) * 1_000_003 + idx * 7_919 + 17) % (2**31 - 1)


def build_mechanism(
    spec: MethodSpec, options: Any, module: nn.Module, num_heads: int, num_kv_heads: int, head_dim: int,
    seed: int,
) -> nn.Module:
    """The mechanism of one attention module; randomised ones draw from a generator seeded per layer."""
    kwargs = {"generator": torch.Generator().manual_seed(layer_seed(seed, module))} if spec.randomized else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(layer_seed(seed, module))  # mechanisms that initialise parameters randomly
        return spec.cls(options, head_dim=head_dim, num_heads=num_heads, num_kv_heads=num_kv_heads, **kwargs)


def mask_function(
    batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
    mask_function: Any = None, attention_mask: Tensor | None = None, **kwargs: Any,
) -> Tensor | None:
    """The mask transformers hands to the attention function: ``None`` (nothing padded) or the 2-D keep
    mask ``(B, kv_length)``, True = attend (the flash-attention convention; fastattn inverts it)."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        return attention_mask  # a prepared 4-D mask: the attention function refuses it by name
    attention_mask = attention_mask[:, -kv_length:].bool()
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask


def register(name: str, method: str = "linear", *, seed: int = 0, dropout: str = "error", **options: Any) -> str:
    """Register fastattn ``method`` as the transformers attention implementation ``name`` (the attention
    function and its mask function, both under ``name``) and return ``name``.

    Args:
        name: the implementation's name, passed as ``attn_implementation=name`` to ``from_pretrained`` /
            ``from_config`` (or ``model.set_attn_implementation(name)``).
        method: a functional fastattn id (``fastattn.methods()``); learned mechanisms (``hedgehog``, layer-level
            ones) own parameters and need :func:`fastattn.hf.linearize`.
        seed: randomised mechanisms (``performer``) draw once per attention module from ``(seed, layer_idx)``.
        dropout: what to do when a model trains with attention dropout: ``"error"`` (default; a
            ``ValueError`` naming the config field to set to 0), ``"ignore"`` (train without it) or
            ``"apply"`` (mechanisms that support dropout).
        **options: the mechanism's options, validated now.

    Example:
        >>> name = fastattn.hf.register("fastattn-linear", method="linear")
        >>> model = AutoModelForCausalLM.from_config(config, attn_implementation=name)
    """
    attention_interface, mask_interface = _transformers()
    spec = get_method(method)
    if spec.kind != "sequence":
        raise ValueError(f"method {method!r} is a {spec.kind} mechanism, not a sequence attention")
    if not spec.functional:
        raise ValueError(
            f"method {method!r} has learned parameters, which an attention function cannot own; use "
            f"fastattn.hf.linearize(model, method={method!r}) (a module swap: they become model parameters)"
        )
    if dropout not in DROPOUT_POLICIES:
        raise ValueError(f"dropout must be one of {DROPOUT_POLICIES}, got {dropout!r}")
    adapter = Adapter(name=name, spec=spec, options=spec.make_options(**options), seed=seed, dropout=dropout)
    _ADAPTERS[name] = adapter
    attention_interface.register(name, adapter)
    mask_interface.register(name, mask_function)
    return name


def adapter(name: str) -> Adapter:
    """The :class:`Adapter` registered under ``name``."""
    return _ADAPTERS[name]
