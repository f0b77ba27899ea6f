"""Reformer LSH attention (Kitaev, Kaiser and Levskaya, 2020, arXiv:2001.04451).

Angular LSH with random rotations: ``h(x) = argmax([x R_r ; -x R_r])``, one rotation ``R_r (E, b/2)`` per
hash round, drawn once at construction (from ``generator``) into the ``rotations`` buffer (saved in the
``state_dict``), so the bucketing is reproducible. Keys are unit-normalised, ``k^_j = k_j / |k_j|``
(shared-QK: pass ``k = q`` to get the paper's keys = normalised queries). In every round queries and keys
are sorted by ``(bucket, position)`` and split into chunks of ``bucket_size``; a chunk of queries attends
its own and the previous chunk of sorted keys. A token never attends to itself unless nothing else is
visible (its score gets ``-5e4``, the paper's rule). Rounds are merged by log-sum-exp; a key seen by a
query in ``N`` rounds has ``log N`` subtracted from its scores (counted once).

Causal form: the paper's chunks are not causal (a chunk boundary after the global sort depends on how
many future tokens sort before a query), so causally query ``i`` sees the last ``2 bucket_size`` keys
``j <= i`` of its own bucket, decided by past tokens only. Padding keys are sorted after every bucket
and never seen. Cost ``O(r n (c d + log n))`` time (``r`` rounds, ``c = 2 bucket_size`` keys per query),
``O(r n c)`` memory (the selections; keys are gathered per query group).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fastattn.core.base import Mechanism
from fastattn.core.masks import Mask
from fastattn.ops.bucketed import angular_hash, bucketed_attention, bucketed_reference, selection_mask
from fastattn.registry import register

SELF_PENALTY = -5e4  # the paper's (and the peer's) score for a token attending to itself


@register(
    "reformer", complexity="O(r n c d + r n log n)", causal=True, decoding=False, padding=True, randomized=True,
    time_growth=1.1, memory_growth=1.0,
)
class Reformer(Mechanism):
    """LSH attention: hash rounds of angular LSH, sorted chunks, rounds merged with duplicates counted once."""

    test_options = {"n_buckets": 4, "bucket_size": 8, "n_hashes": 2}
    discontinuous = True  # a bucket flips under rounding: half-precision contract compares per-row medians
    deviations = (
        "Keys are the given keys, unit-normalised, hashed with the queries' rotations (the asymmetric "
        "variant); the paper's shared-QK is the call with k = q.",
        "Causal form: the last 2*bucket_size keys j <= i of the query's bucket, not the chunk look-back "
        "(which leaks the future after a global sort).",
        "The first chunk has no look-back (the peer wraps to the last chunk).",
        "n_buckets is an option fixed at construction (the rotations are buffers), not n / bucket_size.",
    )

    @dataclass(frozen=True)
    class Options:
        n_buckets: int = 64  # hash buckets per round (the paper: about n / bucket_size)
        bucket_size: int = 64  # chunk length in sorted order; a query sees 2 chunks (causal: 2 * bucket_size keys)
        n_hashes: int = 4  # hash rounds (the paper trains with 1-4, evaluates with up to 8)
        dedup: bool = True  # count a key seen in several rounds once (subtract log N)

        def __post_init__(self) -> None:
            for name in ("n_buckets", "bucket_size", "n_hashes"):
                if int(getattr(self, name)) < 1:
                    raise ValueError(f"reformer: {name} must be >= 1, got {getattr(self, name)}")

    def __init__(self, options=None, *, head_dim: int, num_heads: int, num_kv_heads: int | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(options, head_dim=head_dim, num_heads=num_heads, num_kv_heads=num_kv_heads)
        o = self.options
        rot = torch.randn(o.n_hashes, head_dim, math.ceil(o.n_buckets / 2), generator=generator, dtype=torch.float64)
        self.register_buffer("rotations", rot.float())

    def buckets(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """Bucket ids ``(n_hashes, B, H, L)`` of the queries and of the keys."""
        n = self.options.n_buckets
        return angular_hash(q, self.rotations, n), angular_hash(k, self.rotations, n)

    def _prepare(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        kn = k / k.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(k.dtype).tiny)
        hq, hk = self.buckets(q, k)  # the direction of k: with k = q the labels are identical (shared-QK)
        return kn, hq, hk

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, dropout_p: float = 0.0) -> Tensor:
        kn, hq, hk = self._prepare(q, k)
        o = self.options
        return bucketed_attention(q, kn, v, hq, hk, o.n_buckets, mask, scale, chunk=o.bucket_size,
                                  dedup=o.dedup, self_penalty=SELF_PENALTY)

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
        kn, hq, hk = self._prepare(q, k)
        o = self.options
        allowed = selection_mask(hq, hk, o.n_buckets, mask, chunk=o.bucket_size)
        return bucketed_reference(q, kn, v, allowed, mask, scale, dedup=o.dedup, self_penalty=SELF_PENALTY)
