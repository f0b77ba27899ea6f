"""What every registered mechanism has, whatever its kind: the root of the four kind bases
(:class:`~fastattn.core.base.Mechanism` for sequence operators over ``(q, k, v)``,
:class:`~fastattn.core.layer.LayerMechanism` for layer-level ones, :class:`~fastattn.core.vision.VisionMechanism`
and :class:`~fastattn.core.alignment.AlignmentMechanism`).

A registered class carries its :class:`~fastattn.registry.MethodSpec` (set by ``@register``), a frozen
dataclass ``Options`` whose fields all have defaults, the options its contract tests use, the places it
knowingly departs from its paper, and an ``aux_loss`` (zero where it defines none).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from ..registry import MethodSpec

__all__ = ["Registered"]


class Registered(nn.Module):
    """Base of every registered mechanism class. Subclasses describe their sizes in :meth:`dims`."""

    spec: ClassVar[MethodSpec]
    # Options the contract tests use so that small inputs still exercise the interesting paths
    # (several blocks/chunks at the tests' odd lengths, few features, ...).
    test_options: ClassVar[dict[str, Any]] = {}
    # Where the mechanism knowingly departs from its paper (or the authors' code): one short sentence
    # each; the README's "Deviations from the papers" section is generated from these.
    deviations: ClassVar[tuple[str, ...]] = ()

    @dataclass(frozen=True)
    class Options:
        pass

    def __init__(self, options: Any = None) -> None:
        super().__init__()
        # typed options pass through (a class used inside another, such as a layer's standard projections,
        # need not be registered); None and dicts are resolved against the registry's spec
        self.options = self.spec.resolve_options(options) if options is None or isinstance(options, dict) else options
        self.aux_loss: Tensor = torch.zeros(())

    def dims(self) -> str:
        """The sizes this module was built for, for ``repr``."""
        return ""

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(self.options).items())
        spec = getattr(self, "spec", None)
        return (f"{spec.name}: " if spec else "") + ", ".join(x for x in (self.dims(), opts) if x)
