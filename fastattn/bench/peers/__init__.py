"""Adapters to optional peer packages, used only to compare against (never as the implementation).

Each module in this folder registers adapters with :func:`peer`; an adapter turns heads-first
``q, k, v`` ``(B, H, N, E)`` and a :class:`~fastattn.bench.measure.Case` into a zero-argument function
computing the peer's output in the same layout, so that speed and numerical agreement are measured on
identical inputs. A peer that is not installed is reported as unavailable, never an error.

``fastattn bench --peers`` times every installed peer whose ``matches`` mechanism is selected beside
that mechanism (speed rows ``peer:<name>``, forward only, in the peer's ``causal`` mode) and reports
``rel_diff``, the relative difference of the two outputs on the same ``q, k, v``. For a randomised or
learned mechanism the adapter must give the peer the same random features or projections as fastattn's
module: build it with :func:`fastattn.bench.measure.make_mechanism` ``(case)`` (same options, seed and
default initialisation as the benchmark's) and copy its buffers/parameters into the peer.

An adapter module looks like::

    @peer("some_package.thing", package="some_package", matches="linear", causal=False)
    def thing(q, k, v, case):
        layer = some_package.Thing(dim=case.e)          # built once, outside the timed function
        return lambda: layer(q, k, v)                   # (B, H, N, Ev), same layout as fastattn
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable

__all__ = ["Peer", "peer", "peers", "get_peer"]


@dataclass(frozen=True)
class Peer:
    name: str            # e.g. "fast_transformers.causal_linear"
    package: str         # the import name that must be present
    matches: str         # the fastattn mechanism id it is compared with
    causal: bool         # which mode it implements
    build: Callable      # (q, k, v, case) -> zero-argument function returning (B, H, N, Ev)
    note: str = ""

    def available(self) -> bool:
        try:
            importlib.import_module(self.package)
        except Exception:  # an installed-but-broken peer is unavailable too
            return False
        return True


_PEERS: dict[str, Peer] = {}


def peer(name: str, *, package: str, matches: str, causal: bool, note: str = "") -> Callable:
    def wrap(fn: Callable) -> Callable:
        _PEERS[name] = Peer(name, package, matches, causal, fn, note)
        return fn
    return wrap


def _load() -> None:
    for mod in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{mod.name}")


def peers() -> list[Peer]:
    _load()
    return list(_PEERS.values())


def get_peer(name: str) -> Peer:
    _load()
    if name not in _PEERS:
        raise ValueError(f"unknown peer {name!r}; known: {sorted(_PEERS)}")
    return _PEERS[name]
