"""Kernel / linear attention: ``phi(Q) (phi(K)^T V)`` on one chunked engine (:mod:`.engine`)."""

from . import linear  # noqa: F401
from . import doubly_normalized, efficient, flatten, realtime_fast  # noqa: F401
