"""SAC: Sparse Adaptive Connection (Li et al., 2020, arXiv:2003.09833).

The sequence is a graph whose edges are *predicted*: a learned edge predictor (an LSTM over the nodes,
as in the paper) chooses for every node ``t`` a small set of ``edges`` other nodes, and attention runs
only over the chosen edges (plus the node itself, ``self_loop``)::

    h = LSTM(k_0 .. k_{n-1})                         (per head, over the real keys; padding skipped)
    e(t, s) = (h_t W_u) . (h_s W_c) / sqrt(r)        (edge score, r = ``hidden``)
    N(t) = top-``edges``_{s != t} e(t, s)             (eval; training samples by Gumbel-top-k)
    m_t = e(t, s*) for s* the best candidate left out (-inf when none is)
    w(t, s) = exp(e(t, s)) - exp(m_t) for s in N(t);  w(t, t) = exp(e(t, t))  (self loop)
    out_t = sum_{s in N(t) + {t}} w(t, s) exp(q_t . k_s * scale) v_s / normaliser

Training signal. The selection is discrete; the paper trains its predictor with a policy gradient,
whose reward (the task's loss) an attention layer never sees. Here the predictor's scores weight the
attention over the chosen edges instead (``log w`` is added to the logits): the weights are those of
the predictor's distribution over candidates, less the probability of the best candidate left out
(the normaliser cancels inside the softmax over the chosen edges). The task loss then trains the
predictor by ordinary backpropagation, with no auxiliary loss to wire up, and the output is
continuous in the scores: an edge's weight falls to zero as it reaches the selection boundary, so a
small change of the inputs never makes the output jump when the chosen set changes (this also keeps
half precision close to float32). ``aux_loss`` stays zero.

Causal form: the predictor is a unidirectional LSTM and node ``t`` (bottom-right aligned) chooses only
among keys ``s < t``, so no future key reaches it, not even through the predictor. Decoding recomputes
the predictor over the cache (O(n) per token), so ``step`` equals the causal forward.

Cost: attention O(n K d) with K = ``edges`` + 1 (the chosen keys are gathered, no ``n x n`` tensor);
the predictor scores every candidate, O(n^2 r) time (like the paper's pointer over all nodes) but in
row chunks of ``chunk`` queries, so its memory is O(chunk * n + n K). Layer-only (learned predictor).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastattn.core.base import Mechanism
from fastattn.ops.softmax.dense import dense_attention
from fastattn.core.masks import Mask
from fastattn.registry import register
from .base import check_positive
from fastattn.ops.gather import index_attention, index_mask


@dataclass
class Edges:
    """The chosen graph of one call: key indices ``idx`` and ``valid`` ``(B, H, Lq, K)`` and ``score``,
    each edge's log-weight ``log w(t, s)`` added to its attention logit (differentiable in the
    predictor's parameters and the keys)."""

    idx: Tensor
    valid: Tensor
    score: Tensor


@register(
    "sac", complexity="O(n K d + n^2 r)", causal=True, decoding=True, padding=True,
    randomized=True,
    time_growth=2.0, memory_growth=2.0,
)
class SACAttention(Mechanism):
    """Attention over the edges an LSTM edge predictor chooses (``edges`` per node, plus a self loop)."""

    test_options = {"edges": 4, "hidden": 8, "chunk": 16}
    deviations = (
        (
            "The edge predictor is trained by backpropagation through edge weights added to the "
            "attention logits, not by the paper's policy gradient."
        ),
    )

    @dataclass(frozen=True)
    class Options:
        edges: int = 16  # predicted edges per node (the paper's alpha), besides the self loop
        self_loop: bool = True  # every node also attends to itself
        hidden: int = 32  # edge predictor width r (LSTM hidden size and pointer dimension)
        chunk: int = 256  # query rows the predictor scores at once (memory only)

        def __post_init__(self) -> None:
            check_positive(edges=self.edges, hidden=self.hidden, chunk=self.chunk)
            if not isinstance(self.self_loop, bool):
                raise ValueError(f"self_loop must be a bool, got {self.self_loop!r}")

    def __init__(self, options=None, *, generator: torch.Generator | None = None, **kw) -> None:
        super().__init__(options, **kw)
        r = self.options.hidden
        self.generator = generator
        self.lstm = nn.LSTM(self.head_dim, r, batch_first=True)
        self.w_query = nn.Linear(r, r, bias=False)
        self.w_key = nn.Linear(r, r, bias=False)

    # ---- the edge predictor (shared by forward and reference) -----------------------------------
    def node_states(self, k: Tensor, key_padding: Tensor | None) -> Tensor:
        """The LSTM over each sequence's real (non-padding) keys, in order, ``(B, H, Lk, r)``: padded
        positions are skipped (their states are zeros), so the states -- and the chosen edges -- do not
        depend on where or how much padding there is."""
        groups = k.shape[1] // self.num_kv_heads if k.shape[1] % self.num_kv_heads == 0 else 1
        if groups > 1:  # grouped-query heads share their keys: run the predictor once per key head
            k = k[:, ::groups]
        b, h, n, e = k.shape
        x = k.to(self.w_query.weight.dtype)
        order = None
        if key_padding is not None:
            x = x.masked_fill(key_padding[:, None, :, None], 0.0)
            # real keys first (stable: in sequence order); the padding, now at the end of each row,
            # cannot reach the real keys' states through a unidirectional LSTM
            order = torch.sort(key_padding.to(torch.uint8), dim=1, stable=True).indices  # (B, n)
            x = torch.gather(x, 2, order[:, None, :, None].expand(b, h, n, e))
        # cuDNN's RNN backward refuses eval mode; a module in eval mode may still be differentiated
        # (attribution, gradients w.r.t. inputs), so cuDNN is used only where its backward works
        cudnn_ok = self.training or not torch.is_grad_enabled()
        with torch.backends.cudnn.flags(enabled=cudnn_ok and torch.backends.cudnn.enabled):
            out, _ = self.lstm(x.reshape(b * h, n, e))
        out = out.view(b, h, n, -1)
        if order is not None:
            assert key_padding is not None
            back = torch.empty_like(out).scatter_(2, order[:, None, :, None].expand_as(out), out)
            out = back.masked_fill(key_padding[:, None, :, None], 0.0)
        return out.repeat_interleave(groups, dim=1)

    def select(self, k: Tensor, mask: Mask) -> Edges:
        """Choose every query's edges: deterministic top-k in eval mode, Gumbel-top-k sampling (with
        the module's generator) in training mode."""
        if mask.lq > mask.lk:
            raise ValueError(f"sac needs query length <= key length (queries are nodes of the key sequence), "
                             f"got {mask.lq} > {mask.lk}")
        o = self.options
        b, h, lk = k.shape[0], k.shape[1], mask.lk
        states = self.node_states(k, mask.key_padding)
        u = self.w_query(states[:, :, mask.offset:])  # (B, H, Lq, r)
        c = self.w_key(states)  # (B, H, Lk, r)
        sc = o.hidden ** -0.5
        n_edges = min(o.edges, lk)
        n_take = min(o.edges + 1, lk)  # the chosen edges and the best candidate left out (the threshold)
        idx, valid = [], []
        with torch.no_grad():
            for q0 in range(0, mask.lq, o.chunk):
                q1 = min(q0 + o.chunk, mask.lq)
                p0, p1 = q0 + mask.offset, q1 + mask.offset  # absolute positions of the chunk's nodes
                kend = p1 if mask.causal else lk  # causal: later keys are never scored at all
                e = torch.matmul(u[:, :, q0:q1] * sc, c[:, :, :kend].transpose(-1, -2))  # (B, H, c, kend)
                if self.training:
                    g = self.generator
                    noise = torch.rand(e.shape, generator=g, dtype=e.dtype, device=g.device if g else e.device)
                    e -= torch.log(-torch.log(noise.to(e.device).clamp_min(1e-20)))
                if mask.key_padding is not None:
                    e.masked_fill_(mask.key_padding[:, None, None, :kend], float("-inf"))
                rows = torch.arange(q1 - q0, device=k.device)
                if mask.causal:  # no self (handled apart) and no later key: s < t
                    tri = rows[None, :] >= rows[:, None]
                    e[..., p0:p1].masked_fill_(tri, float("-inf"))
                else:
                    e[..., rows, p0 + rows] = float("-inf")
                take = min(n_take, kend)
                top, i = e.topk(take, dim=-1)
                if take < n_take:
                    top = torch.nn.functional.pad(top, (0, n_take - take), value=float("-inf"))
                    i = torch.nn.functional.pad(i, (0, n_take - take))
                idx.append(i)
                valid.append(torch.isfinite(top))
        idx, valid = torch.cat(idx, 2), torch.cat(valid, 2)
        # differentiable scores of the chosen edges (and of the threshold) only: O(n K r)
        cg = torch.gather(c, 2, idx.reshape(b, h, -1, 1).expand(-1, -1, -1, c.shape[3]))
        score = (cg.view(*idx.shape, -1) * u[..., None, :]).sum(-1) * sc
        if n_take > n_edges:
            # weights exp(e_s) - exp(e_threshold): an edge fades out continuously as it reaches the
            # selection boundary, so the output does not jump when the chosen set changes
            thr, thr_ok = score[..., n_edges:], valid[..., n_edges:]
            idx, valid, score = idx[..., :n_edges], valid[..., :n_edges], score[..., :n_edges]
            gap = (score - thr).clamp_min(1e-6)
            score = torch.where(thr_ok, score + torch.log(-torch.expm1(-gap)), score)
        if o.self_loop:
            own = (torch.arange(mask.lq, device=k.device) + mask.offset).expand(b, h, -1)[..., None]
            own_ok = torch.ones_like(own, dtype=torch.bool)
            if mask.key_padding is not None:
                own_ok = ~mask.key_padding[:, None, mask.offset:, None].expand_as(own)
            own_score = (c[:, :, mask.offset:] * u).sum(-1, keepdim=True) * sc
            idx, valid = torch.cat([own, idx], -1), torch.cat([own_ok, valid], -1)
            score = torch.cat([own_score, score], -1)
        return Edges(idx, valid, score)

    # ---- attention --------------------------------------------------------------------------------
    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, dropout_p: float = 0.0) -> Tensor:
        g = self.select(k, mask)
        return index_attention(q, k, v, g.idx, g.valid, scale, bias=g.score)

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
        """Dense masked softmax over the same chosen edges, the edge scores as an additive bias."""
        g = self.select(k, mask)
        dt = q.dtype
        allowed, bias = index_mask(g.idx, g.valid, mask.lk, g.score.to(dt))
        bias = bias.masked_fill(~allowed, float("-inf"))
        out = dense_attention(q.to(dt), k.to(dt), v.to(dt), Mask(mask.lq, mask.lk), scale, extra_bias=bias)
        return out.to(q.dtype)

    def dense_mask(self, k: Tensor, *, key_padding_mask: Tensor | None = None, is_causal: bool = False,
                   lq: int | None = None) -> Tensor:
        """The chosen edges for keys ``k (B, H, Lk, E)`` as a bool ``(B, H, Lq, Lk)`` matrix (True = edge)."""
        lq = k.shape[2] if lq is None else lq
        g = self.select(k, Mask(lq, k.shape[2], key_padding=key_padding_mask, causal=is_causal))
        return index_mask(g.idx, g.valid, k.shape[2])[0]
