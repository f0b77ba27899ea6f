"""Kernel / linear attention: ``phi(Q) (phi(K)^T V)`` on one chunked engine (:mod:`.engine`)."""

from . import linear  # noqa: F401
from . import doubly_normalized, efficient, flatten, fourierformer, primal, realtime_fast  # noqa: F401
from . import performer, lightning, transnormer, fastmax, rfa, hedgehog  # noqa: F401
