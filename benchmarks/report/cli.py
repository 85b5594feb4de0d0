"""``nalora-bench report``: rebuild the leaderboard CSV, markdown tables and plots from run JSONs alone."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", required=True, help="results folder holding runs/, e.g. results/default")
    parser.add_argument("--no-plots", action="store_true", help="CSV and tables only")


def build_report(results: str | Path, plots: bool = True) -> dict[str, list[Path]]:
    """Write ``leaderboard.csv``, ``tables/*.md`` and ``plots/*.png`` under ``results``.

    Deterministic: the same run JSONs give byte-identical CSV and tables.
    """
    from benchmarks.report import leaderboard, tables

    results = Path(results)
    if not (results / "runs").is_dir():
        raise FileNotFoundError(f"no run results in {results}/runs (run a suite first: nalora-bench run --out {results})")
    records = leaderboard.load_records(results)
    lb = leaderboard.build(records)
    leaderboard.write_csv(lb, results / "leaderboard.csv")
    out = {"csv": [results / "leaderboard.csv"],
           "tables": tables.write_tables(lb, results / "tables", leaderboard.read_chosen(results))}
    if plots:
        from benchmarks.report import plots as plotting

        out["plots"] = plotting.write_plots(lb, records, results / "plots")
    return out


def main(args: argparse.Namespace) -> int:
    out = build_report(args.results, plots=not args.no_plots)
    n = sum(len(v) for v in out.values())
    print(f"report: {n} files under {args.results} (leaderboard.csv, {len(out['tables'])} tables, "
          f"{len(out.get('plots', []))} plots)")
    return 0
