"""Shared test setup: make ``tests/`` importable (``import tiny_models``), keep torch single-threaded."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

# The machine is shared; tiny models gain nothing from intra-op threads.
torch.set_num_threads(1)
