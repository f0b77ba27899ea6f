"""performer-pytorch (lucidrains): ``FastAttention`` -- FAVOR+ softmax-kernel features, causal and not.

The peer draws its own random projection; compared on that, the two outputs would differ by the
Monte-Carlo error of two independent draws, not by the implementations. So the adapter builds fastattn's
``performer`` module exactly as the benchmark does (:func:`~fastattn.bench.measure.make_mechanism`: same
options, seed and generator) and copies its ``projection`` ``(num_features, head_dim)`` into the peer's
``projection_matrix`` buffer: both then estimate the kernel with the same features. (What difference
remains on unit-variance inputs is the peer's own numerics: it adds ``eps = 1e-4`` to key features
after shifting them by the largest exponent over all keys, which lifts the small ones.)
"""

from __future__ import annotations

from dataclasses import replace

import torch

from . import peer


def _build(causal: bool):
    def build(q, k, v, case):
        from performer_pytorch import FastAttention

        from ..measure import make_mechanism

        ours = make_mechanism(replace(case, impl="performer", mode="fwd"))
        proj = ours.projection.detach()
        attn = FastAttention(dim_heads=q.shape[-1], nb_features=proj.shape[0], causal=causal).to(q.device, q.dtype)
        with torch.no_grad():
            attn.projection_matrix.copy_(proj.to(attn.projection_matrix))
        del ours

        def fwd():
            return attn(q, k, v)  # heads-first (B, H, N, E), like fastattn
        return fwd
    return build


peer("performer_pytorch.causal", package="performer_pytorch", matches="performer", causal=True,
     note="FastAttention(causal=True): chunked cumsum of outer products; fastattn's random projection")(_build(True))
peer("performer_pytorch", package="performer_pytorch", matches="performer", causal=False,
     note="FastAttention(causal=False); fastattn's random projection")(_build(False))
