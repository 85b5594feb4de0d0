"""Whole-run throughput of result folders side by side: runs per GPU-hour, and where a run's time goes.

Each folder is a ``nalora-bench run --out DIR`` result folder plus the ``wall.json`` that the measuring
command wrote beside it (``{"wall_s": seconds of the invocation, "gpus": n, "device": name}``).
``python3 -m benchmarks.perf.throughput eager=DIR1 improved=DIR2 --out results/perf/throughput.json``
writes the JSON and a markdown table (``.md``) and prints the table. The first folder is the baseline.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any


def summarise(root: str | Path) -> dict[str, Any]:
    """Counts, per-run time split and runs per GPU-hour of one result folder (main phase)."""
    from benchmarks.runner.store import ResultStore

    root = Path(root)
    wall_file = root / "wall.json"
    if not wall_file.is_file():
        raise ValueError(f"{wall_file}: missing (the measuring command writes the invocation's wall time there)")
    wall = json.loads(wall_file.read_text())
    recs = ResultStore(root, "main").records()
    if not recs:
        raise ValueError(f"{root}: no run records")
    by_status: dict[str, int] = {}
    for r in recs:
        by_status[r.get("status", "?")] = by_status.get(r.get("status", "?"), 0) + 1
    perf = run_shares([r["perf"] for r in recs if r.get("status") == "ok" and r.get("perf")])
    stacks = {work_item(p, i) for i, p in enumerate(perf) if p.get("stacked")}

    def med(key: str, among: list[dict] = perf) -> float | None:
        xs = [p[key] for p in among if p.get(key) is not None]
        return statistics.median(xs) if xs else None

    no_compile = compiled_nothing(perf)
    first = workers_first_runs(perf)

    done = sum(v for k, v in by_status.items() if k != "failed")
    gpu_h = float(wall["wall_s"]) * int(wall.get("gpus", 1)) / 3600
    steady = after_first_wave([r for r in recs if r.get("status") != "failed"], wall.get("workers"),
                              int(wall.get("gpus", 1)))
    steps = {json.dumps((r.get("perf") or {}).get("step"), sort_keys=True) for r in recs}
    step_of = [(p.get("step") or {}) for p in perf]
    return {
        "root": str(root), "device": wall.get("device"), "gpus": int(wall.get("gpus", 1)), "wall_s": float(wall["wall_s"]),
        "workers": wall.get("workers"), "runs": len(recs), "by_status": by_status,
        # how the workers shared a GPU (runner/mps.py): "on", "off", "-" for records from before the field
        "mps": ", ".join(sorted({str((p.get("worker") or {}).get("mps", "-")) for p in perf})) or "-",
        "runs_per_gpu_hour": done / gpu_h if gpu_h > 0 else None,
        "runs_per_hour": done / (float(wall["wall_s"]) / 3600) if float(wall["wall_s"]) > 0 else None,
        "runs_per_hour_after_first_wave": steady,
        # run --stack K: the stacks the runs trained in; a stacked run's times below are its share of its stack's
        "stacks": len(stacks), "stacked_runs": sum(1 for p in perf if p.get("stacked")),
        # a worker's compiled graphs serve its next runs (compiled.py: _keep_graphs) or every run compiles again
        "compiled_runs": sum(bool(s.get("compiled")) for s in step_of),
        "graphs_kept_runs": sum(bool(s.get("graphs_kept")) for s in step_of),
        "median_wall_s": med("wall_s"), "median_train_s": med("train_s"), "median_eval_s": med("eval_s"),
        "median_step_time_s": med("step_time_s"),
        # a run's (a stack's) start: building it (model load, injection, step set-up) and its first step (compiles)
        "median_setup_s": med("setup_s"), "median_first_step_s": med("first_step_s"),
        "runs_no_compile": len(no_compile), "median_wall_s_no_compile": med("wall_s", no_compile),
        "median_train_s_no_compile": med("train_s", no_compile),
        # what a worker's start costs (model load, a cold or carried compile cache): records naming their worker
        "worker_first_runs": len(first), "median_train_s_first_run": med("train_s", first),
        "eval_share": (sum(p["eval_s"] for p in perf) / sum(p["wall_s"] for p in perf)) if perf else None,
        "step_setups": [json.loads(s) for s in sorted(steps)],
    }


def work_item(perf: dict, run: Any = None) -> tuple:
    """What one worker trained in one go: the run ``run`` (any key of it), or a stack (``run --stack``) whose runs
    share their worker and its count of earlier runs."""
    w, st = perf.get("worker") or {}, perf.get("stacked")
    if st and w.get("pid") is not None:
        return ("stack", w["pid"], w.get("earlier_runs"))
    return ("run", run)


def run_shares(perf: list[dict]) -> list[dict]:
    """``perf`` with a stacked run's ``wall_s`` and ``train_s`` replaced by its share of its stack's (the stack's
    wall time is its last record's, the training is shared by its ``stacked.runs``); the record's own are kept as
    ``stack_wall_s`` and ``stack_train_s``. Unstacked runs as they are."""
    walls: dict[tuple, float] = {}
    for i, p in enumerate(perf):
        if p.get("stacked") and p.get("wall_s") is not None:
            key = work_item(p, i)
            walls[key] = max(walls.get(key, 0.0), float(p["wall_s"]))
    out = []
    for i, p in enumerate(perf):
        st = p.get("stacked")
        if not st:
            out.append(p)
            continue
        k = int(st.get("runs") or 1)
        q = {**p, "stack_wall_s": p.get("wall_s"), "stack_train_s": p.get("train_s")}
        if (key := work_item(p, i)) in walls:
            q["wall_s"] = walls[key] / k
        if p.get("train_s") is not None:
            q["train_s"] = float(p["train_s"]) / k
        out.append(q)
    return out


def compiled_nothing(perf: list[dict]) -> list[dict]:
    """The runs' ``perf`` of those that compiled no graph: eager runs, and compiled runs that a worker's kept graphs
    served whole (``step.graphs_built`` 0; records from before that field count as compiling). A worker's steady
    state: its first runs pay the compiles."""
    def nothing(p: dict) -> bool:
        step = p.get("step") or {}
        return not step.get("compiled") or step.get("graphs_built") == 0

    return [p for p in perf if nothing(p)]


def workers_first_runs(perf: list[dict]) -> list[dict]:
    """The runs' ``perf`` of those that were their worker process's first (``worker.earlier_runs`` 0): what a
    worker's start costs, a cold or a carried compile cache. Records from before ``worker`` are not counted."""
    return [p for p in perf if (p.get("worker") or {}).get("earlier_runs") == 0]


def after_first_wave(recs: list[dict], workers: int | None, gpus: int = 1) -> float | None:
    """Runs per hour once every worker has finished its first work item (a run, or a stack of runs: ``work_item``):
    the runs of the items that finished after the first ``workers x gpus`` over the time from the last of those to
    the last finish (``provenance.finished_at``, seconds; an item finishes with its last run). What a longer call
    would sustain, without the start (model loads, a cold compile cache); the whole-invocation rate stays the figure
    of record. None without ``workers`` or with too few items."""
    from datetime import datetime

    first = (workers or 0) * max(1, gpus)
    items: dict[tuple, list[float]] = {}
    for i, r in enumerate(recs):
        at = (r.get("provenance") or {}).get("finished_at")
        if at:
            items.setdefault(work_item(r.get("perf") or {}, i), []).append(datetime.fromisoformat(at).timestamp())
    ends = sorted((max(ts), len(ts)) for ts in items.values())
    if first <= 0 or len(ends) <= first or ends[-1][0] <= ends[first - 1][0]:
        return None
    return sum(n for _, n in ends[first:]) / ((ends[-1][0] - ends[first - 1][0]) / 3600)


def to_markdown(rows: dict[str, dict[str, Any]]) -> str:
    """One row per folder; speed-ups against the first."""
    names = list(rows)
    base = rows[names[0]]["runs_per_hour"]
    lines = ["| setup | device | GPUs | MPS | runs | wall (s) | runs / hour | runs / GPU-hour | vs " + names[0] +
             " (per hour) | runs / hour after the first wave | stacks (runs) | compiled runs (graphs kept) | median run (s; "
             "a stacked run: its share) "
             "| median train (s) | median eval (s) | eval share | runs that compiled nothing: n, median run, median "
             "train (s) | workers' first runs: n, median train (s) | median setup, first step (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda x, d=1: "-" if x is None else f"{x:.{d}f}"  # noqa: E731
    for n, r in rows.items():
        ratio = r["runs_per_hour"] / base if base and r["runs_per_hour"] else None
        lines.append(f"| {n} | {r['device']} | {r['gpus']} | {r.get('mps', '-')} | {r['runs']} | {f(r['wall_s'])} | {f(r['runs_per_hour'])} "
                     f"| {f(r['runs_per_gpu_hour'])} "
                     f"| {f(ratio, 2)} | {f(r.get('runs_per_hour_after_first_wave'))} "
                     f"| {r.get('stacks') or '-'} ({r.get('stacked_runs') or '-'}) "
                     f"| {r.get('compiled_runs', 0)} ({r.get('graphs_kept_runs', 0)}) | {f(r['median_wall_s'])} "
                     f"| {f(r['median_train_s'])} | {f(r['median_eval_s'])} "
                     f"| {f(r['eval_share'], 2)} | {r.get('runs_no_compile', '-')}, {f(r.get('median_wall_s_no_compile'))}, "
                     f"{f(r.get('median_train_s_no_compile'))} "
                     f"| {r.get('worker_first_runs', '-')}, {f(r.get('median_train_s_first_run'))} "
                     f"| {f(r.get('median_setup_s'))}, {f(r.get('median_first_step_s'))} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", help="NAME=DIR (the first is the baseline)")
    p.add_argument("--out", default=None, help="JSON file to write (and .md beside it)")
    args = p.parse_args(argv)
    rows = {}
    for item in args.folders:
        name, sep, root = item.partition("=")
        if not sep or not name or not root:
            raise SystemExit(f"expected NAME=DIR, got {item!r}")
        rows[name] = summarise(root)
    text = to_markdown(rows)
    print(text)
    if args.out:
        from benchmarks.runner.store import atomic_write_json

        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out, rows)
        out.with_suffix(".md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
