"""lucidrains' ``local-attention`` package (``pip install local-attention``), compared with ``local``.

``LocalAttention(window_size=w, look_backward=1, look_forward=1 (0 if causal), exact_windowsize=True)``
lets query ``i`` see keys ``j`` with ``|i - j| <= w`` (causal: ``0 <= i - j <= w``) -- the same set as
fastattn's ``local`` with ``window=w``, so outputs agree. The package needs the length to be a multiple
of ``w`` unless ``autopad=True``, which is set.
"""

from __future__ import annotations

from . import peer


def _build(q, k, v, case):
    from local_attention import LocalAttention

    w = int(case.options.get("window", 256))
    attn = LocalAttention(
        window_size=w, causal=case.causal, look_backward=1, look_forward=0 if case.causal else 1,
        exact_windowsize=True, autopad=True,
    ).to(q.device)

    def fwd():
        return attn(q, k, v)  # accepts (B, H, N, E): leading axes are packed

    return fwd


peer("local_attention", package="local_attention", matches="local", causal=False,
     note="lucidrains/local-attention, exact_windowsize=True, look_backward=look_forward=1")(_build)
