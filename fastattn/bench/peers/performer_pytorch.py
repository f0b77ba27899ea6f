"""performer-pytorch (lucidrains): ``FastAttention`` -- FAVOR+ softmax-kernel features, causal and not."""

from __future__ import annotations

import torch

from . import peer


def _build(causal: bool):
    def build(q, k, v, case):
        from performer_pytorch import FastAttention

        torch.manual_seed(case.seed)
        m = int(case.options.get("num_features", 256))
        attn = FastAttention(dim_heads=q.shape[-1], nb_features=m, causal=causal).to(q.device, q.dtype)

        def fwd():
            return attn(q, k, v)  # heads-first (B, H, N, E), like fastattn
        return fwd
    return build


peer("performer_pytorch.causal", package="performer_pytorch", matches="performer", causal=True,
     note="FastAttention(causal=True): chunked cumsum of outer products")(_build(True))
peer("performer_pytorch", package="performer_pytorch", matches="performer", causal=False,
     note="FastAttention(causal=False)")(_build(False))
