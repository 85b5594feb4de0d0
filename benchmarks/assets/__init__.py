"""The offline asset cache: fetch, verify, convert and load models and datasets by name.

Heavy libraries (torch, transformers, datasets) are imported only inside the functions that use them.
"""

from .cache import AssetError, Cache, cache_dir
from .data import describe_dataset, load_dataset
from .fetch import fetch
from .models import ModelBundle, load_model
from .provenance import provenance
from .registry import SPECS, default_names


def verify(name: str, cache_dir: str | None = None) -> dict:
    """Full check of a cached entry now: size + sha256 of every converted file. Raises ``AssetError``."""
    _, rec = Cache(cache_dir).require(name, full=True)
    return rec


__all__ = [
    "SPECS",
    "AssetError",
    "Cache",
    "ModelBundle",
    "cache_dir",
    "default_names",
    "describe_dataset",
    "fetch",
    "load_dataset",
    "load_model",
    "provenance",
    "verify",
]
