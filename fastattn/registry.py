"""The registry: every mechanism, its paper, its capabilities and its options.

A mechanism registers itself with :func:`register` on its class. Paper metadata (title, arXiv id, year,
family, kind, one-line idea) comes from ``catalogue.tsv`` shipped with the package, so the ids and the
papers cannot drift from the project catalogue; the decorator adds what only the code knows:
capability flags, complexity and the typed options.

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
    ``functional`` -- usable through :func:`fastattn.attention` (no learned parameters);
    ``attn_mask`` -- accepts an arbitrary (additive or boolean) attention mask;
    ``dropout`` -- supports dropout on the attention weights;
    ``weights`` -- can return the attention weights (``need_weights=True``);
    ``randomized`` -- draws random numbers (features, hashes, blocks) and accepts ``generator=``.
    """

    name: str
    title: str
    arxiv: str
    year: int
    family: str
    kind: str
    summary: str
    complexity: str
    functional: bool
    causal: bool
    decoding: bool
    padding: bool
    exact: bool
    attn_mask: bool = False
    dropout: bool = False
    weights: bool = False
    randomized: bool = False
    options: dict[str, Any] = field(default_factory=dict)
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
    functional: bool = True,
    attn_mask: bool = False,
    dropout: bool = False,
    weights: bool = False,
    randomized: bool = False,
) -> Callable[[type], type]:
    """Class decorator adding a :class:`~fastattn.core.base.Mechanism` subclass to the registry.

    The class must define a frozen dataclass ``Options`` whose fields all have defaults.
    """

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
            functional=functional,
            causal=causal,
            decoding=decoding,
            padding=padding,
            exact=exact,
            attn_mask=attn_mask,
            dropout=dropout,
            weights=weights,
            randomized=randomized,
            options=defaults,
            cls=cls,
        )
        if decoding and not causal:
            raise ValueError(f"{name!r}: decoding=True needs a causal form")
        cls.spec = spec
        _REGISTRY[name] = spec
        return cls

    return wrap


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
    return _REGISTRY.get(name)


def _load_all() -> None:
    for name in catalogue():
        _load(name)


def methods(family: str | None = None) -> list[MethodSpec]:
    """Every registered mechanism (optionally one family), in catalogue order."""
    _load_all()
    order = list(catalogue())
    specs = sorted(_REGISTRY.values(), key=lambda s: order.index(s.name))
    return [s for s in specs if family is None or s.family == family]


def get_method(name: str) -> MethodSpec:
    """The spec of one mechanism; an unknown name is a ``ValueError`` that lists close names."""
    if not isinstance(name, str):
        raise TypeError(f"method must be a string id, got {type(name).__name__}")
    spec = _load(name)
    if spec is not None:
        return spec
    _load_all()
    close = difflib.get_close_matches(name, list(_REGISTRY), n=4, cutoff=0.5)
    pending = " (it is in the catalogue but not implemented yet)" if name in catalogue() else ""
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ValueError(
        f"unknown attention method {name!r}{pending}{hint} (fastattn.methods() lists all {len(_REGISTRY)})"
    )
