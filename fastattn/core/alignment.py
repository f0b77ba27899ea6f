"""The alignment kind (``kind="seq2seq"``): a decoder's queries attend over an encoder's states.

Tensors are batch first and have no heads: ``query (B, Lq, Dq)``, ``keys (B, Lk, Dk)``, ``values
(B, Lk, Dv)``; the result is ``context (B, Lq, Dv)`` and ``weights (B, Lq, Lk)``, each row a
distribution over the real keys (0 on padding keys; a row with every key masked is all zeros).

An :class:`AlignmentMechanism` defines its energies ``e (B, Lq, Lk)`` twice: :meth:`~AlignmentMechanism.scores`
(efficient; it may use :meth:`~AlignmentMechanism.prepare`, the per-source work done once -- e.g.
Bahdanau's ``U_a h_j`` -- and reused by every query and decoder step) and
:meth:`~AlignmentMechanism.reference_scores` (the paper's formula, literally). The masked softmax and
the weighted sum of the values are shared. Callers go through :class:`fastattn.AlignmentAttention`,
which validates the inputs.

Decoding (:meth:`~AlignmentMechanism.step`) carries an :class:`AlignmentState`: the prepared keys of the
source and the number of steps taken; mechanisms with position state (a window's position, a monotonic
alignment) subclass it with more tensor fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from .masks import Mask, masked_softmax

from .registered import Registered

if TYPE_CHECKING:
    pass

__all__ = ["AlignmentMechanism", "AlignmentState"]


@dataclass(frozen=True)
class AlignmentState:
    """Decoding state over one source (API section 6): ``keys`` is the mechanism's prepared keys
    (batch first), ``length`` the query steps taken. ``select`` reorders or subsets the batch (beam
    search); ``to`` moves every tensor."""

    keys: Tensor
    length: int = 0

    def _map(self, fn: Any) -> AlignmentState:
        changes = {f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)
                   if isinstance(getattr(self, f.name), Tensor)}
        return dataclasses.replace(self, **changes)

    def select(self, index: Tensor) -> AlignmentState:
        return self._map(lambda t: t.index_select(0, index.to(t.device)))

    def to(self, device: torch.device | str) -> AlignmentState:
        return self._map(lambda t: t.to(device))

    def advance(self, steps: int) -> AlignmentState:
        return dataclasses.replace(self, length=self.length + steps)


class AlignmentMechanism(Registered):
    """Base class of the alignment mechanisms (kind ``"seq2seq"``). See the module docstring.

    Flags (class attributes; an instance may set ``normalized`` from its options):

    * ``normalized`` -- each weight row sums to 1 over the allowed keys. False for mechanisms whose
      weights are unnormalised by design (Graves' GMM window, Luong's local-p Gaussian factor); their
      rows are still 0 on padding keys.
    * ``recurrent`` -- query-recurrent: the result for query ``t`` depends on the queries before it
      (position state carried from step to step, e.g. a window whose centre only moves forward). A
      forward over ``Lq`` queries then equals ``Lq`` decoder steps from a fresh state, not ``Lq``
      independent one-query calls.
    * ``query_free`` -- the mechanism learns its ``num_queries`` queries (Lin et al.'s r hops) and is
      called with ``query=None`` (its ``query`` argument is then None).
    """

    normalized: bool = True
    recurrent: ClassVar[bool] = False
    query_free: ClassVar[bool] = False
    num_queries: int = 0  # the learned queries of a query-free mechanism

    def __init__(self, options: Any = None, *, query_dim: int, key_dim: int, value_dim: int) -> None:
        super().__init__(options)
        self.query_dim, self.key_dim, self.value_dim = query_dim, key_dim, value_dim

    def dims(self) -> str:
        return f"query_dim={self.query_dim}, key_dim={self.key_dim}, value_dim={self.value_dim}"

    # ---- to implement ---------------------------------------------------------------------------
    def prepare(self, keys: Tensor) -> Tensor:
        """The per-source work, done once for all queries and decoder steps. Default: the keys."""
        return keys

    def scores(self, query: Tensor, prepared: Tensor) -> Tensor:
        """Energies ``(B, Lq, Lk)`` of ``query (B, Lq, Dq)`` against the prepared keys (efficient)."""
        raise NotImplementedError

    def reference_scores(self, query: Tensor, keys: Tensor) -> Tensor:
        """The paper's energies, literally. Defaults to ``scores(query, prepare(keys))``."""
        return self.scores(query, self.prepare(keys))

    # ---- shared -------------------------------------------------------------------------------
    @staticmethod
    def attend(energies: Tensor, values: Tensor, mask: Mask) -> tuple[Tensor, Tensor]:
        """Masked softmax over keys and the weighted sum of the values: ``(context, weights)``."""
        bias = mask.additive(energies.dtype, energies.device)  # (B|1, 1, Lq, Lk) or None
        weights = masked_softmax(energies, None if bias is None else bias[:, 0])
        return torch.matmul(weights, values), weights

    def forward(
        self, query: Tensor, keys: Tensor, values: Tensor, mask: Mask, prepared: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        prepared = self.prepare(keys) if prepared is None else prepared
        return self.attend(self.scores(query, prepared), values, mask)

    def reference(self, query: Tensor, keys: Tensor, values: Tensor, mask: Mask) -> tuple[Tensor, Tensor]:
        return self.attend(self.reference_scores(query, keys), values, mask)

    def step(
        self, query: Tensor, keys: Tensor, values: Tensor, state: AlignmentState | None, mask: Mask,
    ) -> tuple[Tensor, Tensor, AlignmentState]:
        """One decoder step (``query (B, T, Dq)``, usually ``T = 1``). Default, for mechanisms without
        position state: the prepared keys are made on the first step and reused after."""
        if state is None:
            state = AlignmentState(self.prepare(keys))
        context, weights = self.forward(query, keys, values, mask, prepared=state.keys)
        return context, weights, state.advance(query.shape[1])
