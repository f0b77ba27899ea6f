"""Sparse-pattern attention: fixed, data-independent (or learned) sparsity patterns on one
block-sparse engine (:mod:`fastattn.ops.sparse.engine`, patterns in :mod:`fastattn.ops.sparse.patterns`)."""
