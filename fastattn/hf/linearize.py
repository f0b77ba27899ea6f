"""``fastattn.hf.linearize``: swap the attention of a transformers model for a fastattn mechanism.

Each chosen attention module keeps its projections, rotary embedding and everything else it computes; what
changes is the attention between its projected ``q, k, v``: a fastattn mechanism owned by the module as the
submodule ``fastattn_core`` (so learned parts -- hedgehog's feature maps -- are model parameters, trained
by :func:`fastattn.hf.distill` and saved by ``save_pretrained``; random features are buffers, seeded per
layer). Layers left out keep exact softmax attention (hybrid models), through the same adapter.

Decoding: the cache layer of a swapped module becomes a :class:`FastattnStateLayer` (a transformers
linear-attention cache layer) holding fastattn's decoding state -- constant-size for kernel mechanisms --
instead of every past key and value, so ``generate()`` costs O(1) per token. It also answers the cache's
sequence-length questions (the causal-mask code asks them even when every layer is linear).

The choice is recorded in ``config.fastattn`` so :func:`from_pretrained` can rebuild the swapped model
and load its learned parts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from fastattn.registry import get_method
from .attention import _transformers, build_mechanism, register

__all__ = ["linearize", "from_pretrained", "attention_modules", "FastattnStateLayer", "IMPLEMENTATION"]

IMPLEMENTATION = "fastattn-linearized"  # the attention implementation of linearized models


def _cache_layer_class():
    from transformers.cache_utils import DynamicLayer, LinearAttentionLayer

    global FastattnStateLayer
    if FastattnStateLayer is not None:
        return FastattnStateLayer

    class _FastattnStateLayer(LinearAttentionLayer, DynamicLayer):
        """Cache layer of a linearized attention module: fastattn's decoding state (``state``, e.g. a
        constant-size :class:`~fastattn.ops.linear.state.LinearState`) and the number of positions seen.
        ``update`` stores no keys or values: it hands the new ones back for the module to feed its
        mechanism's ``step``. A :class:`~transformers.cache_utils.DynamicLayer` too, so the cache's length
        and mask-size questions are answered (the positions seen) even when every layer is linear."""

        is_compileable = False
        is_sliding = False
        is_croppable = False

        def __init__(self, **kwargs: Any) -> None:
            DynamicLayer.__init__(self)
            LinearAttentionLayer.__init__(self, number_of_states=1)
            self.state: Any = None
            self.seen = 0

        def lazy_initialization(self, *args: Any, **kwargs: Any) -> None:
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            self.is_initialized = True
            self.device = key_states.device
            self.seen += key_states.shape[-2]
            return key_states, value_states

        def get_seq_length(self) -> int:
            return self.seen

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.seen + query_length, 0

        def get_max_length(self) -> int:
            return -1

        def reset(self) -> None:
            self.state, self.seen = None, 0

        def _select(self, index) -> None:
            if self.state is not None:
                self.state = self.state.select(index)

        def reorder_cache(self, beam_idx) -> None:
            self._select(beam_idx)

        def batch_select_indices(self, indices) -> None:
            self._select(indices)

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.state is not None:
                b = self.state.batch_size
                self._select(torch.arange(b).repeat_interleave(repeats))

        def crop(self, tokens_to_remove: int) -> None:
            if tokens_to_remove:
                raise ValueError("a fastattn decoding state cannot be cropped (it does not keep past tokens)")

        def offload(self) -> None:
            pass

        def prefetch(self) -> None:
            pass

    _FastattnStateLayer.__name__ = _FastattnStateLayer.__qualname__ = "FastattnStateLayer"
    FastattnStateLayer = _FastattnStateLayer
    return FastattnStateLayer


FastattnStateLayer: Any = None  # the class, built on first use (it derives from transformers' classes)


def _cache_of(args: tuple, kwargs: dict) -> Any:
    for name in ("cache", "past_key_values", "past_key_value", "layer_past"):
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def _install_state_layer(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of a linearized module: make its cache layer a :class:`FastattnStateLayer`."""
    module._fastattn_cache_layer = None
    cache = _cache_of(args, kwargs)
    if cache is None:
        return
    cache = getattr(cache, "self_attention_cache", cache)
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise ValueError(f"fastattn cannot decode with a {type(cache).__name__}; use a DynamicCache (the default)")
    cls = _cache_layer_class()
    idx = module.layer_idx
    while len(layers) <= idx:
        layers.append(cls())
    if not isinstance(layers[idx], cls):
        old = layers[idx]
        if getattr(old, "is_initialized", False) and old.get_seq_length() > 0:
            raise ValueError(
                f"layer {idx}'s cache already holds keys and values; a linearized layer decodes from its own state "
                "(start generation with a fresh cache)"
            )
        layers[idx] = cls()
    module._fastattn_cache_layer = layers[idx]


def _clear_state_layer(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    module._fastattn_cache_layer = None


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of a transformers model: those with a ``layer_idx`` and ``is_causal``
    whose class name ends in "Attention" (not cross-attention), in layer order."""
    found = []
    for _, m in model.named_modules():
        name = type(m).__name__
        if (name.endswith("Attention") and hasattr(m, "layer_idx") and hasattr(m, "is_causal")
                and m.layer_idx is not None and "Cross" not in name and not getattr(m, "is_cross_attention", False)):
            found.append(m)
    return sorted(found, key=lambda m: int(m.layer_idx))


def _dims(model: nn.Module) -> tuple[int, int, int]:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = int(config.num_attention_heads)
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, int(kv), int(head_dim)


def _implementation(model: nn.Module) -> str:
    """Register (once) and select the implementation that serves linearized and kept layers alike:
    ``module.fastattn_core`` where a module has one, exact softmax attention elsewhere."""
    from .attention import _ADAPTERS

    if IMPLEMENTATION not in _ADAPTERS:
        register(IMPLEMENTATION, method="softmax", dropout="apply")
    impl = IMPLEMENTATION
    try:
        model.set_attn_implementation(impl)
    except (AttributeError, ValueError, TypeError, NotImplementedError):  # custom models: set the config
        model.config._attn_implementation = impl
    return impl


def linearize(
    model: nn.Module,
    method: str = "hedgehog",
    layers: str | Iterable[int] | Callable[[int], bool] = "all",
    *,
    seed: int = 0,
    dropout: str = "error",
    **options: Any,
) -> nn.Module:
    """Swap the attention of ``model``'s layers for fastattn ``method`` in place, and return the model.

    Args:
        model: a transformers model (decoder such as Llama / GPT-2, or encoder such as BERT).
        method: any sequence-level fastattn id; learned ones (``hedgehog``) get their parameters as
            model parameters (``model.<...>.self_attn.fastattn_core.*``), trained by :func:`distill`.
        layers: ``"all"``, the layer indices to swap (the others keep softmax attention: a hybrid
            model), or a predicate on the layer index.
        seed: per-layer seed of random parts (random features, initialisations).
        dropout: the attention-dropout policy (as in :func:`fastattn.hf.register`).
        **options: the mechanism's options.

    The model's attention implementation becomes ``"fastattn-linearized"``: swapped layers run their
    mechanism, the others exact softmax attention. Decoding keeps each swapped layer's fastattn state in
    the cache (:class:`FastattnStateLayer`), so ``generate()`` is O(1) per token for kernel mechanisms.
    """
    _transformers()
    spec = get_method(method)
    if spec.kind != "sequence" or spec.level != "sequence":
        raise ValueError(f"linearize takes a sequence-level attention mechanism, got {method!r} ({spec.kind}, "
                         f"{spec.level})")
    opts = spec.make_options(**options)
    modules = attention_modules(model)
    if not modules:
        raise ValueError(f"found no self-attention modules (with layer_idx and is_causal) in {type(model).__name__}")
    n = len(modules)
    if layers == "all":
        chosen = set(range(n))
    elif callable(layers):
        chosen = {i for i in range(n) if layers(i)}
    else:
        chosen = {int(i) % n if int(i) < 0 else int(i) for i in layers}  # type: ignore[union-attr]
        bad = sorted(i for i in chosen if not 0 <= i < n)
        if bad:
            raise ValueError(f"layers {bad} out of range: the model has {n} attention layers (0..{n - 1})")
    heads, kv_heads, head_dim = _dims(model)
    param = next(model.parameters())
    for m in modules:
        if int(m.layer_idx) not in chosen:
            continue
        if getattr(m, "fastattn_core", None) is not None:
            raise ValueError(f"layer {m.layer_idx} is already linearized ({m.fastattn_core.spec.name})")
        core = build_mechanism(spec, opts, m, heads, kv_heads, head_dim, seed).to(param.device)
        m.add_module("fastattn_core", core)
        m.fastattn_dropout = dropout
        if spec.decoding:
            m._fastattn_cache_layer = None
            m.register_forward_pre_hook(_install_state_layer, with_kwargs=True)
            m.register_forward_hook(_clear_state_layer, with_kwargs=True)
    _implementation(model)
    model.config.fastattn = {
        "method": method, "layers": sorted(chosen), "seed": seed, "dropout": dropout,
        "options": {k: getattr(opts, k) for k in spec.options},
    }
    return model


def from_pretrained(model_class: Any, path: str | Path, **kwargs: Any) -> nn.Module:
    """Load a model saved after :func:`linearize` (``save_pretrained``): build it with ``model_class``
    (e.g. ``AutoModelForCausalLM``), linearize it as recorded in ``config.fastattn``, and load the
    learned parts (the ``fastattn_core`` parameters and buffers) from the checkpoint."""
    model = model_class.from_pretrained(path, **kwargs)
    record = getattr(model.config, "fastattn", None)
    if not record:
        return model
    linearize(model, record["method"], layers=record["layers"], seed=record["seed"],
              dropout=record.get("dropout", "error"), **record["options"])
    state = _read_state_dict(Path(path))
    own = {k: v for k, v in state.items() if ".fastattn_core." in k}
    targets = dict(model.named_parameters())
    targets.update(dict(model.named_buffers()))
    wanted = {k for k in targets if ".fastattn_core." in k}
    with torch.no_grad():
        for k, v in own.items():
            # the checkpoint may come from the base model or from one with a head (a prefix more or less)
            name = k if k in targets else next((t for t in wanted if t.endswith(k) or k.endswith(t)), None)
            if name is None:
                raise ValueError(f"checkpoint entry {k!r} has no place in the linearized model")
            targets[name].copy_(v.to(targets[name].dtype))
            wanted.discard(name)
    if wanted:
        raise ValueError(f"the checkpoint lacks the learned attention parts {sorted(wanted)[:4]}...")
    return model


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no safetensors checkpoint in {path}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state

