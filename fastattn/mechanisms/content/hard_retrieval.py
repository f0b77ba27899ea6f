"""Hard retrieval attention, "Learning Hard Retrieval Decoder Attention for Transformers" (Xu, van Genabith,
Liu and Xiong, 2020, arXiv:2009.14658); checked against the authors' code as described in MECHANISMS.md
(``hfxunlp/transformer``, ``modules/attn/retr.py``).

Every query retrieves exactly one value: ``out_i = v_{j(i)}``. In evaluation ``j(i) = argmax_j s_ij``
(``s = scale q k^T`` under the masks; ties: the first index); in training (option ``sample``) ``j(i)``
is sampled from ``p_i = softmax_j(s_ij)`` by the inverse CDF of one uniform per query, drawn from the
module's own stream (buffers ``noise_seed`` / ``noise_draws``, :mod:`fastattn.ops.noise`).
``fastattn.attention`` builds the module in training mode, so it samples (reproducibly with
``generator=``); ``sample=False`` retrieves the argmax there. The gradient is the paper's
straight-through estimator: the loss sees ``p`` as if the output were ``sum_j p_ij v_j``
(``dL/dp_ij = g_i . v_j`` for every ``j``, so ``q`` and ``k`` get exactly softmax attention's gradients),
while ``V`` gets ``g_i`` at the retrieved row only. The same estimator applies in evaluation, so
gradients reach ``q`` and ``k`` there too.

Rows with no visible key return zeros. Causal: the argmax/sample over ``j <= i``. Decoding: a plain KV
cache (the default ``step``). Cost ``O(Lq Lk d)`` time, ``O(Lq + chunk Lk)`` memory: scores are made
``chunk`` queries at a time and recomputed in backward (only the indices and log-sum-exps are saved).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from fastattn.core.base import Mechanism
from fastattn.core.masks import Mask, masked_softmax
from fastattn.ops.noise import new_seed, next_generator
from fastattn.ops.softmax.dense import dense_scores
from fastattn.ops.softmax.online import block_scores
from fastattn.registry import register


def _select(s: Tensor, u: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Index ``(B, H, c)`` retrieved by every row of the masked scores ``s (B, H, c, Lk)`` -- the argmax, or
    with uniforms ``u (B, H, c)`` in ``(0, 1]`` the sample ``min{j : sum_{j' <= j} p_j' >= u}`` (inverse CDF:
    a masked key has ``p = 0`` and is never drawn) -- whether the row sees any key, and its log-sum-exp."""
    alive = torch.isfinite(s).any(-1)
    lse = torch.logsumexp(s, dim=-1)
    if u is None:
        j = s.argmax(-1)
    else:
        cdf = torch.exp(s - torch.where(alive, lse, torch.zeros_like(lse))[..., None]).cumsum(-1)
        target = (u * cdf[..., -1]).to(cdf.dtype)
        j = torch.searchsorted(cdf.contiguous(), target[..., None].contiguous())[..., 0].clamp_max(s.shape[-1] - 1)
    return j, alive, lse


def _gather_rows(v: Tensor, j: Tensor) -> Tensor:
    return v.gather(2, j[..., None].expand(*j.shape, v.shape[-1]))


class _HardRetrieval(torch.autograd.Function):
    """Forward chunk by chunk (only indices and log-sum-exps saved); backward recomputes each chunk's
    probabilities for the straight-through gradient of ``q`` and ``k``."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, chunk: int,
                u: Tensor | None) -> Tensor:
        out = q.new_zeros(*q.shape[:3], v.shape[-1])
        js, alives, lses = [], [], []
        for q0 in range(0, q.shape[2], chunk):
            s = block_scores(q[:, :, q0:q0 + chunk], k, mask, scale, q0, 0)
            j, alive, lse = _select(s, None if u is None else u[:, :, q0:q0 + chunk])
            out[:, :, q0:q0 + chunk] = _gather_rows(v, j) * alive[..., None].to(v.dtype)
            js.append(j), alives.append(alive), lses.append(lse)
        ctx.mask, ctx.scale, ctx.chunk = mask, scale, chunk
        ctx.save_for_backward(q, k, v, torch.cat(js, 2), torch.cat(alives, 2), torch.cat(lses, 2))
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, j, alive, lse = ctx.saved_tensors
        mask, scale, chunk = ctx.mask, ctx.scale, ctx.chunk
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        g = g * alive[..., None].to(g.dtype)
        safe = torch.where(alive, lse, torch.zeros_like(lse))
        for q0 in range(0, q.shape[2], chunk):
            q1 = min(q0 + chunk, q.shape[2])
            p = torch.exp(block_scores(q[:, :, q0:q1], k, mask, scale, q0, 0) - safe[:, :, q0:q1, None])
            gc = g[:, :, q0:q1]
            dp = torch.matmul(gc, v.transpose(-1, -2))  # dL/dp_ij = g_i . v_j
            ds = p * (dp - (p * dp).sum(-1, keepdim=True)) * scale
            dq[:, :, q0:q1] = torch.matmul(ds, k)
            dk += torch.matmul(ds.transpose(-1, -2), q[:, :, q0:q1])
        dv.scatter_add_(2, j[..., None].expand(*j.shape, v.shape[-1]), g)  # the retrieved rows only
        return dq, dk, dv, None, None, None, None


@register(
    "hard_retrieval", complexity="O(n^2 d)", causal=True, decoding=True, padding=True, randomized=True,
    time_growth=2.0, memory_growth=1.0,
)
class HardRetrieval(Mechanism):
    """Each query returns the value of its best-scoring key (training: a key sampled from the softmax)."""

    test_options = {"chunk": 16, "sample": False}
    discontinuous = True  # the argmax flips under rounding: half-precision checks compare per-row medians
    deviations = (
        "No attention dropout before sampling and no label-smoothing-like mixing (the authors' optional "
        "smoothing epsilon).",
        "The straight-through gradient is used in evaluation too, so q and k get gradients there.",
    )

    @dataclass(frozen=True)
    class Options:
        chunk: int = 1024  # queries scored at a time (a memory knob; does not change the result)
        sample: bool = True  # in training mode, draw the key from the softmax (the paper); False: argmax always

        def __post_init__(self) -> None:
            if self.chunk < 1:
                raise ValueError(f"hard_retrieval: chunk must be >= 1, got {self.chunk}")

    def __init__(self, options=None, *, head_dim: int, num_heads: int, num_kv_heads: int | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(options, head_dim=head_dim, num_heads=num_heads, num_kv_heads=num_kv_heads)
        self.register_buffer("noise_seed", new_seed(generator))
        self.register_buffer("noise_draws", torch.zeros((), dtype=torch.long))

    def _uniforms(self, q: Tensor) -> Tensor | None:
        """In training (with ``sample``): one uniform in ``(0, 1]`` per query from the module's stream;
        else ``None`` (argmax)."""
        if not (self.training and self.options.sample):
            return None
        g = next_generator(self.noise_seed, self.noise_draws, q.device)
        return 1.0 - torch.rand(q.shape[:3], generator=g, device=q.device, dtype=torch.float64)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, dropout_p: float = 0.0) -> Tensor:
        mask.require_only("key_padding", "causal", op="hard retrieval attention")
        return _HardRetrieval.apply(q, k, v, mask, scale, self.options.chunk, self._uniforms(q))

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
        """Dense: ``out = onehot(j) V + p sg(V) - sg(p V)`` (the value of the forward is ``v_j``; the
        gradient is the straight-through one)."""
        mask.require_only("key_padding", "causal", op="hard retrieval attention")
        s = dense_scores(q, k, mask, scale)
        j, alive, _ = _select(s, self._uniforms(q))
        p = masked_softmax(s)
        hard = torch.nn.functional.one_hot(j, k.shape[2]).to(v.dtype) * alive[..., None].to(v.dtype)
        return hard @ v + p @ v.detach() - (p @ v).detach()
