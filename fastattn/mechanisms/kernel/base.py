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
    # The name of a feature map the compiled kernels can apply themselves (a key of
    # ``fastattn.ops.linear.compiled.FUSED_FEATURES``) where ``features`` is exactly that map.
    fused_features: ClassVar[str | None] = None
    log_decay: ClassVar[bool] = False  # True: decay() returns log lambda (finite where lambda underflows)
    # True where a subclass overrides ``forward`` but still computes exactly the base form from
    # ``features``, ``decay``, ``key_log_scale`` (and, gated, ``token_gates``): sequence parallelism may then
    # recompute it chunk by chunk from states (LASP-2). The base class's own forward counts as such.
    kernel_form: ClassVar[bool] = False

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
        (anything else leaks the future). Where :meth:`key_log_scale` gives ``c``, key features are
        returned divided by ``exp(c)``."""
        raise NotImplementedError

    def key_log_scale(self, k: Tensor, *, scale: float, mask: Mask) -> Tensor | None:
        """Per-key log-scales ``c`` ``(B, H, Lk)`` or None (the default). A feature map whose key features
        can underflow (exponentials) returns them shifted, ``phi(k) exp(-c)``, from :meth:`features`,
        and ``c`` here (each ``c_s`` from key ``s`` alone; ``c`` is part of the features, so its
        gradient counts); the op carries a running maximum of ``c`` (see
        :mod:`fastattn.ops.linear.engine`)."""
        return None

    def decay(self) -> Tensor | None:
        """Per-head decay ``(H,)`` in (0, 1] of the causal form (its log where ``log_decay``), or ``None``."""
        return None

    @property
    def gated(self) -> bool:
        """True when this module's form decays its state by per-token gates that the caller computes
        (from the layer input) and hands over as logits (:meth:`token_gates`)."""
        return False

    def token_gates(self, fk: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
        """A gated form's per-token gates from the caller's gate logits ``(B, H, L)``: the gated key features
        and the per-token log-gates ``log g`` ``(B, H, L)`` that decay the causal state. Default: none."""
        raise ValueError(f"method {self.spec.name!r} has no per-token gates")

    def _decay(self, decay: Tensor | None) -> dict[str, Tensor | None]:
        """The op's keyword for what :meth:`decay` returned (rates, or their logs where ``log_decay``)."""
        return {"log_decay" if self.log_decay else "decay": decay}

    @property
    def chunk(self) -> int:
        return int(getattr(self.options, "chunk", 64))

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, dropout_p: float = 0.0) -> Tensor:
        decay = self.decay() if mask.causal else None
        c = self.key_log_scale(k, scale=scale, mask=mask)
        if self.tokenwise:
            def phi(x: Tensor, is_query: bool) -> Tensor:
                return self.features(x, is_query=is_query, scale=scale, mask=mask)

            phi.fused = self.fused_features  # type: ignore[attr-defined]

            return linear_attention(q, k, v, mask, phi=phi, normalize=self.normalize, chunk=self.chunk,
                                    key_log_scale=c, **self._decay(decay))
        fq = self.features(q, is_query=True, scale=scale, mask=mask)
        fk = self.features(k, is_query=False, scale=scale, mask=mask)
        return linear_attention(fq, fk, v, mask, normalize=self.normalize, chunk=self.chunk, key_log_scale=c,
                                **self._decay(decay))

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
        fq = self.features(q, is_query=True, scale=scale, mask=mask)
        fk = self.features(k, is_query=False, scale=scale, mask=mask)
        decay = self.decay() if mask.causal else None
        return dense_kernel_attention(fq, fk, v, mask, normalize=self.normalize,
                                      key_log_scale=self.key_log_scale(k, scale=scale, mask=mask),
                                      **self._decay(decay))

    def step(
        self, q: Tensor, k: Tensor, v: Tensor, state: Any, scale: float, key_padding_mask: Tensor | None = None
    ) -> tuple[Tensor, LinearState]:
        dtype = q.dtype
        q, k, v = self.upcast(q, k, v)
        groups = q.shape[1] // k.shape[1]
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        # padded keys enter the state as zeros, and are no positions: a per-head decay becomes per-token
        # gates, which the engine sets to 1 on padding (so a row decodes as it would alone)
        mask = Mask(lq=q.shape[2], lk=k.shape[2], key_padding=key_padding_mask, causal=True)
        decay = self.decay()
        if decay is not None and key_padding_mask is not None and decay.dim() == 1:
            decay = decay.view(1, -1, 1).expand(q.shape[0], -1, q.shape[2])
        # features that depend on positions (transnormer's LRPE) see the new tokens' absolute positions
        start = 0 if state is None else state.length
        at = mask if start == 0 else Mask(
            lq=q.shape[2], lk=k.shape[2], key_padding=key_padding_mask, causal=True, k_start=start
        )
        fq = self.features(q, is_query=True, scale=scale, mask=at)
        fk = self.features(k, is_query=False, scale=scale, mask=at)
        out, new_state = linear_attention(
            fq, fk, v, mask, normalize=self.normalize, chunk=self.chunk, state=state, return_state=True,
            key_log_scale=self.key_log_scale(k, scale=scale, mask=mask), **self._decay(decay),
        )
        return out.to(dtype), new_state
