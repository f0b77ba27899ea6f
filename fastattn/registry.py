"""The registry: every mechanism, its paper, its capabilities and its options.

A mechanism registers itself with :func:`register` on its class. Paper metadata (title, arXiv id, year,
family, kind, one-line idea) comes from ``catalogue.tsv`` shipped with the package, so the ids and the
papers cannot drift from the project catalogue; the decorator adds what only the code knows:
capability flags, complexity (as text, and as declared growth exponents of time and memory in the
sequence length) and the typed options.

>>> import fastattn
>>> spec = fastattn.get_method("flash")
>>> spec.causal, spec.exact, spec.options
(True, True, {'block_q': 1024, 'block_k': 1024})
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import functools
import importlib
import importlib.util
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Callable

import torch

__all__ = ["MethodSpec", "register", "methods", "get_method", "catalogue"]


@functools.lru_cache(maxsize=None)
def catalogue() -> dict[str, dict[str, str]]:
    """The project catalogue: id -> {family, kind, causal, arxiv, year, paper, idea}."""
    text = resources.files(__package__).joinpath("catalogue.tsv").read_text(encoding="utf-8")
    rows = csv.DictReader(text.splitlines(), delimiter="\t")
    return {row["id"]: row for row in rows}


@dataclass(frozen=True)
class MethodSpec:
    """What the library knows about one mechanism.

    Capability flags are promises checked by the contract tests:
    ``causal`` -- changing future tokens never changes past outputs under ``is_causal=True``;
    ``padding`` -- keys marked by ``key_padding_mask`` never matter;
    ``decoding`` -- ``MultiheadAttention.step`` equals the causal forward;
    ``exact`` -- the output equals softmax attention (to float64 precision);
    ``functional`` -- usable through :func:`fastattn.attention`: the mechanism with its default options
    owns no learned parameters (derived from the class when the mechanism is loaded, never declared);
    ``attn_mask`` -- accepts an arbitrary (additive or boolean) attention mask;
    ``dropout`` -- supports dropout on the attention weights;
    ``weights`` -- can return the attention weights (``need_weights=True``);
    ``randomized`` -- draws random numbers (features, hashes, blocks) and accepts ``generator=``.

    ``level`` says what the mechanism receives: ``"sequence"`` -- per-head ``q, k, v`` after the
    layer's standard projections (a :class:`~fastattn.core.base.Mechanism`); ``"layer"`` -- the layer
    input itself, owning or replacing the projections (a :class:`~fastattn.core.layer.LayerMechanism`,
    reached through ``MultiheadAttention`` only, never functional).
    ``time_growth`` and ``memory_growth`` are the exponents ``a`` of ``n ** a`` that time and peak
    memory of one forward call grow with at the default options (head dim, features and windows fixed):
    2.0 for dense softmax, 1.0 for linear attention and fixed windows, 1.5 for ``n sqrt(n)``; an
    ``n log n`` mechanism declares the local slope at practical lengths, 1.1. ``None``: not declared
    (the benchmark then assumes 2.0). The free-text ``complexity`` is for people, these are for code.
    """

    name: str
    title: str
    arxiv: str
    year: int
    family: str
    kind: str
    summary: str
    complexity: str
    causal: bool
    decoding: bool
    padding: bool
    exact: bool
    attn_mask: bool = False
    dropout: bool = False
    weights: bool = False
    randomized: bool = False
    level: str = "sequence"
    functional: bool | None = None  # None until derived (see ``owns_no_parameters``)
    options: dict[str, Any] = field(default_factory=dict)
    time_growth: float | None = None
    memory_growth: float | None = None
    cls: type | None = field(default=None, repr=False, compare=False)

    @property
    def options_type(self) -> type:
        return self.cls.Options  # type: ignore[union-attr]

    def make_options(self, **given: Any) -> Any:
        """Build the typed options; an unknown name is a ``ValueError`` listing the valid ones."""
        valid = list(self.options)  # the Options fields (read at registration: torch.compile traces this)
        unknown = sorted(set(given) - set(valid))
        if unknown:
            hint = ", ".join(valid) if valid else "none"
            raise ValueError(
                f"unknown option(s) {unknown} for method {self.name!r}; valid options: {hint}"
            )
        return self.options_type(**given)

    def resolve_options(self, options: Any = None) -> Any:
        """A mechanism constructor's ``options`` argument as the typed options: ``None`` gives the
        defaults, a dict is validated by :meth:`make_options`, typed options pass through."""
        if options is None:
            return self.make_options()
        if isinstance(options, dict):
            return self.make_options(**options)
        return options

    def capabilities(self) -> list[str]:
        flags = ["causal", "decoding", "padding", "exact", "attn_mask", "dropout", "weights"]
        return [f for f in flags if getattr(self, f)]


_REGISTRY: dict[str, MethodSpec] = {}


def register(
    name: str,
    *,
    complexity: str,
    causal: bool,
    decoding: bool,
    padding: bool,
    exact: bool = False,
    attn_mask: bool = False,
    dropout: bool = False,
    weights: bool = False,
    randomized: bool = False,
    level: str = "sequence",
    time_growth: float | None = None,
    memory_growth: float | None = None,
) -> Callable[[type], type]:
    """Class decorator adding a :class:`~fastattn.core.base.Mechanism` subclass (``level="sequence"``)
    or a :class:`~fastattn.core.layer.LayerMechanism` subclass (``level="layer"``, never functional)
    to the registry.

    The class must define a frozen dataclass ``Options`` whose fields all have defaults.
    ``time_growth`` / ``memory_growth``: see :class:`MethodSpec` (positive numbers, at most 3).
    """
    for what, value in (("time_growth", time_growth), ("memory_growth", memory_growth)):
        if value is not None and not (isinstance(value, (int, float)) and 0.0 < float(value) <= 3.0):
            raise ValueError(f"{name!r}: {what} must be a number in (0, 3], got {value!r}")

    def wrap(cls: type) -> type:
        row = catalogue().get(name)
        if row is None:
            close = difflib.get_close_matches(name, catalogue(), n=3)
            raise ValueError(f"{name!r} is not an id of catalogue.tsv (close: {close})")
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} registered twice")
        opts = getattr(cls, "Options", None)
        if opts is None or not dataclasses.is_dataclass(opts):
            raise TypeError(f"{cls.__name__} must define a dataclass `Options`")
        defaults = {}
        for f in dataclasses.fields(opts):
            if f.default is not dataclasses.MISSING:
                defaults[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                defaults[f.name] = f.default_factory()  # type: ignore[misc]
            else:
                raise TypeError(f"option {f.name!r} of {name!r} needs a default")
        spec = MethodSpec(
            name=name,
            title=row["paper"],
            arxiv=row["arxiv"],
            year=int(row["year"]),
            family=row["family"],
            kind=row["kind"],
            summary=row["idea"],
            complexity=complexity,
            causal=causal,
            decoding=decoding,
            padding=padding,
            exact=exact,
            attn_mask=attn_mask,
            dropout=dropout,
            weights=weights,
            randomized=randomized,
            level=level,
            options=defaults,
            time_growth=None if time_growth is None else float(time_growth),
            memory_growth=None if memory_growth is None else float(memory_growth),
            cls=cls,
        )
        if decoding and not causal:
            raise ValueError(f"{name!r}: decoding=True needs a causal form")
        if level not in ("sequence", "layer"):
            raise ValueError(f"{name!r}: level must be 'sequence' or 'layer', got {level!r}")
        cls.spec = spec
        _REGISTRY[name] = spec
        return cls

    return wrap


def owns_no_parameters(cls: type) -> bool:
    """True when ``cls`` built with its default options has no learned parameters (buffers, such as
    random features, are fine). Built small, on the CPU, without touching torch's global random state."""
    with torch.random.fork_rng(devices=[]):
        kwargs = {"generator": torch.Generator().manual_seed(0)} if cls.spec.randomized else {}  # type: ignore[attr-defined]
        try:
            mech = cls(None, head_dim=16, num_heads=12, num_kv_heads=12, **kwargs)
        except Exception as e:
            raise RuntimeError(
                f"cannot build {cls.__name__} with its default options (head_dim=16, num_heads=12) to tell "
                f"whether it owns learned parameters: {e}"
            ) from e
    return not any(True for _ in mech.parameters())


def _derive(spec: MethodSpec) -> MethodSpec:
    """``spec`` with ``functional`` derived from its class (once; the class is fully defined by now):
    a sequence mechanism over ``(q, k, v)`` that owns no learned parameters."""
    if spec.functional is not None or spec.cls is None:
        return spec
    plain = spec.kind == "sequence" and getattr(spec, "level", "sequence") != "layer"
    done = dataclasses.replace(spec, functional=plain and owns_no_parameters(spec.cls))
    spec.cls.spec = done  # type: ignore[attr-defined]
    _REGISTRY[spec.name] = done
    return done


def _module(name: str) -> str:
    """Where the mechanism ``name`` lives: ``fastattn.mechanisms.<family>.<id>``."""
    return f"{__package__}.mechanisms.{catalogue()[name]['family']}.{name}"


def _load(name: str) -> MethodSpec | None:
    """The spec of ``name``, importing its module the first time; ``None`` when not implemented."""
    if name not in _REGISTRY and name in catalogue():
        module = _module(name)
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # the family package does not exist yet
            found = False
        if found:
            importlib.import_module(module)
            if name not in _REGISTRY:
                raise RuntimeError(f"{module} does not register {name!r}")
    spec = _REGISTRY.get(name)
    return None if spec is None else _derive(spec)


def _load_all() -> None:
    for name in catalogue():
        _load(name)


def methods(family: str | None = None) -> list[MethodSpec]:
    """Every registered mechanism (optionally one family), in catalogue order."""
    _load_all()
    order = list(catalogue())
    specs = sorted((_derive(s) for s in list(_REGISTRY.values())), key=lambda s: order.index(s.name))
    return [s for s in specs if family is None or s.family == family]


def _prepare(name: str) -> str | None:
    """Load ``name`` (import its module, derive its spec) and return ``None``, or the error message of an
    unknown name. Marked constant for ``torch.compile`` (below): a trace runs it eagerly, once per traced
    name, instead of tracing the import (a graph break), so a cold ``torch.compile(fastattn.attention,
    fullgraph=True)`` works."""
    if _load(name) is not None:
        return None
    _load_all()
    close = difflib.get_close_matches(name, list(_REGISTRY), n=4, cutoff=0.5)
    pending = " (it is in the catalogue but not implemented yet)" if name in catalogue() else ""
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    return f"unknown attention method {name!r}{pending}{hint} (fastattn.methods() lists all {len(_REGISTRY)})"


# What ``torch.compiler.assume_constant_result(_prepare)`` does, without importing ``torch._dynamo``
# (about a second) in programs that never compile.
_prepare._dynamo_marked_constant = True  # type: ignore[attr-defined]


def get_method(name: str) -> MethodSpec:
    """The spec of one mechanism; an unknown name is a ``ValueError`` that lists close names."""
    if not isinstance(name, str):
        raise TypeError(f"method must be a string id, got {type(name).__name__}")
    problem = _prepare(name)
    if problem is not None:
        raise ValueError(problem)
    return _REGISTRY[name]
