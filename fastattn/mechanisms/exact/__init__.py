"""Exact attention: softmax (the reference), memory-efficient (Rabe & Staats) and flash (Dao et al.)."""
