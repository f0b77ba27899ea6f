"""Sparse-pattern attention: fixed, data-independent (or learned) sparsity patterns on one
block-sparse engine (:mod:`fastattn.sparse.engine`, patterns in :mod:`fastattn.sparse.patterns`)."""

from . import local  # noqa: F401
from . import sparse_transformer, longformer, bigbird  # noqa: F401,E401
from . import axial  # noqa: F401
from . import etc, diet  # noqa: F401,E401
from . import jukebox  # noqa: F401
from . import handcrafted  # noqa: F401
from . import gmat, star  # noqa: F401,E401
from . import interlaced  # noqa: F401
from . import multiscale  # noqa: F401
from . import hat  # noqa: F401
from . import bp_transformer  # noqa: F401
from . import sac  # noqa: F401
