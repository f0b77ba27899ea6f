"""FlashAttention (Dao et al., 2022, arXiv:2205.14135), tiled in PyTorch.

Forward: for each block of ``block_q`` queries, an online softmax over blocks of ``block_k`` keys
(:mod:`fastattn.ops.softmax.online`); only the output ``O`` and the row log-sum-exp ``L`` are saved.
Backward (the paper's Algorithm 4): with ``D = rowsum(dO * O)``, each tile recomputes
``P = exp(Q K^T * scale - L)`` and accumulates ``dV += P^T dO``, ``dS = P * (dO V^T - D)``,
``dQ += dS K * scale``, ``dK += dS^T Q * scale``. No n x n tensor is ever stored: O(n) memory,
O(n^2 d) time; causally empty tiles are skipped in both passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fastattn.core.base import Mechanism
from fastattn.ops.softmax.dense import dense_attention
from fastattn.core.masks import Mask
from fastattn.ops.softmax.online import block_scores, compute_dtype, online_softmax
from fastattn.registry import register


class _FlashFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, bq: int, bk: int) -> Tensor:
        outs, lses = [], []
        for q0 in range(0, q.shape[2], bq):
            o, lse = online_softmax(q[:, :, q0:q0 + bq], k, v, mask, scale, q0, bk)
            outs.append(o)
            lses.append(lse)
        out = torch.cat(outs, dim=2)
        ctx.save_for_backward(q, k, v, out, torch.cat(lses, dim=2))
        ctx.mask, ctx.scale, ctx.bq, ctx.bk = mask, scale, bq, bk
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, d_out: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        mask, scale, bq, bk = ctx.mask, ctx.scale, ctx.bq, ctx.bk
        dt = compute_dtype(q.dtype)
        d_out = d_out.to(dt)
        delta = (d_out * out).sum(dim=-1, keepdim=True)
        dq = torch.zeros(q.shape, dtype=dt, device=q.device)
        dk = torch.zeros(k.shape, dtype=dt, device=k.device)
        dv = torch.zeros(v.shape, dtype=dt, device=v.device)
        for q0 in range(0, q.shape[2], bq):
            q1 = min(q0 + bq, q.shape[2])
            q_blk, do_blk = q[:, :, q0:q1], d_out[:, :, q0:q1]
            for k0 in range(0, k.shape[2], bk):
                if mask.block_is_empty(q0, q1, k0):
                    break
                k1 = min(k0 + bk, k.shape[2])
                k_blk, v_blk = k[:, :, k0:k1].to(dt), v[:, :, k0:k1].to(dt)
                p = torch.exp(block_scores(q_blk, k_blk, mask, scale, q0, k0) - lse[:, :, q0:q1])
                dv[:, :, k0:k1] += p.transpose(-1, -2) @ do_blk
                ds = p * (do_blk @ v_blk.transpose(-1, -2) - delta[:, :, q0:q1])
                dq[:, :, q0:q1] += (ds @ k_blk) * scale
                dk[:, :, k0:k1] += (ds.transpose(-1, -2) @ q_blk.to(dt)) * scale
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


@register(
    "flash", complexity="O(n^2 d) time, O(n) memory", causal=True, decoding=True, padding=True,
    exact=True, attn_mask=True,
    time_growth=2.0, memory_growth=1.0,
)
class FlashAttention(Mechanism):
    """Tiled exact attention with a recomputing backward (see module docstring)."""

    half_precision = "native"  # its softmax ops accumulate half inputs in float32 themselves

    test_options = {"block_q": 16, "block_k": 7}

    @dataclass(frozen=True)
    class Options:
        block_q: int = 1024  # tiles of 1024 x 1024 keep CPU matmuls efficient; 4 MiB per batch-head
        block_k: int = 1024

        def __post_init__(self) -> None:
            if self.block_q < 1 or self.block_k < 1:
                raise ValueError(f"block sizes must be >= 1, got {self.block_q}, {self.block_k}")

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, dropout_p: float = 0.0) -> Tensor:
        if mask.bias is not None and mask.bias.requires_grad:
            raise ValueError("flash does not differentiate a float attn_mask; use memory_efficient or softmax")
        return _FlashFunction.apply(q, k, v, mask, scale, self.options.block_q, self.options.block_k)

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
        return dense_attention(q, k, v, mask, scale)
