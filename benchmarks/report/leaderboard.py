"""The leaderboard: one row per run JSON, with the validation-selected setting marked."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

from benchmarks.runner import sidefile
from benchmarks.runner.grid import select_settings, setting_key
from benchmarks.runner.record import LEADERBOARD_COLUMNS, leaderboard_row
from benchmarks.runner.store import atomic_write_text

INT_COLUMNS = ["seed", "rank", "steps", "batch_size", "grad_accum", "trainable_params", "total_params"]
SORT_KEYS = ["model", "task", "method", "lr", "options", "seed", "run_id"]


def _problem(rec: object) -> str | None:
    """Why a parsed run JSON cannot be reported (None if it can)."""
    if not isinstance(rec, dict):
        return f"holds {type(rec).__name__}, not a run record"
    c = rec.get("config")
    if not isinstance(c, dict):
        return "has no config"
    missing = [k for k in ("model", "task", "method", "seed", "lr") if k not in c]
    if missing:
        return f"config lacks {', '.join(missing)}"
    if not isinstance(rec.get("run_id"), str):
        return "has no run_id"
    return None


def load_records(results: str | Path, phase: str = "main") -> list[dict]:
    """Every run JSON of ``phase`` under ``results`` (``main``: ``runs/``; tuning runs are never reported).

    A file that is not a run record (``[]``, ``null``, truncated JSON, no config) is skipped with a
    one-line warning naming it on stderr: one bad file must not hide every other result. A compact record's
    side file (per-layer histories, predictions) is attached; when it is missing or damaged the record is
    kept without those parts (tables unchanged, the mask-dynamics plot skips it) and one line says so.
    """
    runs = Path(results) / ("runs" if phase == "main" else "tune/runs")
    out = []
    for p in sorted(runs.glob("*.json")) if runs.is_dir() else []:
        if p.name.startswith("."):  # temp file of an interrupted atomic write
            continue
        try:
            rec = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            print(f"report: skipping {p}: not valid JSON ({e.msg if hasattr(e, 'msg') else e})", file=sys.stderr)
            continue
        why = _problem(rec)
        if why:
            print(f"report: skipping {p}: {why}", file=sys.stderr)
            continue
        try:
            sidefile.attach(rec, p)
        except sidefile.SideFileError as err:
            print(f"report: {p}: {err}; its per-layer histories are left out of the plots", file=sys.stderr)
        out.append(rec)
    return out


def drop_superseded(records: list[dict]) -> list[dict]:
    """Per model x task x method, only the records of the newest configuration: when the code or a default
    changed, a resumed suite trains the cell again under new run ids, and the older configuration's records
    (at any lr and seed) are left out with one line. Otherwise two configurations of one cell would pass for
    lr settings of one, and selection would compare across them."""
    def cell(rec: dict) -> tuple:
        c = rec["config"]
        return c["model"], c["task"], c["method"]

    def configuration(rec: dict) -> str:
        return setting_key({k: v for k, v in rec["config"].items() if k != "lr"})

    def finished(rec: dict) -> tuple:
        return str((rec.get("provenance") or {}).get("finished_at") or ""), rec["run_id"]

    newest: dict[tuple, dict] = {}
    for rec in records:
        k = cell(rec)
        if k not in newest or finished(rec) > finished(newest[k]):
            newest[k] = rec
    current = {k: configuration(r) for k, r in newest.items()}
    keep = [r for r in records if configuration(r) == current[cell(r)]]
    old = sorted(r["run_id"] for r in records if configuration(r) != current[cell(r)])
    if old:
        print(f"report: {len(old)} record(s) of an older configuration of their model, task and method are left "
              f"out (run ids {', '.join(old[:5])}{' ...' if len(old) > 5 else ''})", file=sys.stderr)
    return keep


def selected_ids(records: list[dict]) -> set[str]:
    """Run ids of the setting chosen on validation per model x task x method (all its seeds)."""
    chosen = select_settings(records)
    out = set()
    for rec in records:
        c = rec["config"]
        sel = chosen.get((c["model"], c["task"], c["method"]))
        if sel is not None and setting_key(c) == sel["setting"]:
            out.add(rec["run_id"])
    return out


def build(records: list[dict]) -> pd.DataFrame:
    """The leaderboard frame (columns ``LEADERBOARD_COLUMNS``), in a stable order."""
    sel = selected_ids(records)
    rows = [leaderboard_row(r, r["run_id"] in sel) for r in records]
    df = pd.DataFrame(rows, columns=LEADERBOARD_COLUMNS)
    for col in INT_COLUMNS:  # nullable ints: a failed run's missing count must not turn 1000000 into 1e+06
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("Int64")
    if len(df):
        df = df.sort_values(SORT_KEYS, kind="mergesort").reset_index(drop=True)
    return df


def write_csv(df: pd.DataFrame, path: str | Path) -> None:
    """Atomic CSV write; ``%.6g`` floats so the bytes depend only on the values."""
    atomic_write_text(Path(path), df.to_csv(index=False, float_format="%.6g", lineterminator="\n"))


def read_chosen(results: str | Path) -> dict | None:
    p = Path(results) / "tune" / "chosen.json"
    return json.loads(p.read_text()) if p.exists() else None
