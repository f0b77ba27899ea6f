"""Exact attention: softmax (the reference), memory-efficient (Rabe & Staats) and flash (Dao et al.)."""

from . import flash, memory_efficient, softmax  # noqa: F401
