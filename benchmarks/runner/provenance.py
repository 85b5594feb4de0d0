"""Provenance written into every run: code version, package versions, hardware, assets, and every weight
and data file the run used with its sha256 (``files``)."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "transformers", "peft", "accelerate", "timm", "open_clip_torch", "datasets", "nalora-bench")
REPO = Path(__file__).resolve().parents[2]


@functools.lru_cache(maxsize=1)
def git_state() -> dict[str, Any]:
    """Commit hash and whether the working tree had uncommitted changes (read-only git calls).

    A copy of the tree without ``.git`` (e.g. shipped to a GPU machine) names its commit in
    ``$NALORA_GIT_COMMIT``; ``dirty`` is then unknown (None).
    """
    if os.environ.get("NALORA_GIT_COMMIT"):
        return {"commit": os.environ["NALORA_GIT_COMMIT"], "dirty": None, "from": "NALORA_GIT_COMMIT"}

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


@functools.lru_cache(maxsize=1)
def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def hardware() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(), "cuda": None, "gpu": None}
    # Which GPU of the machine a run had (the pool and Ray pin each run with CUDA_VISIBLE_DEVICES): with the
    # device's UUID this shows from the records alone how a grid spread over the GPUs.
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        info["cuda_visible_devices"] = os.environ["CUDA_VISIBLE_DEVICES"]
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
        info["gpu"] = torch.cuda.get_device_name(torch.cuda.current_device())
        info["gpu_count"] = torch.cuda.device_count()
        uuid = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "uuid", None)
        if uuid is not None:
            info["gpu_uuid"] = str(uuid)
    return info


def asset_provenance(names: list[str]) -> dict[str, Any]:
    """``benchmarks.assets.provenance`` for each asset, when the asset layer is there and knows it."""
    try:
        from benchmarks.assets import SPECS, provenance
    except ImportError:
        return {}

    out: dict[str, Any] = {}
    for name in names:
        if not name or (name not in SPECS and "/" not in name):
            continue  # not an asset: a tiny random test model or a plugin's local data (see "files")
        try:
            out[name] = provenance(name)
        except Exception as err:  # noqa: BLE001 - hub models/datasets are not in the cache: say so
            out[name] = {"unavailable": f"{type(err).__name__}: {err}"}
    return out


def file_entry(path: str | Path, role: str, source: str) -> dict[str, Any]:
    """One used file: absolute path, sha256 (hashed once per process per file version), size, role
    (``weights`` | ``data``) and where it belongs (an asset name, ``connector``, ``task data``)."""
    from benchmarks.assets.cache import sha256_cached

    p = Path(path).resolve()
    return {"path": str(p), "sha256": sha256_cached(p), "bytes": p.stat().st_size, "role": role, "source": source}


def asset_files(name: str) -> list[dict[str, Any]]:
    """Every file of the cached asset ``name`` (models: weights, config, tokenizer; datasets: their data);
    ``[]`` when ``name`` is not in the cache (tiny test models, hub ids)."""
    from benchmarks.assets import Cache

    cache = Cache()
    rec = cache.record(name)
    if rec is None:
        return []
    role = "weights" if rec.get("kind") == "model" else "data"
    entry = cache.entry_path(name)
    return [file_entry(entry / rel, role, name) for rel in sorted(rec.get("files") or {})]


def run_files(assets: list[str], weights: list[str | Path] = (), data: list[str | Path] = ()) -> list[dict[str, Any]]:
    """Every file a run used, each once, sorted by path: the cached ``assets``' files, ``weights`` loaded
    from elsewhere (the aligned connector) and the task's local ``data`` files."""
    out: dict[str, dict[str, Any]] = {}
    entries = [e for name in dict.fromkeys(a for a in assets if a) for e in asset_files(name)]
    entries += [file_entry(p, "weights", "connector") for p in weights]
    entries += [file_entry(p, "data", "task data") for p in data]
    for e in entries:
        out.setdefault(e["path"], e)
    return [out[k] for k in sorted(out)]


def collect(assets: list[str], files: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Everything needed to say which code, packages, hardware and data produced a run: ``files`` is
    ``run_files(...)`` (every weight and data file with its sha256)."""
    from datetime import datetime, timezone

    return {"git": git_state(), "packages": package_versions(), "hardware": hardware(), "assets": asset_provenance(assets),
            "files": list(files or []), "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
