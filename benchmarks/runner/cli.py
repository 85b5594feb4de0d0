"""``nalora-bench run``: run a suite (tuning on dev tasks first, then the reported grid), resumably.

Exit codes: 0 done; 3 (``EXIT_MORE_TO_DO``) the time budget stopped it, run again to continue;
4 (``EXIT_RUNS_FAILED``) done, but runs raised exceptions (``collapsed``/``diverged`` runs are results).
"""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path
from typing import Any, Callable

from benchmarks.progress_env import quiet_progress

EXIT_MORE_TO_DO = 3  # the time budget stopped the grid; run the same command again to continue
EXIT_RUNS_FAILED = 4  # the grid is done but some runs raised exceptions (recorded "failed"); see docs/protocol.md


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", default="smoke", help="suite name (benchmarks/suites/NAME.yaml) or path to a YAML file")
    parser.add_argument("--out", "--results", dest="out", default=None,
                        help="results folder (default: results/<suite name>)")
    parser.add_argument("--methods", default=None, help="comma-separated subset of the suite's methods")
    parser.add_argument("--tasks", default=None,
                        help="comma-separated tasks: the suite's own or any registered task (plugins of --include-path "
                             "included; a task not in the suite gets the suite's training settings)")
    parser.add_argument("--models", default=None,
                        help="comma-separated models: the suite's own keep only those (each task on its family's); "
                             "others replace every task's models (asset names, test models such as tiny-llama, hub "
                             "ids; `nalora-bench list models`)")
    parser.add_argument("--seeds", default=None, help="comma-separated subset of the suite's seeds")
    parser.add_argument("--include-path", action="append", default=[], metavar="DIR",
                        help="also load tasks from DIR (*.py / *.yaml task files); may be repeated")
    parser.add_argument("--workers", type=int, default=0,
                        help="worker processes per GPU sharing it (0: run in this process; needed under accelerate launch)")
    parser.add_argument("--stack", type=int, default=1, metavar="K",
                        help="train up to K runs of a cell (same model, task, method and settings; other seeds and "
                             "lrs) together in one worker: one base forward, each run its own adapters and record "
                             "(default 1: one at a time); a cell's runs split into stacks of even sizes, smaller "
                             "while workers would idle (VLM runs too, each with its own connector). Runs that "
                             "cannot stack (DoRA, PiSSA, full, head; hub VLMs) run one at a time")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop cleanly before this many minutes; the next invocation resumes")
    parser.add_argument("--retry-failed", action="store_true", help="run again the runs recorded as failed")
    parser.add_argument("--dry-run", action="store_true",
                        help="list the runs of the current lr round and whether each is done; train nothing")
    parser.add_argument("--timings-from", action="append", default=[], metavar="DIR",
                        help="with --dry-run: also estimate the run time from the records in DIR (another results "
                             "folder, e.g. a slice timed on the GPU); may be repeated")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (training, evaluation, grid, and the weight-loading bars of transformers)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads of the in-process runner (--workers 0); default: the CPUs this "
                             "process may use. Worker processes get an equal share each")
    parser.add_argument("--backend", choices=("pool", "ray"), default="pool",
                        help="pool: worker processes on this machine (default); ray: Ray tasks with fractional GPUs "
                             "(pip install 'nalora-bench[cluster]'); both write the same result store and resume alike")
    parser.add_argument("--address", default=None,
                        help="with --backend ray: the cluster to join (e.g. ray://head:10001); default: a local Ray")
    parser.add_argument("--mps", choices=("auto", "on", "off"), default=None,
                        help="workers sharing a GPU run their kernels side by side through CUDA MPS (a private daemon "
                             "for this invocation). off (default, or $NALORA_MPS): time-slicing; auto: MPS when a GPU "
                             "has 2+ workers and nvidia-cuda-mps-control is there, else time-slicing with the reason; "
                             "on: refuse to start without it")


def _split(value: str | None) -> list[str] | None:
    """None when the flag is absent; an empty list for ``--tasks ""`` (an error, not "every task")."""
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def run_suite(suite_name: str, out: str | Path, *, methods: list[str] | None = None, tasks: list[str] | None = None,
              models: list[str] | None = None, threads: int | None = None, seeds: list[int] | None = None, include_paths: list[str] | None = None, workers: int = 0, max_minutes: float | None = None, retry_failed: bool = False, dry_run: bool = False,
              progress: bool = True, resolver: Callable[[str], Any] | None = None, injector: Callable | None = None,
              log: Callable[[str], None] = print, backend: str = "pool", address: str | None = None,
              timings_from: list[str] | None = None, mps: str | None = None, stack: int = 1) -> int:
    """Tune (if the suite has ``tune``), then run the reported grid in lr-extension rounds.

    Returns 0 when everything is done and no run failed, ``EXIT_MORE_TO_DO`` when the time budget left
    runs for the next invocation, ``EXIT_RUNS_FAILED`` when the grid is done but runs raised exceptions
    (``collapsed`` and ``diverged`` runs are results, not failures). ``resolver(task_name) -> Task`` and
    ``injector`` (``nalora.inject``'s signature) are injectable for tests. ``timings_from``: results folders whose
    records also inform a dry run's time estimate. ``mps``: how the pool's workers share a GPU (``WorkerPools``).
    ``stack``: runs trained together per worker (``run_grid``; 1: one at a time; the local backend only).
    """
    import time

    if stack < 1 or (stack > 1 and backend != "pool"):
        raise ValueError(f"stack must be >= 1, and > 1 only with the local backend (pool), got {stack} with {backend}")

    from benchmarks.runner import grid, ledger
    from benchmarks.runner.built_models import resolve_built
    from benchmarks.runner.execute import make_resolver, resolve_task
    from benchmarks.runner.pool import WorkerPools, _gpu_ids, run_grid
    from benchmarks.runner.record import is_failure
    from benchmarks.runner.store import ResultStore, atomic_write_json
    from benchmarks.runner.suite import load_suite

    # Task folders are loaded before validation so plugin tasks and the methods they register are known.
    if not progress:
        quiet_progress()
    suite = load_suite(suite_name, methods=methods, tasks=tasks, seeds=seeds, task_paths=include_paths,
                       resolver=resolver, check=False, models=models)
    resolver = resolver or make_resolver(suite.task_paths)
    from benchmarks.runner.suite import check_names

    check_names(suite, resolver)
    from benchmarks.assets.cache import AssetError
    from benchmarks.runner.assets_needed import check_cached

    try:
        check_cached(suite, resolver)
    except AssetError as err:
        if not dry_run:
            raise
        log(f"note: {err} (runs need them; until a task's dataset is cached, the ids listed for its runs are not final)")
    facts: dict[str, grid.TaskFacts] = {}
    task_options = {t.name: t.options for t in suite.tasks + suite.dev_tasks}  # names are unique across both

    def info_of(name: str) -> grid.TaskFacts:
        if name not in facts:
            t = resolve_task(resolver, {"task": name, "task_options": task_options.get(name)})
            facts[name] = grid.TaskFacts(t.family, t.default_model, grid.task_fingerprint(t))
        return facts[name]

    # Built assets (the distilled vit-s-swiglu): cached, built here once (a GPU), or a stand-in (no GPU). The clock
    # of --max-minutes starts before: a build counts against a slice's time like its runs.
    t_start = time.time()
    resolve_built(suite, info_of, build=not dry_run, log=log)

    out = Path(out)
    left = lambda: None if max_minutes is None else max(0.0, max_minutes - (time.time() - t_start) / 60)  # noqa: E731

    def run_phase(phase_specs: list, phase: str) -> bool:
        """Run one phase's grid within the time left (its GPU time in the ledger); log it; True when every run is done."""
        store = ResultStore(out, phase)
        store.check_writable()  # the one-line error of an unwritable folder comes before anything is written
        if all(store.is_done(s.run_id, retry_failed) for s in phase_specs):
            recorded = contextlib.nullcontext({"end": {}})  # nothing to run: no GPU time to account for
        else:
            gpus = [] if (backend == "ray" and address) else _gpu_ids()
            recorded = ledger.invocation(out, {"suite": suite.name, "phase": phase, "backend": backend,
                                               "workers": workers, "gpu_ids": gpus, "gpus": ledger.gpu_names(gpus),
                                               "max_minutes": left(), "stack": stack,
                                               "mps": keep_pools.mps.state if keep_pools is not None else "off"})
        with recorded as inv:
            if backend == "ray":
                from benchmarks.runner.ray_backend import run_grid_ray

                summary = run_grid_ray(phase_specs, str(out), phase=phase, resolver=resolver, injector=injector,
                                       workers=workers or 1, max_minutes=left(), retry_failed=retry_failed,
                                       progress=progress, address=address)
            else:
                summary = run_grid(phase_specs, str(out), phase=phase, resolver=resolver, injector=injector,
                                   workers=workers, max_minutes=left(), retry_failed=retry_failed, progress=progress,
                                   threads=threads, pools=keep_pools, stack=stack)
            inv["end"] = {k: getattr(summary, k) for k in ("total", "skipped", "ok", "collapsed", "diverged", "failed",
                                                           "interrupted", "remaining")}
        log(f"{phase}: {summary.line()}")
        for f in summary.failures:
            log(f"  failed: {f}")
        for f in summary.interruptions:
            log(f"  interrupted: {f}")
        return summary.complete

    # One set of worker processes for every phase and lr round: a worker's compiled graphs serve all its runs.
    keep_pools = WorkerPools(workers, mps) if workers > 0 and backend == "pool" and not dry_run else None
    ray = _ray_session(address, workers or 1) if backend == "ray" and not dry_run else None
    with keep_pools or ray or contextlib.nullcontext():
        chosen = None
        failed = 0
        if suite.tune:
            tune_specs = grid.expand_tune(suite, info_of)
            log(f"tuning {', '.join(suite.tune['methods'])} options on dev task(s) {', '.join(t.name for t in suite.dev_tasks)}: "
                f"{len(tune_specs)} runs in {out / 'tune'}")
            if dry_run:
                _list(tune_specs, ResultStore(out, "tune"), log, timings_from, workers)
            elif not run_phase(tune_specs, "tune"):
                return EXIT_MORE_TO_DO
            ids = {s.run_id for s in tune_specs}
            recs = [r for r in ResultStore(out, "tune").records() if r["run_id"] in ids]
            failed += sum(is_failure(r) for r in recs)
            if len(recs) == len(ids):
                tuned = grid.choose_tuned(recs, {m: sorted(o) for m, o in suite.tune["methods"].items()})
                tuned["dev_tasks"] = [t.name for t in suite.dev_tasks]
                tuned["suite"] = suite.name
                if not dry_run:
                    atomic_write_json(out / "tune" / "chosen.json", tuned)
                chosen = tuned["chosen"]
                log(f"tuned options (reported apart as {', '.join(m + '-tuned' for m in chosen)}): {chosen}")
            elif dry_run:
                log("tuning is not complete: the -tuned entries run once it is")

        store = ResultStore(out, "main")
        grids = grid.initial_grids(suite, info_of)
        bounds = {m.label: m.lr_bounds for m in suite.methods}
        lr_round = 0
        while True:
            specs = grid.expand(suite, info_of, chosen, grids)
            log(f"suite {suite.name}, lr round {lr_round}: {len(specs)} runs ({len(suite.tasks)} tasks x "
                f"{len(suite.methods)} methods x lr grid x seeds) in {out / 'runs'}")
            if dry_run:
                if not all(store.is_done(s.run_id) for s in specs):
                    _list(specs, store, log, timings_from, workers)  # the current round only: later rounds depend on its results
                    return 0
                complete = True
            else:
                complete = run_phase(specs, "main")
            recs = [r for r in (store.load(s.run_id) for s in specs) if r is not None]
            # The lr rule reads a cell's own runs only, so a cell whose runs are all stored extends now, whatever
            # other cells still miss: on 2026-12-04 gsm8k's runs, which did not fit the call, held movie-reviews'
            # next lr back for a whole call. Unfinished cells are judged once their runs are in.
            finished = grids if complete else grid.finished_cells(grids, specs, {r["run_id"] for r in recs})
            grown = grid.extend_grids(finished, recs, lambda cell: bounds[cell[2]])
            if not complete and (not grown or not left()):
                return EXIT_MORE_TO_DO
            if not grown:
                break
            lr_round += 1
            for (model, task, label), lrs in grown.items():
                new = sorted(set(lrs) - set(grids[(model, task, label)]))
                log(f"  lr round {lr_round}: {model}/{task}/{label} best lr at an edge; adding {', '.join(f'{x:g}' for x in new)}")
            grids.update(grown)
        if dry_run:
            _list(specs, store, log, timings_from, workers)
            return 0
        failed += sum(is_failure(r) for r in recs)
        if failed:
            log(f"done, but {failed} run(s) failed with an exception (exit {EXIT_RUNS_FAILED}); see the 'failed' lines, "
                "fix the cause and rerun with --retry-failed")
            return EXIT_RUNS_FAILED
        if not os.environ.get("NALORA_BENCH_REPORT_FOLLOWS"):  # run_all.sh rebuilds it itself right after
            log(f"done; rebuild the leaderboard with: nalora-bench report --results {out}")
        else:
            log("done")
        return 0


def _ray_session(address: str | None, workers: int) -> Any:
    from benchmarks.runner.ray_backend import ray_session  # ray is optional: imported only for --backend ray

    return ray_session(address, workers)


def _list(specs: list, store: Any, log: Callable[[str], None], timings_from: list[str] | None = None,
          workers: int = 1) -> None:
    todo = []
    for s in specs:
        rec = store.load(s.run_id)
        log(f"  {s.run_id}  {(rec or {}).get('status', 'todo'):7s} {s.label()}")
        todo += [s] if rec is None else []
    if todo:
        from benchmarks.runner.budget import TimeBudget

        budget = TimeBudget(str(store.root), store.phase, None, max(1, workers)).load(str(store.root), store.phase)
        for root in timings_from or []:
            budget.load(root, "main")
        log(budget.estimate(todo))


def main(args: argparse.Namespace) -> int:
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    if args.max_minutes is not None and args.max_minutes <= 0:
        raise ValueError(f"--max-minutes must be > 0, got {args.max_minutes}")
    try:
        seeds = [int(x) for x in _split(args.seeds)] if args.seeds is not None else None
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.address and args.backend != "ray":
        raise ValueError("--address needs --backend ray")
    if args.mps == "on" and (args.backend != "pool" or args.workers < 1):
        raise ValueError("--mps on needs the worker pool (--backend pool, --workers N)")
    if args.stack < 1:
        raise ValueError(f"--stack must be >= 1, got {args.stack}")
    if args.stack > 1 and args.backend != "pool":
        raise ValueError("--stack needs the local backend (--backend pool)")
    if args.timings_from and not args.dry_run:
        raise ValueError("--timings-from needs --dry-run (it only informs the time estimate)")
    for d in args.timings_from:
        if not (Path(d) / "runs").is_dir():
            raise ValueError(f"--timings-from {d}: no runs/ folder there (a results folder holds runs/*.json)")
    out = args.out or str(Path("results") / Path(args.suite).stem)
    return run_suite(args.suite, out, methods=_split(args.methods), tasks=_split(args.tasks),
                     models=_split(args.models), threads=args.threads, seeds=seeds,
                     include_paths=args.include_path, workers=args.workers,
                     max_minutes=args.max_minutes, retry_failed=args.retry_failed, dry_run=args.dry_run,
                     progress=not args.no_progress, backend=args.backend, address=args.address,
                     timings_from=args.timings_from, mps=args.mps, stack=args.stack)
