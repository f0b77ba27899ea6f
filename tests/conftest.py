"""Test-wide settings: one thread (the suite's numbers must not depend on the machine's cores), and
uninitialised memory filled with NaN so that an op reading a ``torch.empty`` it never wrote fails
loudly instead of passing on whatever happened to be there. ``helpers`` is importable from every
test folder."""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True, warn_only=True)
torch.utils.deterministic.fill_uninitialized_memory = True
