"""Plans of the block-sparse engine, and the cache that keeps them across calls.

A :class:`Plan` is everything about a call that does not depend on the tensors' values: the query /
key block geometry, the key blocks each query block gathers and the bool masks of each key source
(without key padding). Building one is data-dependent index work (it reads the pattern's tables), so
it runs eagerly, outside any ``torch.compile`` region, and its result is cached.

**Cache.** :func:`cached_plan` keeps the plans of recent calls in one process-wide LRU
(:data:`PLANS`), keyed on the pattern's value (:meth:`Pattern.key`: its parts, their parameters and the
contents of its tables), the lengths, the causality and the device. A functional call
(``fastattn.attention``, which builds a new mechanism each time) and a layer with the same options and
lengths therefore share one plan. The cache is bounded by a number of plans and by the bytes their
tensors hold (:meth:`PlanCache.configure`); a plan larger than the byte budget is built and not kept.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Hashable, TypeVar

import torch
from torch import Tensor

from .patterns import Pattern

__all__ = ["PLANS", "Plan", "PlanCache", "cached_plan", "eager", "make_plan", "plan_bytes"]

F = TypeVar("F", bound=Callable[..., Any])


def eager(fn: F) -> F:
    """``fn``, never traced by ``torch.compile``: while compiling it runs through
    ``torch.compiler.disable`` (one graph break), otherwise directly. Unlike decorating with
    ``torch.compiler.disable``, this does not import ``torch._dynamo`` (about a second) in programs
    that never compile."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return torch.compiler.disable(fn)(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@dataclass
class Plan:
    """Everything about one call that does not depend on the tensors' values: the query/key block
    geometry, the gathered layout and the bool masks of each key source (without key padding).
    Reusable across calls with the same pattern, lengths, causality and device (:func:`cached_plan`)."""

    t0: int
    lpad: int
    nqb: int
    nkb: int
    qblk: Tensor
    idx: Tensor
    valid: Tensor
    block_kpos: Tensor | None = None  # (nqb, 1, S*b)
    block_allowed: Tensor | None = None  # (nqb, b, S*b)
    column_kpos: Tensor | None = None  # (1, b, nkb)
    column_allowed: Tensor | None = None  # (nqb, b, nkb)
    gk: Tensor | None = None  # (g,)
    global_allowed: Tensor | None = None  # (nqb, b, g)
    gq: Tensor | None = None  # global queries inside the call, relative to query 0
    gq_list: tuple[int, ...] = ()  # the same as Python ints (no tensor read when the call runs)
    dead_rows: bool = True  # may some (possibly padded) query row see no key at all?
    # forms of the plan derived on first use by other kernels (the compiled backend's flattened plan)
    compiled: dict = field(default_factory=dict, repr=False, compare=False)


def _by_rows(fn: Callable[[slice], Tensor], nqb: int, bs: int, width: int, device: torch.device) -> Tensor:
    """The bool ``(nqb, bs, width)`` mask ``fn(slice of query blocks)``, built a few query blocks at a time
    so that the (int64) temporaries of the predicates stay small."""
    out = torch.empty(nqb, bs, width, dtype=torch.bool, device=device)
    step = max(1, (1 << 20) // max(1, bs * width))
    for a in range(0, nqb, step):
        out[a:a + step] = fn(slice(a, a + step))
    return out


def make_plan(pattern: Pattern, lq: int, lk: int, causal: bool, device: torch.device) -> Plan:
    """The plan of ``pattern`` for ``lq`` queries (bottom-right aligned) over ``lk`` keys on ``device``."""
    bs = pattern.block
    off = lk - lq
    t0 = off // bs
    lpad = off - t0 * bs
    nqb, nkb = -(-(lpad + lq) // bs), -(-lk // bs)
    qblk = t0 + torch.arange(nqb, device=device)
    ar = torch.arange(bs, device=device)
    qpos = (qblk[:, None] * bs + ar)[:, :, None]  # (nqb, bs, 1)
    gk = pattern.global_keys
    is_gk = None
    if gk is not None:
        gk = gk.to(device)
        gk = gk[(gk >= 0) & (gk < lk)]
        if gk.numel():
            is_gk = torch.zeros(nkb * bs, dtype=torch.bool, device=device)
            is_gk[gk] = True
        else:
            gk = None

    def restrict(allowed: Tensor, qpos: Tensor, kpos: Tensor) -> Tensor:
        allowed = allowed & (kpos < lk)
        if causal:
            allowed = allowed & (kpos <= qpos)
        if is_gk is not None:
            allowed = allowed & ~is_gk[kpos.clamp(max=nkb * bs - 1)]
        return allowed

    idx, valid, full = pattern.layout(qblk, nkb, causal)
    plan = Plan(t0, lpad, nqb, nkb, qblk, idx, valid)
    if idx.shape[1]:
        S = idx.shape[1]
        kpos = (idx[:, :, None] * bs + ar).reshape(nqb, 1, S * bs)
        full_k = full.repeat_interleave(bs, 1)[:, None, :]
        valid_k = valid.repeat_interleave(bs, 1)[:, None, :]

        def block_part(r: slice) -> Tensor:
            tok = pattern.allow(qpos[r], kpos[r])
            allowed = full_k[r] if tok is None else full_k[r] | tok
            return restrict(allowed & valid_k[r], qpos[r], kpos[r])

        plan.block_kpos = kpos
        plan.block_allowed = _by_rows(block_part, nqb, bs, S * bs, device)
    if pattern.column is not None:
        column = pattern.column
        kpos = torch.arange(nkb, device=device)[None, None, :] * bs + ar[None, :, None]
        covered = torch.zeros(nqb, nkb, dtype=torch.bool, device=device)
        if idx.shape[1]:
            rows = torch.arange(nqb, device=device)[:, None].expand_as(idx)
            covered[rows[valid], idx[valid]] = True
        plan.column_kpos = kpos
        plan.column_allowed = _by_rows(
            lambda r: restrict(column.allow(qpos[r], kpos) & ~covered[r, None, :], qpos[r], kpos), nqb, bs, nkb,
            device,
        )
    if gk is not None:
        kpos = gk[None, None, :]
        allowed = (kpos <= qpos) if causal else torch.ones(1, 1, 1, dtype=torch.bool, device=device)
        plan.gk, plan.global_allowed = gk, allowed.expand(nqb, bs, gk.numel())
    gq = pattern.global_queries
    if gq is not None:
        gq = gq.to(device)
        gq = gq[(gq >= off) & (gq < off + lq)] - off
        plan.gq = gq if gq.numel() else None
        plan.gq_list = tuple(gq.tolist())
    seen = torch.zeros(nqb, bs, dtype=torch.bool, device=device)
    for a in (plan.block_allowed, plan.column_allowed, plan.global_allowed):
        if a is not None:
            seen |= a.any(-1)
    plan.dead_rows = not bool(seen.all())
    return plan



def plan_bytes(plan: Plan) -> int:
    """Bytes held by a plan's tensors."""
    total = 0
    for f in fields(plan):
        x = getattr(plan, f.name)
        if isinstance(x, Tensor):
            total += x.numel() * x.element_size()
    return total


class PlanCache:
    """A bounded, thread-safe LRU of plans: at most ``max_plans`` plans holding at most ``max_bytes``
    bytes of tensors in all (the least recently used go first). ``hits`` / ``misses`` count lookups."""

    def __init__(self, max_plans: int = 32, max_bytes: int = 1 << 30) -> None:
        self._plans: OrderedDict[Hashable, tuple[Plan, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = self.hits = self.misses = 0
        self.max_plans = self.max_bytes = 0
        self.configure(max_plans, max_bytes)

    def configure(self, max_plans: int | None = None, max_bytes: int | None = None) -> None:
        """Change the bounds (evicting at once what no longer fits); 0 turns caching off."""
        for name, x in (("max_plans", max_plans), ("max_bytes", max_bytes)):
            if x is not None and (not isinstance(x, int) or isinstance(x, bool) or x < 0):
                raise ValueError(f"{name} must be an integer >= 0, got {x!r}")
        with self._lock:
            self.max_plans = self.max_plans if max_plans is None else max_plans
            self.max_bytes = self.max_bytes if max_bytes is None else max_bytes
            self._evict()

    def __len__(self) -> int:
        return len(self._plans)

    def clear(self) -> None:
        with self._lock:
            self._plans.clear()
            self.bytes = self.hits = self.misses = 0

    def _evict(self) -> None:
        while self._plans and (len(self._plans) > self.max_plans or self.bytes > self.max_bytes):
            _, (_, size) = self._plans.popitem(last=False)
            self.bytes -= size

    def get(self, pattern: Pattern, lq: int, lk: int, causal: bool, device: torch.device) -> Plan:
        """The plan for these arguments, from the cache or built by :func:`make_plan` (and kept)."""
        device = torch.device(device)
        key = (pattern.key(), lq, lk, bool(causal), device.type, device.index)
        with self._lock:
            hit = self._plans.get(key)
            if hit is not None:
                self._plans.move_to_end(key)
                self.hits += 1
                return hit[0]
            self.misses += 1
        plan = make_plan(pattern, lq, lk, causal, device)  # outside the lock: may be slow
        size = plan_bytes(plan)
        with self._lock:
            if key not in self._plans and size <= self.max_bytes and self.max_plans > 0:
                self._plans[key] = (plan, size)
                self.bytes += size
                self._evict()
        return plan


PLANS = PlanCache()
"""The process-wide plan cache used by :func:`cached_plan` (``PLANS.configure(...)`` to resize it)."""


@eager
def cached_plan(pattern: Pattern, lq: int, lk: int, causal: bool, device: torch.device) -> Plan:
    """:func:`make_plan` through the process-wide cache :data:`PLANS`. Never traced by
    ``torch.compile`` (plan building reads tensor values); a compiled caller gets the plan eagerly."""
    return PLANS.get(pattern, lq, lk, causal, device)
