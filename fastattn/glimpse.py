"""``fastattn.GlimpseAttention``: recurrent hard attention over an image -- glimpses at locations chosen by
a stochastic policy (registry kind ``"vision"``, modules derived from
:class:`~fastattn.core.vision.GlimpseMechanism`; ``method="glimpse"``, Ba et al.'s DRAM)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .core.vision import GlimpseMechanism, GlimpseResult, GlimpseState, check_feature_map, reinforce_loss
from .registry import get_method

__all__ = ["GlimpseAttention", "GlimpseResult", "GlimpseState", "reinforce_loss"]


class GlimpseAttention(nn.Module):
    """Glimpses: ``result = m(x, num_glimpses=None)``, ``x (B, C, H, W)`` any ``H, W``.

    Returns a :class:`GlimpseResult`: ``features (B, N, hidden)`` for the task's head, ``locations
    (B, N, 2)`` in ``[-1, 1]`` (``(x, y)``), ``log_probs (B, N)``, ``baselines (B, N)`` and ``means``.
    Locations are sampled in training mode (``sample=None``; pass ``generator=`` for reproducible
    draws, or set one at construction) and are the policy's means in eval mode. Train the policy with
    :func:`reinforce_loss` (``result``, the task's reward); the sampling itself is not differentiable.

    ``step(x, state=None)`` takes one glimpse after ``state`` (``None`` at the start): ``N`` steps equal
    a forward over ``N`` glimpses with the same random draws.

    Example:
        >>> m = fastattn.GlimpseAttention(1, patch=8, scales=3, hidden=64)
        >>> r = m(torch.randn(16, 1, 60, 60), num_glimpses=6)
        >>> logits = classifier(r.features[:, -1]); reward = (logits.argmax(-1) == y).float()
        >>> loss = cross_entropy(logits, y) + fastattn.reinforce_loss(r, reward)
    """

    def __init__(
        self, channels: int, method: str = "glimpse", *, generator: torch.Generator | None = None,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None, **options: Any,
    ) -> None:
        super().__init__()
        spec = get_method(method)
        if spec.cls is None or not issubclass(spec.cls, GlimpseMechanism):
            raise ValueError(
                f"method {method!r} is not a glimpse mechanism; GlimpseAttention takes "
                f"{[s.name for s in _glimpse_specs()]}"
            )
        if not isinstance(channels, int) or channels <= 0:
            raise ValueError(f"channels must be a positive integer, got {channels!r}")
        self.spec, self.method, self.channels = spec, method, channels
        self.mechanism = spec.cls(  # type: ignore[misc]
            spec.make_options(**options), channels=channels, generator=generator, device=device, dtype=dtype
        )

    @property
    def aux_loss(self) -> Tensor:
        return self.mechanism.aux_loss

    def _check(self, x: Tensor, state: Any) -> None:
        check_feature_map(x, self.channels)
        if state is not None and not isinstance(state, GlimpseState):
            raise TypeError(f"state must be None or the state a previous step returned, got {type(state).__name__}")
        if state is not None and state.h1.shape[0] != x.shape[0]:
            raise ValueError(f"state has batch {state.h1.shape[0]}, x has {x.shape[0]}")

    def forward(
        self, x: Tensor, num_glimpses: int | None = None, *, generator: torch.Generator | None = None,
        sample: bool | None = None,
    ) -> GlimpseResult:
        self._check(x, None)
        if num_glimpses is not None and (not isinstance(num_glimpses, int) or num_glimpses <= 0):
            raise ValueError(f"num_glimpses must be a positive integer, got {num_glimpses!r}")
        return self.mechanism(x, num_glimpses, generator=generator, sample=sample)[0]

    def reference(
        self, x: Tensor, num_glimpses: int | None = None, *, generator: torch.Generator | None = None,
        sample: bool | None = None,
    ) -> GlimpseResult:
        """The same glimpses with the sensor written literally (explicit crops)."""
        self._check(x, None)
        return self.mechanism.reference(x, num_glimpses, generator=generator, sample=sample)[0]

    def step(
        self, x: Tensor, state: GlimpseState | None = None, *, generator: torch.Generator | None = None,
        sample: bool | None = None,
    ) -> tuple[GlimpseResult, GlimpseState]:
        self._check(x, state)
        return self.mechanism(x, 1, state=state, generator=generator, sample=sample)


def _glimpse_specs() -> list:
    from .registry import methods

    return [s for s in methods() if s.cls is not None and issubclass(s.cls, GlimpseMechanism)]
