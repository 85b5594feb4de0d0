"""The GPU time a results folder cost: ``invocations.jsonl``, one line per event of each grid invocation.

A run record says how long one run took, but runs share GPUs, so their times do not add up to the GPU time a
grid used. Each invocation of the grid (``run_grid`` / ``run_grid_ray`` for one phase or lr round) appends a
``start`` line (when, which GPUs, how many workers), an ``alive`` line every minute while it runs and an
``end`` line (its summary). An invocation killed from outside (a GPU call's time limit, SIGKILL) has no ``end``:
its last ``alive`` line bounds its length to within a minute. ``gpu_hours`` turns the lines into GPU-hours
(length x GPUs) and the runs finished in them (records whose ``provenance.finished_at`` falls inside).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any, Iterator

LEDGER = "invocations.jsonl"
HEARTBEAT_S = 60.0


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def append_line(path: Path, entry: dict[str, Any]) -> None:
    """Append ``entry`` to the JSON-lines file ``path``. One short line per write with O_APPEND: concurrent
    writers do not interleave within a line."""
    line = json.dumps(entry, sort_keys=True) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of the JSON-lines file ``path`` ([] if it is missing); unreadable lines (one cut by a
    kill) are skipped."""
    try:
        text = Path(path).read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if isinstance(e, dict):
            out.append(e)
    return out


def nvidia_smi(field: str) -> dict[str, str]:
    """``{gpu index: value}`` of one ``nvidia-smi --query-gpu`` field (no CUDA context in this process); empty
    when nvidia-smi is missing or fails."""
    if shutil.which("nvidia-smi") is None:
        return {}
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu=index,{field}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return dict(line.split(", ", 1) for line in out.strip().splitlines() if ", " in line)


def gpu_names(ids: list[str]) -> list[str]:
    """Names of the visible GPUs ``ids``, "unknown GPU" for each nvidia-smi cannot name (the count is what
    GPU-hours need)."""
    names = nvidia_smi("name") if ids else {}
    return [names.get(i.strip(), "unknown GPU") for i in ids]


@contextlib.contextmanager
def invocation(root: str | Path, info: dict[str, Any], heartbeat_s: float = HEARTBEAT_S) -> Iterator[dict[str, Any]]:
    """Record one grid invocation in ``root/invocations.jsonl``; the caller puts its summary under ``"end"`` of
    the yielded dict (written at exit, also when the invocation raised)."""
    path = Path(root) / LEDGER
    inv = {"id": uuid.uuid4().hex[:12], "end": {}}
    start = dt.datetime.now(dt.timezone.utc)
    failed: list[str] = []

    def write(entry: dict[str, Any]) -> None:
        # Accounting, not results: a ledger that cannot be written costs its lines, never the runs (an unwritable
        # results folder is the store's one-line error, raised before any training).
        if failed:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            append_line(path, entry)
        except OSError as err:
            failed.append(str(err))
            print(f"ledger: {path} not written ({err}); this invocation's GPU time goes unrecorded", file=sys.stderr)

    write({"event": "start", "id": inv["id"], "at": start.isoformat(timespec="seconds"), **info})
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(heartbeat_s):
            write({"event": "alive", "id": inv["id"], "at": now_iso()})

    t = threading.Thread(target=beat, name="nalora-ledger", daemon=True)
    t.start()
    try:
        yield inv
    finally:
        stop.set()
        t.join(timeout=5)
        wall = (dt.datetime.now(dt.timezone.utc) - start).total_seconds()
        write({"event": "end", "id": inv["id"], "at": now_iso(), "wall_s": round(wall, 1), **inv["end"]})


def read(root: str | Path) -> list[dict[str, Any]]:
    """Every invocation of ``root``'s ledger: ``{"id", "start", "last", "ended", "info", "end"}`` (unreadable
    lines are skipped: a line cut by a kill)."""
    invs: dict[str, dict[str, Any]] = {}
    for e in read_lines(Path(root) / LEDGER):
        try:
            at = dt.datetime.fromisoformat(e["at"])
        except (ValueError, KeyError, TypeError):
            continue
        inv = invs.get(e.get("id"))
        if e.get("event") == "start":
            invs[e["id"]] = {"id": e["id"], "start": at, "last": at, "ended": False, "end": {},
                             "info": {k: v for k, v in e.items() if k not in ("event", "id", "at")}}
        elif inv is not None:
            inv["last"] = max(inv["last"], at)
            if e.get("event") == "end":
                inv["ended"] = True
                inv["end"] = {k: v for k, v in e.items() if k not in ("event", "id", "at")}
    return sorted(invs.values(), key=lambda i: i["start"])


def gpu_hours(root: str | Path, records: list[dict]) -> dict[str, Any] | None:
    """GPU time of ``root``'s grid invocations that used GPUs, and the runs that finished inside them; None
    without a ledger. ``killed``: invocations without an ``end`` line (counted to their last ``alive`` line)."""
    every = read(root)
    if not every:
        return None
    invs = [i for i in every if i["info"].get("gpus")]
    finished = []
    for r in records:
        at = (r.get("provenance") or {}).get("finished_at")
        try:
            finished.append(dt.datetime.fromisoformat(at))
        except (TypeError, ValueError):
            continue
    hours = sum((i["last"] - i["start"]).total_seconds() * len(i["info"]["gpus"]) for i in invs) / 3600
    runs = sum(1 for at in finished if any(i["start"] <= at <= i["last"] for i in invs))
    return {"invocations": len(invs), "killed": sum(not i["ended"] for i in invs), "gpu_hours": hours,
            "runs": runs, "gpus": sorted({g for i in invs for g in i["info"]["gpus"]}),
            "records": len(records)}
