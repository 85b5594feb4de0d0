"""Run a list of ``RunSpec`` resumably: skip finished runs, share GPUs between small runs, stop on time.

``workers=0`` runs in this process (CPU, tests, ``accelerate launch``). ``workers=N`` starts, per GPU,
a pool of N spawned processes pinned to that GPU with ``CUDA_VISIBLE_DEVICES`` (one pool per GPU).
This module imports no torch at top level, so spawned workers set the variable before CUDA starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, Callable

from benchmarks.runner.budget import MemoryBudget, TimeBudget, gpu_memory_mib
from benchmarks.runner.grid import RunSpec, StackSpec, group_stacks
from benchmarks.runner.store import ResultStore, is_environment_failure, results_lock

OOM_RETRIES = 2  # retries of a run out of GPU memory on a shared GPU, each with one run fewer there


@dataclass
class GridSummary:
    """What one invocation did."""

    total: int = 0
    skipped: int = 0  # finished before this invocation
    ok: int = 0
    collapsed: int = 0  # trained, finite, degenerate: a result, not selectable
    diverged: int = 0  # NaN/inf loss or gradients: a result of the method
    failed: int = 0
    interrupted: int = 0  # stopped by the time budget; redone next time
    remaining: int = 0  # not started: time budget ran out, or the results folder stopped taking records
    skipped_failed: int = 0  # of ``skipped``: runs recorded not ok earlier (method results; --retry-failed)
    retried_environment: int = 0  # environment failures of earlier invocations, run again now
    stop_reason: str = ""  # why runs were left for the next invocation
    failures: list[str] = field(default_factory=list)
    interruptions: list[str] = field(default_factory=list)  # where each interrupted run was (its next try's timing)

    @property
    def complete(self) -> bool:
        return self.remaining == 0 and self.interrupted == 0

    def add(self, res: dict, label: str) -> None:
        """Count one finished (or interrupted) run's summary from ``execute``; every backend uses this."""
        st = res["status"]
        if st in ("ok", "collapsed", "diverged"):
            setattr(self, st, getattr(self, st) + 1)
        elif st == "failed":
            self.failed += 1
            self.failures.append(f"{label}: {res['message']}")
        else:
            self.interrupted += 1
            self.interruptions.append(f"{label}: {res.get('message', '')}")

    def line(self) -> str:
        s = f"{self.total} runs: {self.skipped} already done, {self.ok} ok"
        for name in ("collapsed", "diverged"):
            if getattr(self, name):
                s += f", {getattr(self, name)} {name}"
        s += f", {self.failed} failed"
        if self.retried_environment:
            s += f" ({self.retried_environment} earlier environment failures retried)"
        if not self.complete:
            s += f", {self.interrupted + self.remaining} left for the next invocation ({self.stop_reason or 'time budget'})"
        if self.skipped_failed:
            s += (f"; {self.skipped_failed} of the already done runs are recorded not ok and were not repeated "
                  "(--retry-failed runs them again)")
        return s


def _init_worker(gpu: str | None, threads: int, parent_pid: int | None = None,
                 env: dict[str, str] | None = None) -> None:
    """Pin a spawned worker to its GPU and to its share of the CPU cores, before it imports torch; make it
    exit when the runner dies. ``env``: the invocation's MPS variables (``mps.Mps.env``).

    Without the thread cap every worker starts one intra-op thread per core, and N workers
    oversubscribe the CPU that launches their GPU kernels.
    """
    os.environ.update(env or {})
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    # Inductor compiles in a pool of one process per core by default: N workers compiling at once would start
    # N pools on the same cores.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TORCHINDUCTOR_COMPILE_THREADS"):
        os.environ.setdefault(var, str(threads))
    if parent_pid is not None:
        watch_parent(parent_pid)


def watch_parent(parent_pid: int, interval_s: float = 0.5) -> threading.Thread:
    """Exit this process when ``parent_pid`` is no longer its parent (the runner died, even by SIGKILL).

    A worker blocked on its task queue never notices the runner's death (the queue's write end is
    shared with its siblings), so without this it would live on, holding its memory, forever. A
    polling thread rather than prctl(PR_SET_PDEATHSIG): that signal fires when the *thread* that
    spawned the worker exits, which need not be the runner's death.
    """
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(interval_s)
        os._exit(70)  # no cleanup handlers: the runner is gone, nothing waits for this process

    t = threading.Thread(target=watch, name="nalora-parent-watch", daemon=True)
    t.start()
    return t


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask / cgroup cpuset), else ``os.cpu_count()``."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _threads_per_worker(workers: int, pools: int) -> int:
    return max(1, available_cpus() // max(1, workers * pools))


def cap_threads(threads: int | None = None) -> int:
    """Cap torch's intra-op CPU threads of this process at ``threads`` (default: ``available_cpus()``).

    torch starts one thread per core it sees, which may be more than the cores this process is allowed
    (containers, affinity); oversubscribed threads make step times erratic on a loaded machine.
    """
    import torch

    n = max(1, threads or available_cpus())
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def _gpu_ids() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip()]
    import torch  # parent only: workers are pinned before they import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def _dedup(specs: list[RunSpec]) -> list[RunSpec]:
    """The specs without repeats, runs of one model and method next to each other (otherwise in the given order):
    a worker's next run then mostly keeps the compiled graphs of its last (``compiled._keep_graphs``); a cell's
    runs stay together."""
    seen, out = set(), []
    for s in specs:
        if s.run_id not in seen:
            seen.add(s.run_id)
            out.append(s)
    first: dict[tuple, int] = {}
    for i, s in enumerate(out):
        first.setdefault(_signature_key(s), i)
    return sorted(out, key=lambda s: first[_signature_key(s)])  # stable: the given order within a group


def _signature_key(spec: RunSpec) -> tuple:
    c = spec.config

    def canonical(v: Any) -> str:
        return json.dumps(v or {}, sort_keys=True, default=str)

    return (str(c.get("model")), str(c.get("base_method", c.get("method"))), str(c.get("method")),
            canonical(c.get("options")), canonical(c.get("adapter")))


def run_grid(specs: list[RunSpec], root: str, *, phase: str = "main", resolver: Callable[[str], Any],
             injector: Callable | None = None, workers: int = 0, max_minutes: float | None = None,
             retry_failed: bool = False, progress: bool = True, threads: int | None = None,
             pools: WorkerPools | None = None, stack: int = 1) -> GridSummary:
    """Run every spec without a result JSON under ``root``; returns what happened.

    ``stack`` K > 1: runs that differ only in seed and lr go to a worker K at a time, trained together
    (``execute.execute_stack``; each still gets its own record).

    ``threads``: torch CPU threads of the in-process runner (``workers`` 0; default ``available_cpus()``).
    ``pools``: the invocation's worker processes, kept across its grids (else this grid starts and stops its own).

    With ``max_minutes``, a run starts only if its expected time (``TimeBudget``) fits in what is left of the
    budget, and a run still going at the budget's end is abandoned unrecorded; the next invocation picks up there.
    """
    from tqdm.auto import tqdm

    from benchmarks.runner.execute import RunContext, execute, execute_stack

    store = ResultStore(root, phase)
    store.check_writable()  # before any training: a run whose record cannot be written is wasted
    with results_lock(root):
        store.adopt_orphans()
        store.clean_temp()
        specs = _dedup(specs)
        done = {s.run_id: store.is_done(s.run_id, retry_failed) for s in specs}
        # runs that train at once: stacks are made smaller rather than leave workers idle
        slots = workers * len(pools.gpus if pools is not None else _gpu_ids() or [None]) if workers > 0 else 1
        todo = group_stacks([s for s in specs if not done[s.run_id]], stack, slots)
        summary = GridSummary(total=len(specs), skipped=sum(done.values()))
        for s in specs:
            rec = store.load(s.run_id)
            if rec is None:
                continue
            if done[s.run_id] and rec.get("status") == "failed":
                summary.skipped_failed += 1
            elif is_environment_failure(rec):
                summary.retried_environment += 1
        budget = TimeBudget(str(root), phase, max_minutes, workers)
        refused: list[str] = []  # records the results folder refused (kept as orphans): start no more runs

        def next_run(queue: list[RunSpec]) -> RunSpec | None:
            """Take the next run to start off ``queue`` (None: stop starting runs)."""
            if refused:
                summary.stop_reason = f"results folder refused a record; finished ones kept at {refused[0]}"
                return None
            i = budget.next_index(queue)
            if i is None:
                if queue:
                    summary.stop_reason = budget.why_not(queue)
                return None
            return queue.pop(i)

        def account(res: dict | list[dict], spec: RunSpec | StackSpec) -> None:
            if isinstance(spec, StackSpec):  # one summary per run of the stack
                for r, s in zip(res, spec.specs):
                    account(r, s)
                return
            summary.add(res, spec.label())
            budget.account(spec, res)
            if res.get("orphaned"):
                refused.append(res["orphaned"])
            bar.update(1)
            bar.set_postfix(ok=summary.ok, failed=summary.failed)

        ctx = RunContext(str(root), phase, resolver, injector, budget.deadline, progress)  # one context for every run
        bar = tqdm(total=len(specs), initial=summary.skipped, desc=f"grid ({phase})", disable=not progress, position=0)
        try:
            if workers <= 0:
                if todo:
                    cap_threads(threads)
                queue = list(todo)
                while (spec := next_run(queue)) is not None:
                    account((execute_stack if isinstance(spec, StackSpec) else execute)(spec, ctx, 1), spec)
                summary.remaining = _runs(queue)
            else:
                if pools is not None and pools.workers != workers:
                    raise ValueError(f"run_grid: workers={workers} but the pools given have {pools.workers} per GPU")
                with contextlib.nullcontext(pools) if pools is not None else WorkerPools(workers) as used:
                    _run_pools(todo, ctx, used, next_run, account, summary, MemoryBudget(str(root), phase, budget.records))
        finally:
            bar.close()
        return summary


class WorkerPools:
    """The spawned worker processes of one invocation: ``workers`` per visible GPU (one pool per GPU), started on
    first use and kept until ``close`` across every grid run through them (phases, lr rounds).

    A worker's compiled graphs (``compiled._keep_graphs``) and imports then serve its runs of every round; with a
    pool per round every worker compiled again at each round's start (GPU visit of 2026-12-01:
    results/perf/h200/tp-improved-v2, every run of lr round 1 rebuilt its graphs).
    """

    def __init__(self, workers: int, mps: str | None = None) -> None:
        """``mps``: ``off``/``auto``/``on`` (default ``NALORA_MPS``, else off): the GPU's workers share it through
        CUDA MPS (``benchmarks/runner/mps.py``); ``self.mps.state`` says whether they do, or why not."""
        from benchmarks.runner.mps import start_mps

        if workers < 1:
            raise ValueError(f"worker pools need workers >= 1, got {workers}")
        self.workers = workers
        self.gpus: list[str | None] = _gpu_ids() or [None]  # CPU-only machine: one pool
        threads = _threads_per_worker(workers, len(self.gpus))
        self.mps = start_mps(mps, self.gpus, workers)
        if self.mps.state.startswith("off: ") and self.gpus != [None]:  # auto, and MPS could not serve
            print(f"pool: workers share each GPU by time-slicing, not MPS ({self.mps.state[5:]})", file=sys.stderr,
                  flush=True)
        self._initargs = {g: (g if g is None else self.mps.device(g), threads, os.getpid(), self.mps.env)
                          for g in self.gpus}
        self._pools: dict[str | None, ProcessPoolExecutor] = {}

    def get(self, gpu: str | None) -> ProcessPoolExecutor:
        """The pool pinned to ``gpu`` (started now if it is not running)."""
        if gpu not in self._pools:
            import multiprocessing as mp

            self._pools[gpu] = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"),  # fork after CUDA init is unsafe
                                                   initializer=_init_worker, initargs=self._initargs[gpu])
        return self._pools[gpu]

    def discard(self, gpu: str | None, pool: ProcessPoolExecutor) -> None:
        """Drop ``pool`` (broken: a worker died) if it is still ``gpu``'s; the next ``get`` starts a fresh one."""
        if self._pools.get(gpu) is pool:
            del self._pools[gpu]
            pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        for p in self._pools.values():
            p.shutdown(wait=True, cancel_futures=True)
        self._pools.clear()
        self.mps.stop()

    def __enter__(self) -> "WorkerPools":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _run_pools(todo: list[RunSpec], ctx: Any, pools: WorkerPools, next_run: Callable[[list[RunSpec]], RunSpec | None],
               account: Callable[[dict, RunSpec], None], summary: GridSummary,
               memory: MemoryBudget | None = None) -> None:
    """Each run through ``execute(spec, ctx)`` in one of ``pools``' workers; a dead worker's runs are retried once,
    then recorded failed.

    A run out of GPU memory while other runs shared its GPU is the pool's doing, not the method's: that GPU takes
    one run fewer at once from then on, and the run goes back to the front of the queue (``OOM_RETRIES`` times;
    its record says failed/oom until the retry's record replaces it). GPU visit of 2026-12-02: 20 workers on one
    H200 ran Gemma-3 out of its 140 GB, and 25 of 60 runs were recorded failed.

    ``memory``: a run starts on a GPU only beside runs it fits with (``MemoryBudget``: the stored runs' peaks);
    ``workers`` is then an upper bound per GPU."""
    # looked up at call time (tests stand in for execute), and submitted as such: a worker unpickles it by name
    from benchmarks.runner.execute import execute, execute_stack

    gpus, workers = pools.gpus, pools.workers
    free_slots = {g: list(range(workers)) for g in gpus}
    cap = {g: workers for g in gpus}  # runs at once per GPU, lowered by each shared-GPU OOM
    running: dict[Future, tuple[RunSpec, Any, int, ProcessPoolExecutor]] = {}
    queue = list(todo)
    deaths: dict[str, int] = {}
    ooms: dict[str, int] = {}

    totals = gpu_memory_mib([g for g in gpus if g is not None]) if memory is not None else {}

    def busy(g: Any) -> int:
        return sum(1 for v in running.values() if v[1] == g)

    def fits(spec: RunSpec, g: Any) -> bool:
        if memory is None:
            return True
        held = [memory.need(v[0]) for v in running.values() if v[1] == g]
        return memory.fits(memory.need(spec), held, totals.get(g))

    while queue or running:
        for g in gpus:
            while queue and free_slots[g] and busy(g) < cap[g] and (spec := next_run(queue)) is not None:
                if not fits(spec, g):
                    queue.insert(0, spec)  # it waits for a run on this GPU to finish (other GPUs may take it)
                    break
                slot = free_slots[g].pop(0)
                position = 1 + gpus.index(g) * workers + slot
                pool = pools.get(g)
                fut = pool.submit(execute_stack if isinstance(spec, StackSpec) else execute, spec, ctx, position)
                running[fut] = (spec, g, slot, pool)
        if not running:
            break
        done, _ = wait(running, return_when=FIRST_COMPLETED)
        sharing = {g: busy(g) for g in gpus}  # runs on each GPU while these ran (an OOM burst ends several at once)
        for fut in done:
            spec, g, slot, pool = running.pop(fut)
            free_slots[g].append(slot)
            free_slots[g].sort()
            try:
                res = fut.result()
                oom = all(r.get("error_type") == "oom" for r in (res if isinstance(res, list) else [res]))
                if oom and sharing[g] > 1 and ooms.get(spec.run_id, 0) < OOM_RETRIES:
                    ooms[spec.run_id] = ooms.get(spec.run_id, 0) + 1
                    cap[g] = max(1, min(cap[g], sharing[g]) - 1)
                    print(f"pool: {spec.label()} ran out of GPU memory beside {sharing[g] - 1} other run(s) on GPU "
                          f"{g}; retrying it, with at most {cap[g]} run(s) at once there", file=sys.stderr, flush=True)
                    queue.insert(0, spec)
                    continue
                account(res, spec)
                for r, s in zip(res if isinstance(res, list) else [res], spec.specs):
                    if memory is not None and r.get("status") == "ok":
                        memory.add(ResultStore(ctx.root, ctx.phase).load(s.run_id) or {})
            except BrokenProcessPool:
                # A worker died (killed for memory, segfault) and took its pool's runs with it; we cannot
                # tell which run did it, so each is retried once and recorded failed on a second death.
                deaths[spec.run_id] = deaths.get(spec.run_id, 0) + 1
                if deaths[spec.run_id] >= 2:
                    for s in spec.specs:
                        _record_dead_worker(s, ctx.root, ctx.phase)
                        account({"status": "failed", "message": "worker process died twice", "seconds": 0.0}, s)
                else:
                    queue.insert(0, spec)
                pools.discard(g, pool)  # the first of its runs to report replaces the broken pool, once
    summary.remaining = _runs(queue)


def _runs(queue: list[RunSpec | StackSpec]) -> int:
    """Runs in ``queue`` (a stack counts its runs)."""
    return sum(len(s.specs) for s in queue)


def _record_dead_worker(spec: RunSpec, root: str, phase: str) -> None:
    from benchmarks.runner.record import make_record

    err = {"type": "exception", "message": "worker process died (killed for memory or crashed)", "traceback": ""}
    ResultStore(root, phase).write(make_record(spec.config, spec.meta, spec.run_id, status="failed", error=err))
    print(f"worker died running {spec.label()}", file=sys.stderr)
