"""lucidrains' ``local-attention`` package (``pip install local-attention``), compared with ``local``.

``LocalAttention(window_size=w, look_backward=1, look_forward=1 (0 if causal), exact_windowsize=True)``
lets query ``i`` see keys ``j`` with ``|i - j| <= w`` (causal: ``0 <= i - j <= w``) -- the same set as
fastattn's ``local`` with ``window=w``, so outputs agree. The package needs the length to be a multiple
of ``w``; with ``autopad=True`` it pads q, k, v with zeros, and without a mask its queries near the end
then attend those zero keys too (a zero key scores 0, not minus infinity). The adapter therefore passes
an all-True key mask of the real length, which the package pads with False.
"""

from __future__ import annotations

from . import peer


def _build(q, k, v, case):
    import torch
    from local_attention import LocalAttention

    from ...registry import get_method

    w = int({**get_method("local").options, **case.options}["window"])
    attn = LocalAttention(
        window_size=w, causal=case.causal, look_backward=1, look_forward=0 if case.causal else 1,
        exact_windowsize=True, autopad=True,
    ).to(q.device)
    keep = torch.ones(q.shape[0], k.shape[2], dtype=torch.bool, device=q.device)  # (B, N): real keys

    def fwd():
        return attn(q, k, v, mask=keep)  # accepts (B, H, N, E): leading axes are packed

    return fwd


peer("local_attention", package="local_attention", matches="local", causal=False,
     note="lucidrains/local-attention, exact_windowsize=True, look_backward=look_forward=1, key mask")(_build)
