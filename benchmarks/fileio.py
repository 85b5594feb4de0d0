"""Crash-safe file writes shared by the result store, the report and the asset cache.

Stdlib only, so every layer (assets, runner, report) can use it without importing the others.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

TEMP_SUFFIX = ".tmp"


def current_umask() -> int:
    """The process umask (read from /proc on Linux; elsewhere set-and-restore, which is not thread-safe)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_name(path: Path) -> Path:
    """``.<name>.<pid>.<random>.tmp`` next to ``path``: the pid says whose write it is (see ``writer_pid``)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}")


def writer_pid(temp: Path) -> int | None:
    """The pid recorded in a temp file's name by ``temp_name``; None for other names."""
    parts = temp.name.split(".")
    if len(parts) >= 4 and temp.name.endswith(TEMP_SUFFIX) and parts[-3].isdigit():
        return int(parts[-3])
    return None


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (a zombie counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder, fsync and ``os.replace``.

    A crash leaves either the old file or the new one, never a truncated file. The file gets the
    umask's mode (``os.open(..., 0o666)``), like any file the user's shell would create.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """``atomic_write_bytes`` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))
