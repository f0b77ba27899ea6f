"""Baseline for sparse patterns: ``scaled_dot_product_attention`` given the pattern as a dense boolean
mask (what a user without a sparse kernel would run). ``case.options["method"]`` names the fastattn
mechanism whose pattern is used; the other options are that mechanism's. The ``(n, n)`` mask is built
once, outside the timed function (and before the memory baseline), as a given input.
"""

from __future__ import annotations

from . import peer


def _build(q, k, v, case):
    import torch
    import torch.nn.functional as F

    from ...registry import get_method

    opts = dict(case.options)
    spec = get_method(opts.pop("method"))
    kw = {"generator": torch.Generator().manual_seed(case.seed)} if spec.randomized else {}
    mech = spec.cls(spec.make_options(**opts), head_dim=case.e, num_heads=case.h, **kw)
    allowed = mech.dense_mask(q.shape[2], k.shape[2], causal=case.causal, device=q.device)

    def fwd():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)

    return fwd


peer("masked_sdpa", package="torch", matches="*", causal=False,
     note="torch SDPA with the sparse pattern as a dense (n, n) boolean mask")(_build)
