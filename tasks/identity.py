"""What identifies a task's data and definition, cheaply: the inputs of ``Task.fingerprint()``.

Nothing here loads a dataset: local files are hashed, cached assets are named by the sha256 their
manifest records, hub datasets by id and revision, in-memory splits by ``datasets``' content fingerprint.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, hashed once per process per file version (``missing:<name>`` if it
    cannot be read, so the caller still gets a value)."""
    from benchmarks.assets.cache import sha256_cached

    p = Path(path)
    try:
        return sha256_cached(p)
    except OSError:
        return f"missing:{p.name}"


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON types, for hashing (paths as strings, dataclasses as dicts, others by repr)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [jsonable(v) for v in value]
        return sorted(items, key=repr) if isinstance(value, (set, frozenset)) else items
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    return repr(value)


def local_files_identity(paths: list[str | Path]) -> dict[str, str]:
    """``{file name: sha256}`` of local data files (names, not absolute paths: moving a folder keeps the id)."""
    return {Path(p).name: file_sha256(p) for p in paths}


def data_dir_files(data_dir: str | Path) -> list[Path]:
    """The ``<split>.{jsonl,json,parquet,csv}`` files of a task data folder, sorted."""
    folder = Path(data_dir)
    if not folder.is_dir():
        return []
    return sorted(f for f in folder.iterdir() if f.suffix in DATA_SUFFIXES)


def declared_data_files(task: Any) -> list[Path]:
    """The files a task declares as its data: ``data_files`` (YAML tasks; a path, a list, or a split map of
    either) or the ``<split>.*`` files of its ``data_dir``; ``[]`` if it declares none."""
    data_files = getattr(task, "data_files", None)
    if data_files:
        return [Path(p) for v in (data_files.values() if isinstance(data_files, dict) else [data_files])
                for p in ([v] if isinstance(v, (str, Path)) else v)]
    data_dir = getattr(task, "data_dir", None)
    return data_dir_files(data_dir) if data_dir is not None else []


def image_files(splits: Any) -> list[Path]:
    """Local image files that loaded splits read lazily (``imagefolder`` keeps a path, not the bytes)."""
    import datasets

    out: set[Path] = set()
    for name in splits:
        ds = splits[name]
        for col, feat in ds.features.items():
            if isinstance(feat, datasets.Image):
                for cell in ds.cast_column(col, datasets.Image(decode=False))[col]:
                    if cell and not cell.get("bytes") and cell.get("path") and Path(cell["path"]).is_file():
                        out.add(Path(cell["path"]))
    return sorted(out)


def local_data_paths(task: Any) -> list[Path]:
    """What ``Task.data_paths`` returns by default: declared data files, else the image files of the splits
    the task has already loaded (never loads data: a run has loaded them by the time it is recorded)."""
    declared = declared_data_files(task)
    if declared:
        return declared
    splits = getattr(task, "_splits", None)
    return image_files(splits) if splits is not None else []


def asset_identity(name: str) -> dict[str, Any] | None:
    """A cached asset's data as the cache manifest records it: the sha256 of each data (``.arrow``) file.

    ``state.json`` / ``dataset_info.json`` are left out: they carry ``datasets``' own per-save fingerprints,
    which differ between two conversions of identical data. Not fetched yet: the asset's pinned sources. ``None`` if ``name`` is no asset.
    """
    try:
        from benchmarks.assets import SPECS, Cache

        rec = Cache().record(name)
    except Exception:  # noqa: BLE001 - no asset cache available: name the dataset only
        return {"asset": name}
    if rec is not None:
        files = rec.get("files", {})
        data = {rel: f.get("sha256") for rel, f in sorted(files.items()) if rel.endswith(".arrow")}
        if not data:  # a converter with another layout: every file
            data = {rel: f.get("sha256") for rel, f in sorted(files.items())}
        return {"asset": name, "sha256": data}
    spec = SPECS.get(name)
    if spec is None:
        return None
    return {"asset": name, "fetched": False, "converter": spec.converter,
            "sources": {role: str(src) for role, src in sorted(spec.sources.items())}}


def splits_identity(splits: Any) -> dict[str, str]:
    """In-memory splits (a ``DatasetDict``): ``datasets``' content fingerprint of each split."""
    out = {}
    for name in sorted(splits):
        ds = splits[name]
        out[name] = str(getattr(ds, "_fingerprint", None) or f"len={len(ds)}")
    return out


def data_identity(task: Any) -> dict[str, Any]:
    """The data identity of ``task`` (see ``Task.data_identity``); never loads the data."""
    declared = declared_data_files(task)
    if declared or getattr(task, "data_dir", None) is not None:
        return {"files": local_files_identity(declared)}
    options = task.options() if hasattr(task, "options") else {}
    if options.get("splits") is not None:
        return {"splits": splits_identity(options["splits"])}
    dataset = getattr(task, "dataset", "")
    if getattr(task, "requires_network", False):
        return {"hub": dataset, "config": getattr(task, "dataset_name", None),
                "revision": getattr(task, "revision", None)}
    ident = asset_identity(dataset) if dataset else None
    if ident is not None:
        return ident
    # No known source (a plugin's own load_splits / load_source): the loaded splits' content fingerprints.
    try:
        return {"splits": splits_identity(task.load_splits())}
    except Exception as err:  # noqa: BLE001 - data unavailable: name it, the run will fail on it anyway
        return {"dataset": dataset, "unavailable": type(err).__name__}
