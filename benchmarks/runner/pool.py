"""Run a list of ``RunSpec`` resumably: skip finished runs, share GPUs between small runs, stop on time.

``workers=0`` runs in this process (CPU, tests, ``accelerate launch``). ``workers=N`` starts, per GPU,
a pool of N spawned processes pinned to that GPU with ``CUDA_VISIBLE_DEVICES`` (one pool per GPU).
This module imports no torch at top level, so spawned workers set the variable before CUDA starts.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, Callable

from benchmarks.runner.grid import RunSpec
from benchmarks.runner.store import ResultStore


@dataclass
class GridSummary:
    """What one invocation did."""

    total: int = 0
    skipped: int = 0  # finished before this invocation
    ok: int = 0
    failed: int = 0
    interrupted: int = 0  # stopped by the time budget; redone next time
    remaining: int = 0  # not started because the time budget ran out
    failures: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.remaining == 0 and self.interrupted == 0

    def line(self) -> str:
        s = f"{self.total} runs: {self.skipped} already done, {self.ok} ok, {self.failed} failed"
        if not self.complete:
            s += f", {self.interrupted + self.remaining} left for the next invocation (time budget)"
        return s


def _init_worker(gpu: str | None, threads: int) -> None:
    """Pin a spawned worker to its GPU and to its share of the CPU cores, before it imports torch.

    Without the thread cap every worker starts one intra-op thread per core, and N workers
    oversubscribe the CPU that launches their GPU kernels.
    """
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(threads))


def _threads_per_worker(workers: int, pools: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, workers * pools))


def _gpu_ids() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip()]
    import torch  # parent only: workers are pinned before they import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def _finished_durations(store: ResultStore) -> list[float]:
    return [float(r["perf"]["wall_s"]) for r in store.records()
            if r.get("status") == "ok" and (r.get("perf") or {}).get("wall_s")]


def _dedup(specs: list[RunSpec]) -> list[RunSpec]:
    seen, out = set(), []
    for s in specs:
        if s.run_id not in seen:
            seen.add(s.run_id)
            out.append(s)
    return out


def run_grid(specs: list[RunSpec], root: str, *, phase: str = "main", resolver: Callable[[str], Any],
             injector: Callable | None = None, workers: int = 0, max_minutes: float | None = None,
             retry_failed: bool = False, progress: bool = True) -> GridSummary:
    """Run every spec without a result JSON under ``root``; returns what happened.

    With ``max_minutes``, no run starts once the budget minus a typical run time is used, and a run
    still going at the budget's end is abandoned unrecorded; the next invocation picks up there.
    """
    from tqdm.auto import tqdm

    from benchmarks.runner.execute import execute

    store = ResultStore(root, phase)
    store.clean_temp()
    specs = _dedup(specs)
    todo = [s for s in specs if not store.is_done(s.run_id, retry_failed)]
    summary = GridSummary(total=len(specs), skipped=len(specs) - len(todo))
    start = time.time()
    deadline = start + 60 * max_minutes if max_minutes else None
    # Seed the typical run time from finished runs (this phase's, else the other phase's), so that an
    # invocation whose budget is nearly spent starts no run it cannot finish.
    durations = _finished_durations(store) or _finished_durations(ResultStore(root, "tune" if phase == "main" else "main"))

    def may_start() -> bool:
        if deadline is None:
            return True
        typical = statistics.median(durations) if durations else 0.0
        return time.time() + typical < deadline

    def account(res: dict, spec: RunSpec) -> None:
        st = res["status"]
        if st == "ok":
            summary.ok += 1
        elif st == "failed":
            summary.failed += 1
            summary.failures.append(f"{spec.label()}: {res['message']}")
        else:
            summary.interrupted += 1
        if st != "interrupted":
            durations.append(res["seconds"])
        bar.update(1)
        bar.set_postfix(ok=summary.ok, failed=summary.failed)

    bar = tqdm(total=len(specs), initial=summary.skipped, desc=f"grid ({phase})", disable=not progress, position=0)
    try:
        if workers <= 0:
            for i, spec in enumerate(todo):
                if not may_start():
                    summary.remaining = len(todo) - i
                    break
                account(execute(spec, str(root), phase, resolver, injector, deadline, progress, 1), spec)
        else:
            _run_pools(todo, str(root), phase, resolver, injector, workers, deadline, progress, may_start, account, summary)
    finally:
        bar.close()
    return summary


def _run_pools(todo, root, phase, resolver, injector, workers, deadline, progress, may_start, account, summary) -> None:
    import multiprocessing as mp

    from benchmarks.runner.execute import execute

    gpus = _gpu_ids() or [None]  # CPU-only machine: one pool
    ctx = mp.get_context("spawn")  # fork after CUDA init is unsafe
    threads = _threads_per_worker(workers, len(gpus))
    pools = {g: ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(g, threads))
             for g in gpus}
    free_slots = {g: list(range(workers)) for g in gpus}
    running: dict[Future, tuple[RunSpec, Any, int, ProcessPoolExecutor]] = {}
    queue = list(todo)
    deaths: dict[str, int] = {}
    try:
        while queue or running:
            for g in gpus:
                while queue and free_slots[g] and may_start():
                    spec = queue.pop(0)
                    slot = free_slots[g].pop(0)
                    position = 1 + gpus.index(g) * workers + slot
                    fut = pools[g].submit(execute, spec, root, phase, resolver, injector, deadline, progress, position)
                    running[fut] = (spec, g, slot, pools[g])
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                spec, g, slot, pool = running.pop(fut)
                free_slots[g].append(slot)
                free_slots[g].sort()
                try:
                    account(fut.result(), spec)
                except BrokenProcessPool:
                    # A worker died (killed for memory, segfault) and took its pool's runs with it; we cannot
                    # tell which run did it, so each is retried once and recorded failed on a second death.
                    deaths[spec.run_id] = deaths.get(spec.run_id, 0) + 1
                    if deaths[spec.run_id] >= 2:
                        _record_dead_worker(spec, root, phase)
                        account({"status": "failed", "message": "worker process died twice", "seconds": 0.0}, spec)
                    else:
                        queue.insert(0, spec)
                    if pools[g] is pool:  # the first of its runs to report: replace the broken pool once
                        pools[g].shutdown(wait=False, cancel_futures=True)
                        pools[g] = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                                       initargs=(g, threads))
        summary.remaining = len(queue)
    finally:
        for p in pools.values():
            p.shutdown(wait=True, cancel_futures=True)


def _record_dead_worker(spec: RunSpec, root: str, phase: str) -> None:
    from benchmarks.runner.record import make_record

    err = {"type": "exception", "message": "worker process died (killed for memory or crashed)", "traceback": ""}
    ResultStore(root, phase).write(make_record(spec.config, spec.meta, spec.run_id, status="failed", error=err))
    print(f"worker died running {spec.label()}", file=sys.stderr)
