"""``nalora-bench run``: run a suite (tuning on dev tasks first, then the reported grid), resumably."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Callable

EXIT_MORE_TO_DO = 3  # the time budget stopped the grid; run the same command again to continue


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", default="smoke", help="suite name (benchmarks/suites/NAME.yaml) or path to a YAML file")
    parser.add_argument("--out", "--results", dest="out", default=None,
                        help="results folder (default: results/<suite name>)")
    parser.add_argument("--methods", default=None, help="comma-separated subset of the suite's methods")
    parser.add_argument("--tasks", default=None, help="comma-separated subset of the suite's reported tasks")
    parser.add_argument("--seeds", default=None, help="comma-separated subset of the suite's seeds")
    parser.add_argument("--include-path", action="append", default=[], metavar="DIR",
                        help="also load tasks from DIR (*.py / *.yaml task files); may be repeated")
    parser.add_argument("--workers", type=int, default=0,
                        help="worker processes per GPU sharing it (0: run in this process; needed under accelerate launch)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop cleanly before this many minutes; the next invocation resumes")
    parser.add_argument("--retry-failed", action="store_true", help="run again the runs recorded as failed")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and whether each is done; train nothing")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _split(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def run_suite(suite_name: str, out: str | Path, *, methods: list[str] | None = None, tasks: list[str] | None = None,
              seeds: list[int] | None = None, include_paths: list[str] | None = None, workers: int = 0, max_minutes: float | None = None, retry_failed: bool = False, dry_run: bool = False,
              progress: bool = True, resolver: Callable[[str], Any] | None = None, injector: Callable | None = None,
              log: Callable[[str], None] = print) -> int:
    """Tune (if the suite has ``tune``), then run the reported grid. Returns 0 when everything is done,
    ``EXIT_MORE_TO_DO`` when the time budget left runs for the next invocation.

    ``resolver(task_name) -> Task`` and ``injector`` (``nalora.inject``'s signature) are injectable for tests.
    """
    import time

    from benchmarks.runner import grid
    from benchmarks.runner.execute import make_resolver
    from benchmarks.runner.pool import run_grid
    from benchmarks.runner.store import ResultStore, atomic_write_json
    from benchmarks.runner.suite import load_suite

    suite = load_suite(suite_name, methods=methods, tasks=tasks, seeds=seeds, task_paths=include_paths)
    resolver = resolver or make_resolver(suite.task_paths)
    families: dict[str, tuple[str, str]] = {}

    def family_of(name: str) -> tuple[str, str]:
        if name not in families:
            t = resolver(name)
            families[name] = (t.family, t.default_model)
        return families[name]

    out = Path(out)
    t_start = time.time()
    left = lambda: None if max_minutes is None else max(0.0, max_minutes - (time.time() - t_start) / 60)  # noqa: E731

    def run_phase(phase_specs: list, phase: str) -> bool:
        """Run one phase's grid within the time left; log it; True when every run is done."""
        summary = run_grid(phase_specs, str(out), phase=phase, resolver=resolver, injector=injector, workers=workers,
                           max_minutes=left(), retry_failed=retry_failed, progress=progress)
        log(f"{phase}: {summary.line()}")
        for f in summary.failures:
            log(f"  failed: {f}")
        return summary.complete

    chosen = None
    if suite.tune:
        tune_specs = grid.expand_tune(suite, family_of)
        log(f"tuning {', '.join(suite.tune['methods'])} options on dev task(s) {', '.join(t.name for t in suite.dev_tasks)}: "
            f"{len(tune_specs)} runs in {out / 'tune'}")
        if dry_run:
            _list(tune_specs, ResultStore(out, "tune"), log)
        elif not run_phase(tune_specs, "tune"):
            return EXIT_MORE_TO_DO
        ids = {s.run_id for s in tune_specs}
        recs = [r for r in ResultStore(out, "tune").records() if r["run_id"] in ids]
        if len(recs) == len(ids):
            tuned = grid.choose_tuned(recs, {m: sorted(suite.tune["options"]) for m in suite.tune["methods"]})
            tuned["dev_tasks"] = [t.name for t in suite.dev_tasks]
            tuned["suite"] = suite.name
            atomic_write_json(out / "tune" / "chosen.json", tuned)
            chosen = tuned["chosen"]
            log(f"tuned options (used by {', '.join(suite.tune['apply_to'])}): {chosen}")
        elif dry_run:
            log("tuning is not complete: the reported runs below use the untuned options until it is")

    specs = grid.expand(suite, family_of, chosen)
    log(f"suite {suite.name}: {len(specs)} runs ({len(suite.tasks)} tasks x {len(suite.methods)} methods x lr grid x "
        f"{len(suite.seeds)} seeds) in {out / 'runs'}")
    if dry_run:
        _list(specs, ResultStore(out, "main"), log)
        return 0
    if not run_phase(specs, "main"):
        return EXIT_MORE_TO_DO
    if not os.environ.get("NALORA_BENCH_REPORT_FOLLOWS"):  # run_all.sh rebuilds it itself right after
        log(f"done; rebuild the leaderboard with: nalora-bench report --results {out}")
    else:
        log("done")
    return 0


def _list(specs: list, store: Any, log: Callable[[str], None]) -> None:
    for s in specs:
        rec = store.load(s.run_id)
        log(f"  {s.run_id}  {(rec or {}).get('status', 'todo'):7s} {s.label()}")


def main(args: argparse.Namespace) -> int:
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    if args.max_minutes is not None and args.max_minutes <= 0:
        raise ValueError(f"--max-minutes must be > 0, got {args.max_minutes}")
    try:
        seeds = [int(x) for x in _split(args.seeds)] if args.seeds else None
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    out = args.out or str(Path("results") / Path(args.suite).stem)
    return run_suite(args.suite, out, methods=_split(args.methods), tasks=_split(args.tasks), seeds=seeds,
                     include_paths=args.include_path, workers=args.workers,
                     max_minutes=args.max_minutes, retry_failed=args.retry_failed, dry_run=args.dry_run,
                     progress=not args.no_progress)
