"""The leaderboard: one row per run JSON, with the validation-selected setting marked."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from benchmarks.runner.grid import select_settings, setting_key
from benchmarks.runner.record import LEADERBOARD_COLUMNS, leaderboard_row
from benchmarks.runner.store import ResultStore, atomic_write_text

INT_COLUMNS = ["seed", "rank", "steps", "batch_size", "grad_accum", "trainable_params", "total_params"]
SORT_KEYS = ["model", "task", "method", "lr", "options", "seed", "run_id"]


def load_records(results: str | Path, phase: str = "main") -> list[dict]:
    """Every run JSON of ``phase`` under ``results`` (``main``: ``runs/``; tuning runs are never reported)."""
    return ResultStore(results, phase).records()


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
