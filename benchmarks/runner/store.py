"""The result store: one JSON per run, written atomically, never rewritten once complete.

Layout under a results root::

    runs/<run_id>.json          reported runs (compact: see sidefile.py)
    runs/<run_id>.hist.json.gz  the run's per-layer histories and predictions, written before the record
    tune/runs/<run_id>.json     development-task tuning runs (never in the leaderboard)
    tune/chosen.json            the option values the tuning chose (then used by the reported runs)
    .nalora-bench.lock          held (flock) by the one runner writing here; names its pid

What it guarantees is in docs/fault_model.md: a record on disk is complete or absent; a finished record
that cannot be written (disk full, read-only) is kept in an orphan folder and adopted by the next run;
one runner per results root; environment failures are retried by default.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.fileio import TEMP_SUFFIX, atomic_write_bytes, atomic_write_text, pid_alive, writer_pid
from benchmarks.runner import sidefile

__all__ = ["ResultStore", "StoreError", "atomic_write_json", "atomic_write_text", "dump_json", "results_lock",
           "to_jsonable"]

LOCK_NAME = ".nalora-bench.lock"
MIN_FREE_BYTES = 16 * 2**20  # a record is KBs to a few MBs; less than this free means the next write may fail
ENV_ORPHANS = "NALORA_BENCH_ORPHANS"
# Errors after which a record cannot be stored in the results folder, but can be kept elsewhere.
_UNWRITABLE = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EIO}
ENVIRONMENT = "environment"  # error type of failures caused by the machine, not the method: retried by default


class StoreError(RuntimeError):
    """The results folder cannot be used (not writable, full, locked by another runner)."""


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


def dump_json(obj: Any) -> str:
    """Canonical JSON text (sorted keys, strict: no NaN), so equal content gives equal bytes."""
    return json.dumps(to_jsonable(obj), indent=1, sort_keys=True, allow_nan=False) + "\n"


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, dump_json(obj))


def write_compact(path: Path, text: str, side: bytes | None) -> None:
    """Write a compact record's side file (if any) and then the record, each atomically: a crash between
    the two leaves an orphaned side file (harmless, replaced by the rerun), never a record without one."""
    if side is not None:
        atomic_write_bytes(sidefile.side_path(path), side)
    atomic_write_text(path, text)


_warned: set[tuple[str, int]] = set()


def _warn_once(path: Path, what: str) -> None:
    """One stderr line per bad file (and version of it) per process: ``is_done`` reads a file many times."""
    try:
        key = (str(path), path.stat().st_mtime_ns)
    except OSError:
        key = (str(path), 0)
    if key not in _warned:
        _warned.add(key)
        print(f"warning: {path} {what}; treated as not run (it is run again and replaced)", file=sys.stderr)


def read_record(path: Path) -> dict | None:
    """The run record in ``path``, or None when absent or not a record (truncated, ``[]``, ``null``: warned)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        _warn_once(path, f"cannot be read ({err})")
        return None
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as err:
        _warn_once(path, f"is not valid JSON (truncated? {err.msg} at line {err.lineno})")
        return None
    if not isinstance(rec, dict) or not rec:
        _warn_once(path, f"holds {json.dumps(rec)[:20]} instead of a run record")
        return None
    return rec


def is_environment_failure(rec: dict) -> bool:
    """A failure caused by the machine (missing asset, OSError, ...): not a result of the method."""
    return rec.get("status") == "failed" and (rec.get("error") or {}).get("type") == ENVIRONMENT


def orphan_dirs() -> list[Path]:
    """Where records that could not be written into their results folder are kept, in order of preference."""
    if os.environ.get(ENV_ORPHANS):
        return [Path(os.environ[ENV_ORPHANS]).expanduser()]
    from benchmarks.assets.cache import cache_dir  # the user's cache (~/.cache/nalora-bench), not the results disk

    return [cache_dir() / "orphans", Path(tempfile.gettempdir()) / "nalora-bench-orphans"]


class ResultStore:
    """Run JSONs of one phase (``runs/`` or ``tune/runs/``) under a results root."""

    def __init__(self, root: str | Path, phase: str = "main"):
        self.root = Path(root)
        self.phase = phase
        self.runs_dir = self.root / ("runs" if phase == "main" else "tune/runs")

    def path(self, run_id: str) -> Path:
        return self.runs_dir / f"{run_id}.json"

    def load(self, run_id: str) -> dict | None:
        """The run's record, or None if it has none (or a damaged one, warned about once)."""
        return read_record(self.path(run_id))

    def is_done(self, run_id: str, retry_failed: bool = False) -> bool:
        """A run with a record is finished and never repeated, except: environment failures (always
        retried) and, with ``retry_failed``, runs recorded ``failed`` (an exception). ``collapsed`` and
        ``diverged`` runs are results of the method and stay (rerunning them would repeat them exactly)."""
        rec = self.load(run_id)
        if rec is None or is_environment_failure(rec):
            return False
        return not (retry_failed and rec.get("status") == "failed")

    def write(self, record: dict) -> Path:
        """Write ``record`` in compact form: its side file first, then the record (each atomic), so a record
        on disk never names a side file that was not written. If the results folder is full or read-only,
        keep both in an orphan folder (adopted by the next ``adopt_orphans``), print one line saying where,
        and return that path."""
        p = self.path(record["run_id"])
        main, side = sidefile.compact(to_jsonable(record))
        text = dump_json(main)
        try:
            write_compact(p, text, side)
            return p
        except OSError as err:
            if err.errno not in _UNWRITABLE:
                raise
            reason = err.strerror or str(err)
        kept = self._keep_orphan(record["run_id"], text, side)
        print(f"could not write {p} ({reason}); the finished record is kept at {kept} and is moved into "
              f"{self.runs_dir} by the next `nalora-bench run` on it (or copy it there yourself)", file=sys.stderr)
        return kept

    # --- orphans: finished records that could not be written where they belong ----------------------
    def _orphan_key(self) -> str:
        return hashlib.sha256(str(self.runs_dir.resolve()).encode()).hexdigest()[:12]

    def _keep_orphan(self, run_id: str, text: str, side: bytes | None) -> Path:
        errors = []
        for base in orphan_dirs():
            folder = base / self._orphan_key()
            try:
                atomic_write_text(folder / "destination.txt", f"{self.runs_dir.resolve()}\n")
                write_compact(folder / f"{run_id}.json", text, side)
                return folder / f"{run_id}.json"
            except OSError as err:
                errors.append(f"{base}: {err.strerror or err}")
        raise StoreError(f"could not keep the record of run {run_id} anywhere ({'; '.join(errors)})")

    def adopt_orphans(self) -> int:
        """Move records kept by ``write`` after a failed write back into this store; returns how many."""
        n = 0
        for base in orphan_dirs():
            folder = base / self._orphan_key()
            if not folder.is_dir():
                continue
            for p in sorted(folder.glob("*.json")):
                rec = read_record(p)
                if rec is None or rec.get("run_id") != p.stem:
                    continue
                side = sidefile.side_path(p)
                if self.load(p.stem) is None:
                    # the record's bytes as kept (they carry the side file's sha256); side file first
                    write_compact(self.path(p.stem), p.read_text(), side.read_bytes() if side.exists() else None)
                    n += 1
                side.unlink(missing_ok=True)
                p.unlink()
        if n:
            print(f"recovered {n} finished run record(s) kept after an earlier failed write", file=sys.stderr)
        return n

    # --- reading ----------------------------------------------------------------------------------
    def records(self) -> list[dict]:
        """Every complete run JSON, sorted by run id (temp files and damaged files are skipped)."""
        if not self.runs_dir.exists():
            return []
        out = []
        for p in sorted(self.runs_dir.glob("*.json")):
            if p.name.startswith("."):
                continue
            rec = read_record(p)
            if rec is not None:
                out.append(rec)
        return out

    # --- before training ----------------------------------------------------------------------------
    def check_writable(self, min_free: int = MIN_FREE_BYTES) -> None:
        """Raise ``StoreError`` (one line) unless a record can be written here now, with room to spare."""
        probe = self.runs_dir / f".write-probe.{os.getpid()}"
        try:
            self.runs_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(probe, "probe\n")
            probe.unlink()
        except OSError as err:
            raise StoreError(f"results folder {self.runs_dir} is not writable ({err.strerror or err}); "
                             "fix its permissions or pass another --out") from None
        free = self.free_bytes()
        if free is not None and free < min_free:
            raise StoreError(f"results folder {self.runs_dir} has {free / 2**20:.1f} MiB free, less than the "
                             f"{min_free / 2**20:.0f} MiB a run needs; free some space or pass another --out")

    def free_bytes(self) -> int | None:
        try:
            return shutil.disk_usage(self.runs_dir).free
        except OSError:
            return None

    def clean_temp(self, max_age_s: float = 3600.0) -> int:
        """Remove temp files left by killed writers; returns how many.

        A temp file whose writer (pid in its name) is alive is never touched: it is an in-flight write.
        Names without a pid (older versions) are removed only when older than ``max_age_s``."""
        n = 0
        if not self.runs_dir.exists():
            return 0
        for p in self.runs_dir.glob(f".*{TEMP_SUFFIX}"):
            pid = writer_pid(p)
            if pid is not None:
                if pid_alive(pid):
                    continue
            else:
                try:
                    if time.time() - p.stat().st_mtime < max_age_s:
                        continue
                except FileNotFoundError:
                    continue
            p.unlink(missing_ok=True)
            n += 1
        return n


# --- one runner per results root -----------------------------------------------------------------
_held: dict[str, list[int]] = {}  # resolved root -> [fd, depth]: re-entrant within one process


@contextlib.contextmanager
def results_lock(root: str | Path) -> Iterator[None]:
    """Hold the results root exclusively (``fcntl.flock``, released by the kernel when the process dies).

    Another process holding it: ``StoreError`` naming its pid. Re-entrant within a process."""
    import fcntl

    key = str(Path(root).resolve())
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    Path(key).mkdir(parents=True, exist_ok=True)
    lock = Path(key) / LOCK_NAME
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        try:
            holder = lock.read_text().strip() or "unknown"
        except OSError:
            holder = "unknown"
        raise StoreError(f"results folder {key} is in use by another runner (pid {holder}); wait for it to "
                         "finish or pass another --out") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        _held[key] = [fd, 1]
        yield
    finally:
        _held.pop(key, None)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
