"""``nalora-bench compact``: rewrite a results folder's run records in compact form (``sidefile.py``).

Run ids, configs and every value stay as they are: only where the bulky parts live changes. Idempotent: a
record already compact (and its side file) is left byte-for-byte alone.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmarks.runner import sidefile
from benchmarks.runner.store import dump_json, read_record, results_lock, write_compact

PHASE_DIRS = ("runs", "tune/runs")


@dataclass
class CompactCounts:
    """What ``compact_results`` did; sizes are of the records and side files, before and after."""

    rewritten: int = 0
    unchanged: int = 0
    skipped: int = 0
    bytes_before: int = 0
    bytes_after: int = 0


def _size(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths if p.exists())


def _record_files(runs_dir: Path) -> list[Path]:
    return [p for p in sorted(runs_dir.glob("*.json")) if not p.name.startswith(".")] if runs_dir.is_dir() else []


def compact_record(path: Path) -> bool | None:
    """Rewrite the record at ``path`` in compact form; True if rewritten, False if already compact,
    None if skipped (not a record, named for another run, or its side file unusable: one stderr line)."""
    rec = read_record(path)  # warns about a damaged file
    if rec is None:
        return None
    if rec.get("run_id") != path.stem:
        print(f"compact: skipping {path}: its run_id {rec.get('run_id')!r} is not its file name", file=sys.stderr)
        return None
    try:
        sidefile.attach(rec, path)  # an already compact record: compacted again to the same bytes
    except sidefile.SideFileError as err:
        print(f"compact: skipping {path}: {err}", file=sys.stderr)
        return None
    main, side = sidefile.compact(rec)
    text = dump_json(main)
    side_p = sidefile.side_path(path)
    if path.read_text() == text and (side is None or (side_p.exists() and side_p.read_bytes() == side)):
        return False
    write_compact(path, text, side)
    return True


def compact_results(root: str | Path) -> CompactCounts:
    """Compact every record under ``root``'s ``runs/`` and ``tune/runs/``, holding the folder's runner lock."""
    root = Path(root)
    if not (root / "runs").is_dir():
        raise FileNotFoundError(f"no run records in {root}/runs (pass a results folder such as results/default)")
    counts = CompactCounts()
    with results_lock(root):
        for sub in PHASE_DIRS:
            runs_dir = root / sub
            files = _record_files(runs_dir)
            counts.bytes_before += _size(files + [sidefile.side_path(p) for p in files])
            for p in files:
                done = compact_record(p)
                if done is None:
                    counts.skipped += 1
                elif done:
                    counts.rewritten += 1
                else:
                    counts.unchanged += 1
            counts.bytes_after += _size(files + [sidefile.side_path(p) for p in files])
    return counts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", required=True, help="results folder holding runs/, e.g. results/default")


def main(args: argparse.Namespace) -> int:
    c = compact_results(args.results)
    print(f"compact: {c.rewritten} record(s) rewritten, {c.unchanged} already compact, {c.skipped} skipped; "
          f"records and side files {c.bytes_before / 2**20:.2f} MiB -> {c.bytes_after / 2**20:.2f} MiB")
    return 1 if c.skipped else 0
