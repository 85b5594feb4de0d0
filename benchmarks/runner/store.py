"""The result store: one JSON per run, written atomically, never rewritten once complete.

Layout under a results root::

    runs/<run_id>.json          reported runs
    tune/runs/<run_id>.json     development-task tuning runs (never in the leaderboard)
    tune/chosen.json            the option values the tuning chose (then used by the reported runs)
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any


def to_jsonable(obj: Any) -> Any:
    """Plain JSON values: tensors and numpy scalars become numbers/lists, NaN/inf become None."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "tolist"):  # torch tensors, numpy arrays and scalars
        return to_jsonable(obj.tolist())
    if isinstance(obj, slice):
        return [obj.start, obj.stop]
    return str(obj)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file in the same folder and ``os.replace``.

    A crash leaves either the old file or the new one, never a truncated file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def dump_json(obj: Any) -> str:
    """Canonical JSON text (sorted keys, strict: no NaN), so equal content gives equal bytes."""
    return json.dumps(to_jsonable(obj), indent=1, sort_keys=True, allow_nan=False) + "\n"


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, dump_json(obj))


class ResultStore:
    """Run JSONs of one phase (``runs/`` or ``tune/runs/``) under a results root."""

    def __init__(self, root: str | Path, phase: str = "main"):
        self.root = Path(root)
        self.phase = phase
        self.runs_dir = self.root / ("runs" if phase == "main" else "tune/runs")

    def path(self, run_id: str) -> Path:
        return self.runs_dir / f"{run_id}.json"

    def load(self, run_id: str) -> dict | None:
        p = self.path(run_id)
        if not p.exists():
            return None
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError:
            return None  # cannot happen with atomic writes; treated as not run

    def is_done(self, run_id: str, retry_failed: bool = False) -> bool:
        """A run with a JSON is finished and never repeated (unless it failed and ``retry_failed``)."""
        rec = self.load(run_id)
        if rec is None:
            return False
        return not (retry_failed and rec.get("status") != "ok")

    def write(self, record: dict) -> Path:
        p = self.path(record["run_id"])
        atomic_write_json(p, record)
        return p

    def records(self) -> list[dict]:
        """Every complete run JSON, sorted by run id (temp files of interrupted writes are ignored)."""
        if not self.runs_dir.exists():
            return []
        out = []
        for p in sorted(self.runs_dir.glob("*.json")):
            if p.name.startswith("."):
                continue
            try:
                out.append(json.loads(p.read_text()))
            except json.JSONDecodeError:
                continue
        return out

    def clean_temp(self) -> int:
        """Remove temp files left by a killed writer; returns how many."""
        n = 0
        if self.runs_dir.exists():
            for p in self.runs_dir.glob(".*.tmp"):
                p.unlink(missing_ok=True)
                n += 1
        return n
