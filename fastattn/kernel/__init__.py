"""Kernel / linear attention: ``phi(Q) (phi(K)^T V)`` on one chunked engine (:mod:`.engine`)."""

from . import linear  # noqa: F401
from . import performer, lightning, transnormer, fastmax, rfa, hedgehog  # noqa: F401
