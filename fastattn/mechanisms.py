"""Imports every family so that their mechanisms register. One line per family."""

from . import exact  # noqa: F401
from . import kernel  # noqa: F401
from . import sparse  # noqa: F401
