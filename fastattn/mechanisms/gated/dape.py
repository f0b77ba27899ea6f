"""DAPE V2: "Process Attention Score as Feature Map for Length Extrapolation" (Zheng, Gao, Shi, Xiong, Sun,
Li, Huang, Ren, Ng, Jiang, Li and Li, 2024, arXiv:2410.04798), checked against the authors' code
(``chuanyang-Zheng/DAPE``, ``DAPE.py``: ``Alibi_DAPEV2``; ``AliBi_DAPE`` for V1).

The attention logits of all heads, stacked with a positional bias, are treated as a feature map with
``2H`` channels over the ``(query, key)`` grid and processed by a small convolution network before the
softmax:

    X = s q k^T                                  (B, H, Lq, Lk)
    A = the positional bias                      (H, Lq, Lk): ALiBi -slope_h |i - j|, Kerple
                                                 -p_h log(1 + a_h |i - j|), or none
    Y = X + A + f(M * [X ; A])                   f = Conv2d(2H -> W, (1, kappa)) -> LeakyReLU -> Conv2d(W -> H, (1, kappa))
    out = softmax(Y + mask) V

``M`` zeroes every entry a query may not see -- the future in causal mode (the authors' ``torch.tril``,
offset to ``diagonal = Lk - Lq`` for fewer queries than keys: queries sit at the last ``Lq`` positions)
and padded keys -- so the network reads them as **zeros, never -inf**; the mask is applied again to
``Y`` before the softmax. The kernels are ``(1, kappa)``; every row is continued by zero features beyond its last key
(so the hidden map's right halo is the first convolution of zeros, not zero padding; see ``deviations``): a query row
mixes its neighbouring keys across all heads, never other query rows, so nothing leaks from the future
(the keys right of the diagonal are zeros). ``kappa = 1`` is DAPE V1 (an MLP over the heads of one
entry). Positions count from each row's first real token in decoding (``positional``), so a left-padded
batch decodes like each row alone; a non-causal call uses the symmetric bias ``|i - j|``.

The efficient path computes ``Y`` for chunks of ``query_chunk`` query rows with all heads at once (the
convolution mixes heads), checkpointed: memory ``O(chunk n (H + W))``, time ``O(n^2 (d + H W kappa))``.
Decoding: the key/value cache, the new query rows recomputed against it (the masked zeros right of the
diagonal are what the authors' ``tril`` gives).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastattn.core.base import Mechanism
from fastattn.core.masks import Mask, masked_softmax
from fastattn.ops.chunked import query_chunked
from fastattn.ops.positions import alibi_slopes
from fastattn.registry import register

__all__ = ["DAPE"]

BIASES = ("alibi", "kerple", "none")
KERPLE_EPS = 1e-2  # the authors' lower bound of Kerple's p and a


@register(
    "dape", complexity="O(n^2 (d + H W kappa))", causal=True, decoding=True, padding=True,
    time_growth=2.0, memory_growth=1.0,
)
class DAPE(Mechanism):
    """Softmax over logits plus a positional bias plus a convolution of both across heads and
    neighbouring keys (masked entries read as zeros)."""

    positional = True
    heads_independent = False  # the convolution runs across the heads' scores
    test_options: ClassVar[dict[str, Any]] = {"mlp_width": 4, "query_chunk": 5}
    deviations: ClassVar[tuple[str, ...]] = (
        (
            "ALiBi, Kerple (log) or no bias; not FIRE; a non-causal call uses the symmetric bias |i - j| (the "
            "authors' code is causal only)"
        ),
        (
            "the second convolution reads the hidden map beyond a row's last key as the first convolution of "
            "zero features (as every row but the last does in the authors' causal training), not as zero "
            "padding: an output then does not depend on whether the sequence goes on, and decoding equals the "
            "forward"
        ),
    )

    @dataclass(frozen=True)
    class Options:
        bias: str = "alibi"  # the positional bias A: "alibi", "kerple" or "none"
        mlp_width: int = 32  # W, the channels of the hidden feature map
        kernel: int = 3  # kappa, the width of the (1, kappa) kernels over neighbouring keys (odd; 1: DAPE V1)
        query_chunk: int = 256  # query rows per checkpointed chunk of the efficient path

        def __post_init__(self) -> None:
            if self.bias not in BIASES:
                raise ValueError(f"bias must be one of {BIASES}, got {self.bias!r}")
            if self.kernel < 1 or self.kernel % 2 == 0:
                raise ValueError(f"kernel must be a positive odd number, got {self.kernel}")
            for name in ("mlp_width", "query_chunk"):
                if getattr(self, name) < 1:
                    raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def __init__(self, options=None, *, head_dim: int, num_heads: int, num_kv_heads: int | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(options, head_dim=head_dim, num_heads=num_heads, num_kv_heads=num_kv_heads)
        o, h = self.options, num_heads
        self.conv1 = nn.Conv2d(2 * h, o.mlp_width, (1, o.kernel), padding=(0, o.kernel // 2))
        self.conv2 = nn.Conv2d(o.mlp_width, h, (1, o.kernel), padding=(0, o.kernel // 2))
        if o.bias == "kerple":  # the authors' initialisation: uniform in [0, 2) and [0, 1)
            self.kerple_p = nn.Parameter(torch.rand(h) * 2)
            self.kerple_a = nn.Parameter(torch.rand(h))
        self.register_buffer("slopes", alibi_slopes(h).float(), persistent=False)

    # ---- pieces ---------------------------------------------------------------------------------
    def position_bias(self, q_pos: Tensor, k_pos: Tensor, dtype: torch.dtype) -> Tensor | None:
        """``A`` at the queries' and keys' positions ``(..., Lq)``, ``(..., Lk)``: ``(..., H, Lq, Lk)``,
        or ``None`` for ``bias="none"``."""
        o = self.options
        if o.bias == "none":
            return None
        dist = (q_pos[..., :, None] - k_pos[..., None, :]).abs().to(dtype)[..., None, :, :]
        if o.bias == "alibi":
            return -self.slopes.to(dtype)[:, None, None] * dist
        p = self.kerple_p.clamp_min(KERPLE_EPS).to(dtype)[:, None, None]
        a = self.kerple_a.clamp_min(KERPLE_EPS).to(dtype)[:, None, None]
        return -p * torch.log1p(a * dist)

    def _logits(self, q: Tensor, k: Tensor, mask: Mask, scale: float, q0: int) -> tuple[Tensor, Tensor | None]:
        """``Y`` for the query rows ``q (B, H, c, E)`` at slots ``q0 ..`` and what they may see."""
        c = q.shape[2]
        x = (q @ k.transpose(-1, -2)) * scale
        allowed = mask.allowed(q.device, q0, q0 + c)
        a = self.position_bias(mask.q_pos(q.device, q0, q0 + c)[0, 0], mask.k_pos(q.device)[0, 0], x.dtype)
        a = torch.zeros_like(x[:1]) if a is None else a[None]
        feats = torch.cat([x, a.expand_as(x)], dim=1)
        if allowed is not None:  # masked entries read as zeros (allowed has one head: the mask is per key)
            feats = feats * allowed.to(x.dtype)
        return x + a + self._network(feats), allowed

    def _network(self, feats: Tensor) -> Tensor:
        """``f``: the two ``(1, kappa)`` convolutions with the LeakyReLU between them, every row continued
        by zero features to the right (the hidden map's right halo is computed, not zero-padded; the
        left border is zero padding, as in the authors' code)."""
        dt, half = feats.dtype, self.options.kernel // 2
        c1, c2 = self.conv1, self.conv2
        hidden = F.conv2d(F.pad(feats, (0, half)), c1.weight.to(dt), c1.bias.to(dt), padding=c1.padding)
        return F.conv2d(F.pad(F.leaky_relu(hidden), (half, 0)), c2.weight.to(dt), c2.bias.to(dt))

    def _check(self, mask: Mask) -> None:
        mask.require_only("key_padding", "causal", op="dape")

    # ---- the efficient path ---------------------------------------------------------------------
    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, dropout_p: float = 0.0) -> Tensor:
        self._check(mask)

        def chunk(q_blk: Tensor, k_: Tensor, v_: Tensor, q0: int) -> Tensor:
            y, allowed = self._logits(q_blk, k_, mask, scale, q0)
            if allowed is not None:
                y = y.masked_fill(~allowed, float("-inf"))
            return masked_softmax(y) @ v_

        return query_chunked(chunk, q, k, v, chunk=self.options.query_chunk)

    # ---- the formula ----------------------------------------------------------------------------
    def reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
        """The whole ``(Lq, Lk)`` grid at once, the causal ``M`` as the offset ``torch.tril``, the two
        convolutions written as sums over the kernel's taps (zero beyond the last key)."""
        self._check(mask)
        b, h, lq, _ = q.shape
        lk = k.shape[2]
        x = scale * torch.einsum("bhie,bhje->bhij", q, k)
        pos_q = torch.arange(lk - lq, lk, device=q.device)
        pos_k = torch.arange(lk, device=q.device)
        a = self.position_bias(pos_q, pos_k, x.dtype)
        a = torch.zeros(h, lq, lk, dtype=x.dtype, device=q.device) if a is None else a
        m = torch.ones(lq, lk, dtype=x.dtype, device=q.device)
        if mask.causal:
            m = torch.tril(m, diagonal=lk - lq)
        m = m.expand(b, 1, lq, lk)
        if mask.key_padding is not None:
            m = m * (~mask.key_padding)[:, None, None, :].to(x.dtype)
        feats = torch.cat([x, a.expand(b, h, lq, lk)], dim=1) * m

        half = self.options.kernel // 2

        def conv(inp: Tensor, layer: nn.Conv2d, start: int, stop: int) -> Tensor:
            """``out[j] = bias + sum_t W[t] inp[j + t - half]`` for key positions ``j`` in ``[start, stop)``;
            ``inp`` covers positions ``[start - half, stop + half)`` (zero where it has no entry)."""
            out = layer.bias.to(x.dtype)[None, :, None, None].expand(b, -1, lq, stop - start)
            for t in range(self.options.kernel):
                w = layer.weight[:, :, 0, t].to(x.dtype)
                out = out + torch.einsum("oc,bcij->boij", w, inp[..., t:t + stop - start])
            return out

        # the hidden map on keys [0, lk + half), from the features continued by zeros; zero left of key 0
        hidden = conv(F.pad(feats, (half, 2 * half)), self.conv1, 0, lk + half)
        y = x + a + conv(F.pad(F.leaky_relu(hidden), (half, 0)), self.conv2, 0, lk)
        y = y.masked_fill(m == 0, float("-inf"))
        return masked_softmax(y) @ v
