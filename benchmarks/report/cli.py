"""``nalora-bench report``: rebuild the leaderboard CSV, tables, plots, findings and index.html from run JSONs alone."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", required=True, help="results folder holding runs/, e.g. results/default")
    parser.add_argument("--no-plots", action="store_true", help="CSV, tables and findings only (no PNGs, no index.html)")
    parser.add_argument("--readme", default=None, metavar="FILE",
                        help="also replace the text between <!-- results:start --> and <!-- results:end --> in FILE")


def build_report(results: str | Path, plots: bool = True, readme: str | Path | None = None) -> dict[str, list[Path]]:
    """Write ``leaderboard.csv``, ``tables/*.md``, ``findings.md``, ``plots/*.png`` and ``index.html`` under ``results``.

    Deterministic: the same run JSONs give byte-identical CSV, tables, findings and README section.
    """
    from benchmarks.report import analysis, findings, leaderboard, tables

    results = Path(results)
    if not (results / "runs").is_dir():
        raise FileNotFoundError(f"no run results in {results}/runs (run a suite first: nalora-bench run --out {results})")
    readme_text = None
    if readme is not None:  # bad input fails before any work
        readme_text = findings.check_readme(Path(readme))
    records = leaderboard.drop_superseded(leaderboard.load_records(results))
    lb = leaderboard.build(records)
    leaderboard.write_csv(lb, results / "leaderboard.csv")
    an = analysis.analyse(records)
    chosen = leaderboard.read_chosen(results)
    files = tables.all_tables(an, lb, chosen)
    out = {"csv": [results / "leaderboard.csv"], "tables": tables.write_tables(files, results / "tables")}
    out["findings"] = [findings.write_findings(an, records, results)]
    if plots:
        from benchmarks.report import html
        from benchmarks.report import plots as plotting

        out["plots"] = plotting.write_plots(lb, records, results / "plots", an)
        out["html"] = [html.write_index(results, lb, records, files, out["plots"])]
    if readme is not None:
        out["readme"] = [findings.update_readme(Path(readme), readme_text, an, records, files, results)]
    return out


def main(args: argparse.Namespace) -> int:
    out = build_report(args.results, plots=not args.no_plots, readme=args.readme)
    n = sum(len(v) for v in out.values())
    print(f"report: {n} files under {args.results} (leaderboard.csv, {len(out['tables'])} tables, findings.md, "
          f"{len(out.get('plots', []))} plots{', index.html' if out.get('html') else ''})"
          + (f"; results section of {args.readme} regenerated" if args.readme else ""))
    return 0
