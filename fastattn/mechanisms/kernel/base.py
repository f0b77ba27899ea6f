"""``KernelMechanism``: a mechanism of the form ``phi(Q) (phi(K)^T V)``, supplying only ``phi``.

A subclass implements :meth:`KernelMechanism.features` (and :meth:`decay` if it has one); the base
class provides the efficient forward (:func:`~fastattn.ops.linear.engine.linear_attention`), the dense
reference (:func:`~fastattn.ops.linear.engine.dense_kernel_attention`) and constant-state decoding: prefill
and steps run the same tiled kernels from the saved :class:`~fastattn.ops.linear.state.LinearState`, so
``step`` equals the causal forward.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor

from fastattn.core.base import Mechanism, repeat_kv
from fastattn.core.masks import Mask
from fastattn.ops.linear.engine import dense_kernel_attention, linear_attention
from fastattn.ops.linear.state import LinearState

__all__ = ["KernelMechanism"]


class KernelMechanism(Mechanism):
    normalize: ClassVar[bool] = True  # divide by phi(q) . sum phi(k)
    # True when ``features`` maps each token on its own and holds no trainable parameters (buffers are
    # fine): the engine may then apply it tile by tile and recompute it in backward, so the full
    # feature tensors are never stored (see :mod:`fastattn.ops.linear.tiled`).
    tokenwise: ClassVar[bool] = False

    @property
    def native_gqa(self) -> bool:  # type: ignore[override]
        """Grouped-query key/value heads reach :meth:`forward` unexpanded -- the op keeps one state per
        key/value head -- where that is the same computation: a token-wise feature map (the same in
        every head), no per-head decay, and this class's own ``forward`` / ``reference``."""
        cls = type(self)
        return (self.tokenwise and self.decay() is None and cls.forward is KernelMechanism.forward
                and cls.reference is KernelMechanism.reference)

    def features(self, x: Tensor, *, is_query: bool, scale: float, mask: Mask) -> Tensor:
        """``phi(x)`` ``(B, H, L, D)``. ``mask`` lets key features ignore padded keys where a feature
        map looks across positions; under a causal mask a key's features may depend on that key only
        (anything else leaks the future)."""
        raise NotImplementedError

    def decay(self) -> Tensor | None:
        """Per-head decay ``(H,)`` in (0, 1] of the causal form, or ``None``."""
        return None

    @property
    def chunk(self) -> int:
        return int(getattr(self.options, "chunk", 64))

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, dropout_p: float = 0.0) -> Tensor:
        decay = self.decay() if mask.causal else None
        if self.tokenwise:
            def phi(x: Tensor, is_query: bool) -> Tensor:
                return self.features(x, is_query=is_query, scale=scale, mask=mask)

            return linear_attention(q, k, v, mask, phi=phi, decay=decay, normalize=self.normalize, chunk=self.chunk)
        fq = self.features(q, is_query=True, scale=scale, mask=mask)
        fk = self.features(k, is_query=False, scale=scale, mask=mask)
        return linear_attention(fq, fk, v, mask, decay=decay, normalize=self.normalize, chunk=self.chunk)

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
        fq = self.features(q, is_query=True, scale=scale, mask=mask)
        fk = self.features(k, is_query=False, scale=scale, mask=mask)
        decay = self.decay() if mask.causal else None
        return dense_kernel_attention(fq, fk, v, mask, decay=decay, normalize=self.normalize)

    def step(self, q: Tensor, k: Tensor, v: Tensor, state: Any, scale: float) -> tuple[Tensor, LinearState]:
        groups = q.shape[1] // k.shape[1]
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        mask = Mask(lq=q.shape[2], lk=k.shape[2], causal=True)
        fq = self.features(q, is_query=True, scale=scale, mask=mask)
        fk = self.features(k, is_query=False, scale=scale, mask=mask)
        out, new_state = linear_attention(
            fq, fk, v, mask, decay=self.decay(), normalize=self.normalize, chunk=self.chunk,
            state=state, return_state=True,
        )
        return out, new_state
