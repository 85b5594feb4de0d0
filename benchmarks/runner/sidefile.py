"""Compact run records: bulky per-layer and per-example parts live in a gzip side file next to the record.

A run record keeps what the leaderboard, tables, selection and paired bootstrap read (config, metrics, status,
meta, health, ``history``, the ``per_example`` ids hash and correct bits). The parts in ``MOVED`` go to
``<run_id>.hist.json.gz`` in the same folder, and the record names it::

    "side": {"file": "<run_id>.hist.json.gz", "sha256": "<hex of the file's bytes>", "keys": ["adapted_modules", ...]}

The side file is gzip (mtime 0, no file name: equal content gives equal bytes) of canonical JSON
``{"run_id": ..., "values": {"nalora/history": ..., ...}}``. ``attach`` puts the parts back after checking
the sha256, so a hydrated record equals the record before ``compact``. A missing or damaged side file loses
only those parts (plots of mask dynamics skip the run, the asset checksums are unknown); the record itself
keeps everything the tables read.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
import zlib
from pathlib import Path
from typing import Any

SIDE_SUFFIX = ".hist.json.gz"
SIDE_KEY = "side"
WILDCARD = "*"  # any key at this level (the per_example splits)
# Key paths moved out of the record: per-refresh controller history, per-layer misalignment, the per-module
# adapter report, per-example predictions (the collapse rule read them before the record was written), and the
# provenance of every asset and file the run read (sha256s and paths: a third of a record's bytes, read by no
# table; the commit, packages, GPU and finish time stay in the record).
MOVED: tuple[tuple[str, ...], ...] = (
    ("nalora", "history"),
    ("diagnostics", "selection_misalignment", "per_layer"),
    ("adapted_modules",),
    ("per_example", WILDCARD, "pred"),
    ("provenance", "assets"),
    ("provenance", "files"),
)


def side_path(record_path: Path) -> Path:
    """The side file of the record at ``record_path`` (``runs/<id>.json`` -> ``runs/<id>.hist.json.gz``)."""
    return record_path.with_name(record_path.stem + SIDE_SUFFIX)


def _expand(rec: dict, path: tuple[str, ...]) -> list[tuple[str, ...]]:
    """Concrete key paths of ``path`` present in ``rec`` (``WILDCARD`` matches every key of a dict)."""
    found: list[tuple[str, ...]] = [()]
    for part in path:
        nxt = []
        for prefix in found:
            node = _get(rec, prefix)
            if not isinstance(node, dict):
                continue
            keys = sorted(node) if part == WILDCARD else [part] if part in node else []
            nxt += [prefix + (k,) for k in keys]
        found = nxt
    return found


def _get(rec: dict, path: tuple[str, ...]) -> Any:
    node: Any = rec
    for k in path:
        node = node[k]
    return node


def _bulky(value: Any) -> bool:
    """Worth moving: None and empty containers stay where they are (nothing to save)."""
    return value is not None and value != [] and value != {}


def encode(run_id: str, values: dict[str, Any]) -> bytes:
    """The side file's bytes: deterministic gzip of canonical JSON (``values`` must be plain JSON values)."""
    text = json.dumps({"run_id": run_id, "values": values}, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0)


def compact(rec: dict) -> tuple[dict, bytes | None]:
    """``(record without the MOVED parts and with a "side" entry, side file bytes)``; ``(rec copy, None)``
    when nothing is worth moving. ``rec`` is a full (hydrated) record of plain JSON values (``to_jsonable``);
    it is not modified."""
    main = copy.deepcopy(rec)
    main.pop(SIDE_KEY, None)
    values: dict[str, Any] = {}
    for pattern in MOVED:
        for path in _expand(main, pattern):
            if _bulky(_get(main, path)):
                values["/".join(path)] = _get(main, path[:-1]).pop(path[-1])
    if not values:
        return main, None
    data = encode(str(rec["run_id"]), values)
    main[SIDE_KEY] = {"file": f"{rec['run_id']}{SIDE_SUFFIX}", "sha256": hashlib.sha256(data).hexdigest(),
                      "keys": sorted(values)}
    return main, data


class SideFileError(ValueError):
    """The side file named by a record is missing, damaged or not the one the record names."""


def read_side(rec: dict, record_path: Path) -> dict[str, Any]:
    """The moved parts of ``rec`` (``{"nalora/history": ..., ...}``), checked against the record's sha256.

    Raises ``SideFileError`` with a one-line reason."""
    ref = rec.get(SIDE_KEY)
    if not isinstance(ref, dict) or not isinstance(ref.get("file"), str) or not isinstance(ref.get("sha256"), str):
        raise SideFileError(f"its {SIDE_KEY!r} entry is malformed")
    p = record_path.with_name(Path(ref["file"]).name)  # never outside the record's folder
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise SideFileError(f"side file {p.name} is missing") from None
    except OSError as err:
        raise SideFileError(f"side file {p.name} cannot be read ({err.strerror or err})") from None
    if hashlib.sha256(data).hexdigest() != ref["sha256"]:
        raise SideFileError(f"side file {p.name} does not match the record's sha256 (damaged, or from another write)")
    try:
        body = json.loads(gzip.decompress(data))
    except (OSError, EOFError, zlib.error, ValueError) as err:  # sha matched, so the record names a bad file
        raise SideFileError(f"side file {p.name} is not gzip JSON ({err})") from None
    if not isinstance(body, dict) or body.get("run_id") != rec.get("run_id") or not isinstance(body.get("values"), dict):
        raise SideFileError(f"side file {p.name} is not the side file of run {rec.get('run_id')}")
    return body["values"]


def attach(rec: dict, record_path: Path) -> None:
    """Put the side file's parts back into ``rec`` (in place) and drop its "side" entry; no-op for a record
    without one. Raises ``SideFileError`` (``rec`` unchanged) when the side file cannot be used."""
    if SIDE_KEY not in rec:
        return
    values = read_side(rec, record_path)
    for key in values:  # check every key before changing anything
        node: Any = rec
        for k in key.split("/")[:-1]:
            node = node.get(k, {}) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            raise SideFileError(f"side file key {key!r} does not fit the record")
    for key, value in values.items():
        *parents, last = key.split("/")
        node = rec
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = value
    del rec[SIDE_KEY]


def read_full(record_path: Path) -> dict:
    """The record at ``record_path`` with its side file's parts attached, as it was before ``compact``.

    For tools that compare whole records (tests, the SIGKILL drill); raises ``SideFileError`` or a JSON error."""
    rec = json.loads(Path(record_path).read_text())
    if isinstance(rec, dict):
        attach(rec, Path(record_path))
    return rec
