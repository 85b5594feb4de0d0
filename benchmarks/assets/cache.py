"""The on-disk asset cache: location, manifest, atomic entries, checksums.

Layout::

    <cache>/manifest.json            # one record per converted entry (written atomically)
    <cache>/checksums.json           # sha256 of downloaded source files, recorded at first fetch
    <cache>/entries/<name>/          # the converted asset (safetensors / arrow), renamed into place whole
    <cache>/.tmp/                    # build dirs; anything left here is debris of a crashed fetch
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.fileio import atomic_write_text, current_umask

ENV_CACHE = "NALORA_BENCH_CACHE"


class AssetError(RuntimeError):
    """A missing, corrupted or unobtainable asset; the message names the fix."""


def fix_hint(name: str) -> str:
    return f"run `nalora-bench fetch {name} --force`"


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The cache root: ``override``, else ``$NALORA_BENCH_CACHE``, else ``~/.cache/nalora-bench``."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or (Path.home() / ".cache")
    return Path(base) / "nalora-bench"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` via a temp file in the same dir + ``os.replace`` (never half-written)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True))


def _umask_modes(root: Path) -> None:
    """Give a build dir and everything in it the modes the umask allows (``mkdtemp`` makes 0700, some
    writers 0600): the cache is shared read-only by whoever runs the benchmark."""
    mask = current_umask()
    for p in [root, *root.rglob("*")]:
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


# Files hashed in this process: real path -> ((size, mtime_ns, inode), sha256). An in-place edit changes the
# mtime and a replacement the inode, so a file is re-read only when it changed: verification and run
# provenance together cost one read of each file per process.
_digests: dict[str, tuple[tuple[int, int, int], str]] = {}


def sha256_cached(path: str | os.PathLike, *, fresh: bool = False) -> str:
    """``sha256_file(path)``, hashed once per process per version of the file (``fresh``: hash now)."""
    real = os.path.realpath(path)
    st = os.stat(real)
    sig = (st.st_size, st.st_mtime_ns, st.st_ino)
    hit = _digests.get(real)
    if hit is not None and hit[0] == sig and not fresh:
        return hit[1]
    digest = sha256_file(real)
    _digests[real] = (sig, digest)
    return digest


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise AssetError(f"{path} is corrupted ({err}); delete it and run `nalora-bench fetch --force`") from err


def stale(name: str, rec: dict) -> str | None:
    """Why the cached record of ``name`` is out of date, or None: its converter version is not the one this
    code's registry names (records from before versions were recorded count as version 1)."""
    from .registry import CONVERTER_VERSION, current_version

    want, have = current_version(name), str(rec.get("converter_version", CONVERTER_VERSION))
    if want is None or have == want:
        return None
    return f"stale (converted by converter version {have}, this code needs version {want})"


class Cache:
    """One cache directory. Cheap to construct; every method re-reads the manifest from disk."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = cache_dir(root)

    # --- paths -------------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @property
    def checksums_path(self) -> Path:
        return self.root / "checksums.json"

    def entry_path(self, name: str) -> Path:
        return self.root / "entries" / name

    # --- manifest ----------------------------------------------------------------------------------
    def manifest(self) -> dict:
        return _read_json(self.manifest_path)

    def record(self, name: str) -> dict | None:
        """The manifest record of a complete, current entry, or None if ``name`` is not (fully) fetched or its
        entry is stale (see ``stale``): a stale entry counts as absent, so ``fetch`` rebuilds it."""
        rec = self.manifest().get(name)
        if rec is None or not self.entry_path(name).is_dir() or stale(name, rec):
            return None
        return rec

    def has(self, name: str) -> bool:
        return self.record(name) is not None

    def _set_record(self, name: str, rec: dict | None) -> None:
        # Manifest updates are read-modify-write of a small file; concurrent fetches of *different*
        # names in one cache could race, so take a simple lock file.
        with self._lock():
            man = self.manifest()
            if rec is None:
                man.pop(name, None)
            else:
                man[name] = rec
            atomic_write_json(self.manifest_path, man)

    @contextlib.contextmanager
    def _lock(self, timeout: float = 60.0) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        lock = self.root / ".manifest.lock"
        deadline = time.monotonic() + timeout
        while True:
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                break
            except FileExistsError:
                if time.monotonic() > deadline:  # a crashed holder: steal it
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(lock)
                    continue
                time.sleep(0.05)
        try:
            yield
        finally:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)

    # --- source checksums (trust on first use) -----------------------------------------------------
    def check_source(self, key: str, digest: str, known: str | None = None) -> str:
        """Compare a downloaded file's sha256 with the known one, else the one recorded at first fetch.

        Returns "known", "recorded" (matched an earlier fetch) or "new" (recorded now)."""
        expected = known
        status = "known"
        if expected is None:
            expected = _read_json(self.checksums_path).get(key)
            status = "recorded"
        if expected is None:
            with self._lock():
                sums = _read_json(self.checksums_path)
                sums[key] = digest
                atomic_write_json(self.checksums_path, sums)
            return "new"
        if digest != expected:
            raise AssetError(
                f"checksum mismatch for {key}: got sha256 {digest}, expected {expected} ({status}); "
                "the download is corrupted or the upstream file changed"
            )
        return status

    # --- building entries atomically ---------------------------------------------------------------
    @contextlib.contextmanager
    def build(self, name: str) -> Iterator[Path]:
        """Yield an empty temp dir inside the cache; on normal exit it becomes the entry ``name``.

        On an exception (or a kill: the dir stays under ``.tmp/``, never under ``entries/``) nothing
        is published and the old entry, if any, is untouched. The caller must call ``commit`` after
        the block to write the manifest record."""
        tmp_root = self.root / ".tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f"{name}.", dir=tmp_root))
        try:
            yield work
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise

    def publish(self, name: str, work: Path, rec: dict) -> Path:
        """Move a finished build dir into ``entries/<name>`` and record it; replaces an old entry."""
        dest = self.entry_path(name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        old = None
        if dest.exists():
            # Drop the manifest record first: a crash between the two renames must not leave a
            # record pointing at a missing or mismatched directory.
            self._set_record(name, None)
            old = Path(tempfile.mkdtemp(prefix=f"{name}.old.", dir=self.root / ".tmp"))
            os.rmdir(old)
            os.rename(dest, old)
        _umask_modes(work)
        os.rename(work, dest)
        self._set_record(name, rec)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return dest

    def remove(self, name: str) -> None:
        self._set_record(name, None)
        shutil.rmtree(self.entry_path(name), ignore_errors=True)

    def clean_debris(self) -> int:
        """Delete leftovers of crashed fetches under ``.tmp/`` older than an hour; returns the count."""
        tmp_root = self.root / ".tmp"
        if not tmp_root.is_dir():
            return 0
        n = 0
        for p in tmp_root.iterdir():
            if time.time() - p.stat().st_mtime > 3600:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                n += 1
        return n

    # --- verification ------------------------------------------------------------------------------
    def require(self, name: str, full: bool = False) -> tuple[Path, dict]:
        """Return (entry dir, record) after checking every file of the entry against the manifest;
        raise ``AssetError`` naming the file and the fix.

        Each file is hashed once per process (``sha256_cached``): later calls re-hash only what changed.
        ``full`` re-hashes everything now."""
        rec = self.record(name)
        if rec is None:
            why = stale(name, self.manifest().get(name) or {}) if self.entry_path(name).is_dir() else None
            where = f"in the cache {self.root} is {why}" if why else f"is not in the cache {self.root}"
            raise AssetError(f"asset {name!r} {where}; run `nalora-bench fetch {name}`")
        path = self.entry_path(name)
        files = rec.get("files") or {}
        if not files or rec.get("main_file") not in files:
            raise AssetError(f"the manifest record of {name!r} in {self.manifest_path} lists no files; {fix_hint(name)}")
        for rel, want in files.items():
            f = path / rel
            try:
                size = f.stat().st_size
            except FileNotFoundError:
                raise AssetError(f"cached asset {name!r} is missing {rel} ({f}); {fix_hint(name)}") from None
            if size != want["size"] or sha256_cached(f, fresh=full) != want["sha256"]:
                raise AssetError(f"cached asset {name!r} is corrupted: {rel} fails its sha256 check ({f}); "
                                 f"{fix_hint(name)}")
        return path, rec


def file_table(root: Path) -> dict[str, dict]:
    """{relative path: {size, sha256}} for every file under ``root`` (recorded in the manifest)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[p.relative_to(root).as_posix()] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    return out


def dir_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
