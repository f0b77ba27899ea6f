"""Sparse-pattern attention: fixed, data-independent (or learned) sparsity patterns on one
block-sparse engine (:mod:`fastattn.sparse.engine`, patterns in :mod:`fastattn.sparse.patterns`)."""

from . import local  # noqa: F401
