"""The chunked scan: the readable middle link of the linear-attention chain of trust (dense formula ->
this scan -> the tiled kernels). Not used by the library; plain autograd, a Python loop over chunks.

Causal, equal lengths. Inside a chunk of ``c`` tokens the masked, decayed quadratic form; across chunks
the state ``S`` (and ``z``), decayed by the chunk's gates: ``S <- exp(sum of the chunk's log-gates) S +
sum_j exp(log-gates after j) k'_j v_j^T``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def scan_linear_attention(fq: Tensor, fk: Tensor, v: Tensor, *, log_g: Tensor | None = None,
                          s0: Tensor | None = None, z0: Tensor | None = None, normalize: bool = True,
                          chunk: int = 16) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    """``(out, den, S_n, z_n)``; ``log_g`` per token ``(B, H, n)`` or per row ``(B, H, 1)``."""
    b, h, n, d = fq.shape
    ev = v.shape[-1]
    c = max(1, min(chunk, n))
    m = math.ceil(n / c)
    pad = m * c - n
    if log_g is None:
        log_g = fq.new_zeros(b, h, n)
    log_g = log_g.expand(b, h, n)
    fq, fk, v = (F.pad(t, (0, 0, 0, pad)) for t in (fq, fk, v))
    log_g = F.pad(log_g, (0, pad))  # padding: gate 1
    s = fq.new_zeros(b, h, d, ev) if s0 is None else s0
    z = fq.new_zeros(b, h, d) if z0 is None else z0
    idx = torch.arange(c)
    below = idx[:, None] >= idx[None, :]
    nums, dens = [], []
    for j in range(m):
        sl = slice(j * c, (j + 1) * c)
        q, k, val = fq[:, :, sl], fk[:, :, sl], v[:, :, sl]
        cum = torch.cumsum(log_g[:, :, sl], dim=-1)  # A_i - A_(chunk start)
        w = torch.exp((cum[..., :, None] - cum[..., None, :]).masked_fill(~below, float("-inf")))
        a = torch.matmul(q, k.transpose(-1, -2)) * w
        q_in = torch.exp(cum).unsqueeze(-1)
        nums.append(torch.matmul(a, val) + torch.matmul(q * q_in, s))
        dens.append(a.sum(-1) + torch.matmul(q * q_in, z.unsqueeze(-1)).squeeze(-1))
        k_out = torch.exp(cum[..., -1:] - cum).unsqueeze(-1)
        lam = torch.exp(cum[..., -1])
        s = s * lam[..., None, None] + torch.matmul((k * k_out).transpose(-1, -2), val)
        z = z * lam[..., None] + (k * k_out).sum(2)
    num = torch.cat(nums, dim=2)[:, :, :n]
    den = torch.cat(dens, dim=2)[:, :, :n]
    if not normalize:
        return num, None, s, None
    out = num / torch.where(den == 0, torch.ones_like(den), den).unsqueeze(-1)
    return out, den, s, z


def linear_inputs(b: int, h: int, hq: int, n: int, d: int, ev: int, gates: str | None,
                  g: torch.Generator) -> dict[str, Tensor]:
    """Positive features ``fq (b, hq, n, d)`` / ``fk (b, h, n, d)``, values, an initial state ``s0``,
    ``z0`` and gates (``"head"``: per-head rates ``lam``; ``"token"``: per-token ``logit``), all float64
    and requiring grad, drawn in that order from ``g`` (the linear-op tests share these inputs)."""
    x = {
        "fq": torch.rand(b, hq, n, d, generator=g, dtype=torch.float64) + 0.1,
        "fk": torch.rand(b, h, n, d, generator=g, dtype=torch.float64) + 0.1,
        "v": torch.randn(b, h, n, ev, generator=g, dtype=torch.float64),
        "s0": torch.randn(b, h, d, ev, generator=g, dtype=torch.float64),
        "z0": torch.rand(b, h, d, generator=g, dtype=torch.float64) + 0.5,
    }
    if gates == "head":
        x["lam"] = torch.rand(h, generator=g, dtype=torch.float64) * 0.6 + 0.35
    elif gates == "token":
        x["logit"] = torch.randn(b, h, n, generator=g, dtype=torch.float64) * 2 + 1.5
    for t in x.values():
        t.requires_grad_()
    return x
