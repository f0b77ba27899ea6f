"""The decoding state of linear attention: what ``step`` carries from one call to the next."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from fastattn.core.state import DecodingState

__all__ = ["LinearState"]


@dataclass
class LinearState(DecodingState):
    """Constant-size state of causal linear attention after ``length`` positions (padding included):
    ``kv = S = sum_s w_s k'_s v_s^T`` ``(B, H, D, Ev)`` and the normaliser ``z = sum_s w_s k'_s``
    ``(B, H, D)`` (None for unnormalised attention), ``w_s`` the product of the gates after ``s``.
    Padded keys enter it as zeros. ``select`` (beam search) and ``to`` come from
    :class:`~fastattn.core.state.DecodingState`.

    ``log_scale`` ``(B, H)`` (float64), set when the keys came with per-token log-scales (the op's
    ``key_log_scale``): the running maximum ``M`` of those log-scales, and ``kv``, ``z`` are kept in units
    of ``exp(M)`` (the true state is ``kv * exp(M)``, which may not be representable). None: natural
    units."""

    kv: Tensor
    z: Tensor | None = None
    length: int = 0
    log_scale: Tensor | None = None

    batched = ("kv", "z", "log_scale")
