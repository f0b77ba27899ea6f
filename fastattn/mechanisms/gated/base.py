"""The base of the mixture-of-heads layers (moh, moa): per-token gates on the head outputs, 0 for the heads
a token's router did not select -- so the attention of an unselected (token, head) pair need not be
computed at all.

:class:`HeadGatedAttention` computes the head outputs of the efficient forward on the selected pairs only,
where that is possible and cheaper:

* heads that every token of every row selected (moh's shared heads) run as usual;
* for the other heads, the tokens that selected each head are gathered (:func:`~fastattn.ops.routing.group_by_expert`,
  padded to the busiest head) and only their queries attend, over all keys;
* the outputs are scattered back, zero at the unselected pairs (whose gate is 0, so values and gradients
  equal those of the full computation).

It runs the core as a one-head mechanism over heads folded into the batch, so it needs a core that owns no
parameters or buffers (per-head state would be mixed up) and is not positional (gathered queries lose their
slot positions). Non-causal calls only: a gathered query would need its own causal horizon, which through
the core's interface is an ``attn_mask`` -- a float bias of (gathered queries x keys) per head, whose
construction cost more than the attention it saved (tried: at n=4096 with half the heads active, forward
and backward took about twice as long as every head through the core's own causal path; not kept; nor
a boolean mask over chunks of 64, 256 or 1024 gathered queries, each over the keys up to its last
position: moa with 2 of 8 heads took 0.41x, 0.85x and 0.87x of multi-head attention's speed against 0.89x
to 0.95x for every head, the core's masked kernel being slower than its causal one); so
causal calls, calls with their own ``attn_mask`` and selections whose gathered rows exceed
:data:`SELECTED_FRACTION` of the full path's compute every head. Decoding and the reference compute every
head too.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fastattn.core.base import Mechanism
from fastattn.core.checks import repeat_kv
from fastattn.core.layer import ProjectedAttention, make_core
from fastattn.ops.routing import gather_tokens, group_by_expert, scatter_tokens

__all__ = ["MIN_CHUNK", "SELECTED_FRACTION", "HeadGatedAttention"]

# The selected path runs when the query rows it attends (every row of the heads all tokens use, plus the
# gathered rows of the others, padded to the busiest head) are at most this share of the full path's.
SELECTED_FRACTION = 0.8
# Query rows per chunk at least, where the queries of few heads are split to occupy every thread.
MIN_CHUNK = 128


class HeadGatedAttention(ProjectedAttention):
    """Head outputs gated per token: subclasses say which (token, head) pairs their gates keep
    (:meth:`selection`); the efficient forward attends on those only (module docstring)."""

    def selection(self, x: Tensor) -> Tensor:
        """Bool ``(B, Lq, H)``: the (query token, head) pairs whose gate is not forced to 0."""
        raise NotImplementedError

    def _single_head_core(self) -> Mechanism | None:
        """The core for one head (built once; not a submodule: it holds no state), or ``None`` when the
        core cannot run on the selected pairs."""
        core = self.core
        if core.spec.level != "sequence" or core.positional:
            return None
        if any(True for _ in core.parameters()) or any(True for _ in core.buffers()):
            return None
        single = self.__dict__.get("_one_head_core")
        if single is None:
            config = replace(self.config, embed_dim=self.head_dim, num_heads=1, num_kv_heads=1, kdim=None, vdim=None)
            single = make_core(self.options.core, self.options.core_options, config)
            self.__dict__["_one_head_core"] = single
        return single

    def attend_heads(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, **masks: Any) -> Tensor:
        out = self._attend_selected(x, q, k, v, **masks)
        return self.attend(q, k, v, **masks) if out is None else out

    def _attend_selected(
        self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None, is_causal: bool = False,
    ) -> Tensor | None:
        """The head outputs ``(B, H, Lq, Ev)`` on the selected pairs (zeros elsewhere), or ``None`` when the
        full path must (or had better) run."""
        core = self._single_head_core()
        if core is None or attn_mask is not None or is_causal:
            return None
        sel = self.selection(x)
        b, h, lq, _ = q.shape
        lk = k.shape[2]
        everyone = sel.all(dim=1).all(dim=0)  # (H,): heads every token of every row uses
        dense, sparse = everyone.nonzero().flatten(), (~everyone).nonzero().flatten()
        if sparse.numel() == 0:
            return None
        index, valid = group_by_expert(sel[..., sparse])  # (B, Hs, S)
        if dense.numel() * lq + sparse.numel() * index.shape[-1] > SELECTED_FRACTION * h * lq:
            return None
        groups = h // k.shape[1]
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        dropout_p = self.config.dropout if self.training else 0.0

        def run(qh: Tensor, heads: Tensor) -> Tensor:
            """The one-head core over ``qh (B, n, L', E)`` against the keys of ``heads``, the heads folded
            into the batch -- and, where that leaves fewer batch entries than threads, the queries split
            into chunks folded in too (a CPU attention kernel runs its backward one entry per thread)."""
            n, rows = qh.shape[1], qh.shape[2]
            c = max(1, min(-(-torch.get_num_threads() // (b * n)), rows // MIN_CHUNK))
            m = -(-rows // c)
            qf = F.pad(qh, (0, 0, 0, m * c - rows)).reshape(b * n * c, 1, m, qh.shape[-1])
            kh, vh = (t[:, heads, None].expand(-1, -1, c, -1, -1).reshape(b * n * c, 1, lk, t.shape[-1]) for t in (k, v))
            kpm = None if key_padding_mask is None else key_padding_mask.repeat_interleave(n * c, dim=0)
            o = core.run(qf, kh, vh, key_padding_mask=kpm, dropout_p=dropout_p, backend=self.config.backend)
            return o.view(b, n, m * c, o.shape[-1])[:, :, :rows]

        parts = []
        if dense.numel():
            parts.append(run(q[:, dense], dense))
        picked = run(gather_tokens(q[:, sparse], index), sparse)
        parts.append(scatter_tokens(picked, index, valid, lq))
        if not dense.numel():
            return parts[0]
        order = torch.argsort(torch.cat([dense, sparse]))
        return torch.cat(parts, dim=1)[:, order]
