"""Backends: who computes a call once a mechanism is chosen.

A mechanism has one mathematics and possibly several implementations of it. Each implementation is a
:class:`Backend` with a name, a ``why_not(spec, call)`` that says why it cannot take a call (``None``
when it can) and a ``run`` that computes it. Today there are three:

* ``"cpp"`` -- compiled C++ kernels of the linear-attention op (kernel family) and of the block-sparse
  engine (mechanisms declaring ``compiled_block_sparse``: the pattern mechanisms), CPU, built on first
  use (:mod:`fastattn.ops.linear.compiled`, :mod:`fastattn.ops.sparse.compiled`); without a compiler,
  or if the build fails, it says why and ``auto`` goes on to ``"torch"``. A block-sparse call the
  kernels do not take (extra nodes) runs on the PyTorch engine. Under ``auto`` it is
  opt-in (``FASTATTN_CPP=1``);
* ``"torch"`` -- the mechanism's efficient PyTorch ``forward``; it takes every call;
* ``"reference"`` -- the paper's formula written literally (``Mechanism.reference``): no attention
  dropout, no decoding state.

``backend="auto"`` picks the first registered backend that takes the call, in priority order (compiled
backends, when registered, come before ``"torch"``; ``"reference"`` is last). Naming a backend that
cannot take the call is a ``ValueError`` listing, for every backend, why not -- never a silent fallback.

Adding a backend is one call::

    class Triton(Backend):
        name = "triton"
        def why_not(self, spec, call):
            if call.device.type != "cuda":
                return "needs CUDA"
            if spec.name not in KERNELS:
                return f"no kernel for {spec.name!r}"
            return None
        def run(self, mech, q, k, v, mask, scale, dropout_p):
            return KERNELS[mech.spec.name](q, k, v, mask, scale)

    register_backend(Triton(), before="torch")
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .masks import Mask

if TYPE_CHECKING:
    from ..registry import MethodSpec
    from .base import Mechanism

__all__ = ["Backend", "Call", "register_backend", "backends", "backend_status", "choose_backend", "check_backend_name"]


@dataclass(frozen=True)
class Call:
    """What a backend is asked to do: enough to decide whether it can, before any work.

    ``decoding``: a ``step`` with a decoding state (not a full forward). ``device``/``dtype``: of the
    query. ``dropout_p``: attention dropout. ``attn_mask``: an arbitrary mask is given."""

    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    dropout_p: float = 0.0
    decoding: bool = False
    attn_mask: bool = False


class Backend:
    """One implementation of the mechanisms' mathematics. Subclasses set ``name`` and implement
    :meth:`why_not` and :meth:`run`."""

    name: str = ""

    def why_not(self, spec: MethodSpec, call: Call) -> str | None:
        """Why this backend cannot take ``call`` for mechanism ``spec``; ``None`` when it can."""
        raise NotImplementedError

    def run(self, mech: Mechanism, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, dropout_p: float) -> Tensor:
        """Compute the call (inputs already validated, grouped-query heads expanded unless the
        mechanism takes them natively, half precision handled by the mechanism's policy)."""
        raise NotImplementedError

    def context(self) -> contextlib.AbstractContextManager:
        """What a decoding ``step`` runs inside when this backend was chosen (nothing by default)."""
        return contextlib.nullcontext()

    def auto_why_not(self) -> str | None:
        """Why ``backend="auto"`` skips this backend whatever the call (an opt-in backend); ``None``
        when it may pick it."""
        return None

    def status(self) -> str | None:
        """Why the backend cannot take any call now (not installed, not built); ``None`` when it can
        take some. Cheap: builds nothing."""
        return None


class TorchBackend(Backend):
    name = "torch"

    def why_not(self, spec: MethodSpec, call: Call) -> str | None:
        return None

    def run(self, mech, q, k, v, mask, scale, dropout_p):
        return mech.forward(q, k, v, mask, scale, dropout_p)


class ReferenceBackend(Backend):
    name = "reference"

    def why_not(self, spec: MethodSpec, call: Call) -> str | None:
        if call.dropout_p > 0:
            return "the reference formula has no attention dropout"
        if call.decoding:
            return "the reference formula keeps no decoding state"
        return None

    def run(self, mech, q, k, v, mask, scale, dropout_p):
        return mech.reference(q, k, v, mask, scale)


class CppBackend(Backend):
    """The compiled CPU kernels of the linear-attention op (:mod:`fastattn.ops.linear.compiled`), for
    the mechanisms of the kernel family, and of the block-sparse engine
    (:mod:`fastattn.ops.sparse.compiled`), for mechanisms whose class sets ``compiled_block_sparse``;
    built on first use. Opt-in under ``auto`` (``FASTATTN_CPP=1``)."""

    name = "cpp"

    def why_not(self, spec: MethodSpec, call: Call) -> str | None:
        if call.device.type != "cpu":
            return "CPU only"
        if spec.family != "kernel" and not getattr(spec.cls, "compiled_block_sparse", False):
            return ("compiled kernels exist for the linear-attention op (the kernel family) and the "
                    "block-sparse engine (pattern mechanisms) only")
        from fastattn.ops.linear import compiled
        return compiled.build()

    def run(self, mech, q, k, v, mask, scale, dropout_p):
        with self.context():
            return mech.forward(q, k, v, mask, scale, dropout_p)

    def context(self):
        from fastattn.ops.linear import compiled
        return compiled.use()

    def auto_why_not(self) -> str | None:
        from fastattn.ops.linear import compiled
        if compiled.auto_enabled():
            return None
        return "opt-in under backend='auto': set FASTATTN_CPP=1, or ask for backend='cpp'"

    def status(self) -> str | None:
        from fastattn.ops.linear import compiled
        return compiled.status()


_BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend, *, before: str | None = None) -> Backend:
    """Add ``backend`` to the dispatch; ``auto`` tries it before the backend named ``before`` (default:
    last). Registering a name twice is a ``ValueError``."""
    if not isinstance(backend, Backend) or not backend.name or backend.name == "auto":
        raise ValueError("a backend is a Backend instance with a name other than 'auto'")
    if backend.name in _BACKENDS:
        raise ValueError(f"backend {backend.name!r} is already registered")
    if before is not None and before not in _BACKENDS:
        raise ValueError(f"no backend {before!r} to insert before; registered: {list(_BACKENDS)}")
    items = list(_BACKENDS.items())
    at = len(items) if before is None else [n for n, _ in items].index(before)
    items.insert(at, (backend.name, backend))
    _BACKENDS.clear()
    _BACKENDS.update(items)
    return backend


def backends() -> list[str]:
    """The registered backend names, in the order ``auto`` tries them."""
    return list(_BACKENDS)


def backend_status() -> dict[str, str | None]:
    """Each registered backend (in ``auto``'s order) and why it cannot take any call now -- not built,
    no compiler, a failed build, opt-in under ``auto`` -- or ``None`` when it can (``fastattn.backends()``)."""
    result = {}
    for name, b in _BACKENDS.items():
        why = b.status()
        opt_in = b.auto_why_not()
        result[name] = why if why is not None or opt_in is None else f"available; {opt_in}"
    return result


# compiled backends the interface names (API section 9); they register themselves when installed
PLANNED = ("triton", "flex")


def check_backend_name(name: str) -> None:
    """A ``ValueError`` listing the valid names when ``name`` is neither ``"auto"`` nor a backend."""
    if name == "auto" or name in _BACKENDS:
        return
    valid = "valid backends: 'auto', " + ", ".join(map(repr, _BACKENDS))
    if name in PLANNED:
        raise ValueError(f"backend {name!r} is not installed in this build; {valid}")
    raise ValueError(f"unknown backend {name!r}; {valid}")


def choose_backend(name: str, spec: MethodSpec, call: Call) -> Backend:
    """The backend that computes ``call``: ``name`` itself, or for ``"auto"`` the first that takes it.
    A ``ValueError`` listing every backend's reason when none (or not the named one) can."""
    check_backend_name(name)
    candidates = list(_BACKENDS.values()) if name == "auto" else [_BACKENDS[name]]
    reasons = {}
    for b in candidates:
        why = b.auto_why_not() if name == "auto" else None
        why = why if why is not None else b.why_not(spec, call)
        if why is None:
            return b
        reasons[b.name] = why
    for b in _BACKENDS.values():  # the reasons of the others too, so the message says what would work
        if b.name not in reasons:
            why = b.auto_why_not() if name == "auto" else None
            why = why if why is not None else b.why_not(spec, call)
            reasons[b.name] = "would take this call" if why is None else why
    listed = "; ".join(f"{n}: {r}" for n, r in reasons.items())
    raise ValueError(f"no backend can run method {spec.name!r} as asked (backend={name!r}): {listed}")


register_backend(CppBackend())
register_backend(TorchBackend())
register_backend(ReferenceBackend())
