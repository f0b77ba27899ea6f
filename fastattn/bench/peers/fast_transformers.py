"""pytorch-fast-transformers (idiap): ``LinearAttention`` and ``CausalLinearAttention`` (elu + 1 feature
map; the causal one is a hand-written C++ kernel on CPU). Layout ``(B, N, H, E)``."""

from __future__ import annotations

from . import peer


def _build(causal: bool):
    def build(q, k, v, case):
        from fast_transformers.attention import CausalLinearAttention, LinearAttention
        from fast_transformers.masking import FullMask, LengthMask, TriangularCausalMask

        b, h, n, e = q.shape
        attn = (CausalLinearAttention if causal else LinearAttention)(e)
        mask = TriangularCausalMask(n, device=q.device) if causal else FullMask(n, device=q.device)
        lengths = LengthMask(q.new_full((b,), n, dtype=q.new_empty(0).long().dtype), max_len=n)

        def fwd():
            out = attn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, lengths, lengths)
            return out.transpose(1, 2)
        return fwd
    return build


peer("fast_transformers.causal_linear", package="fast_transformers", matches="linear", causal=True,
     note="CausalLinearAttention: C++ causal-product kernel")(_build(True))
peer("fast_transformers.linear", package="fast_transformers", matches="linear", causal=False,
     note="LinearAttention")(_build(False))
