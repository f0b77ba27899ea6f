"""Kernel / linear attention: ``phi(Q) (phi(K)^T V)`` on one chunked engine (:mod:`fastattn.ops.linear`)."""
