"""When a grid invocation may still start a run: ``TimeBudget``, shared by the local pool and the Ray backend, and
the run-time estimate of a dry run."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.runner.grid import RunSpec
from benchmarks.runner.ledger import append_line, now_iso, read_lines
from benchmarks.runner.store import ResultStore

INTERRUPTED = "interrupted.jsonl"  # one line per run the time budget stopped: how long it had run, at what sharing


def _kind(config: dict) -> tuple[str, str]:
    return str(config.get("model")), str(config.get("task"))


def stored_ok(root: str, phase: str) -> list[dict]:
    """The ``ok`` records of a results folder, this phase's and the other's (what the budgets learn from)."""
    return [r for ph in (phase, "tune" if phase == "main" else "main")
            for r in ResultStore(root, ph).records() if r.get("status") == "ok"]


SAFETY = 1.2  # a run's time varies with how many share its GPU (Fashion-MNIST runs on an H200: 239-327 s)


class TimeBudget:
    """Which queued run may still start before an invocation's deadline (``max_minutes``).

    A run is expected to take the median wall time of the finished runs of its own model and task (this
    invocation's when it has some: they ran at today's concurrency; else the results folder's; else its task's
    on the other models; else any run's), so a slow task's run is not started on the strength of a fast task's (a composed-VLM run took
    about 2.5 times a sarcasm run on an H200, and a median over both started runs the deadline then killed).
    A run starts when ``SAFETY`` times that fits before the deadline; runs that do not fit are passed over for
    later queued runs that do, in queue order.

    A run the deadline stopped took at least as long as it had run: ``account`` writes that time to
    ``interrupted.jsonl`` in the results folder with the runs sharing each GPU then (``workers``), and it counts
    among its own model and task's run times wherever at least as many share a GPU (a lower bound, so the median
    errs short; never among the times other tasks fall back on). Without this a task with no finished run (gsm8k on 2026-12-02) was expected to take the other
    tasks' median, started in every call, and stopped by every call's end: no run ever finished.
    """

    def __init__(self, root: str, phase: str, max_minutes: float | None, workers: int = 1) -> None:
        self.deadline = time.time() + 60 * max_minutes if max_minutes else None
        self.root, self.phase, self.workers = str(root), phase, max(1, workers)
        self.records: list[dict] | None = None  # the stored ok records, once loaded
        self.stored: dict[tuple[str, str], list[float]] = {}
        self.now: dict[tuple[str, str], list[float]] = {}
        self.stopped: dict[tuple[str, str], list[float]] = {}  # how long stopped runs had run (lower bounds)
        if self.deadline is not None:
            self.load(root, phase)

    def load(self, root: str, phase: str) -> TimeBudget:
        """Read the finished runs' wall times (this phase's and the other's) from the results folder; the records
        read stay in ``self.records`` (a ``MemoryBudget`` of the same grid takes them instead of reading again)."""
        self.records = stored_ok(root, phase)
        for r in self.records:
            perf = r.get("perf") or {}
            wall = perf.get("wall_s")
            if wall:  # a stacked run's wall time is its stack's: its share is the wall time over the stack's runs
                runs = int((perf.get("stacked") or {}).get("runs") or 1)
                self.stored.setdefault(_kind(r["config"]), []).append(float(wall) / runs)
        for line in read_lines(Path(root) / INTERRUPTED):
            if line.get("seconds") and int(line.get("workers") or 1) <= self.workers:  # as many share now: no faster
                self.stopped.setdefault((str(line.get("model")), str(line.get("task"))), []).append(float(line["seconds"]))
        return self

    def estimate(self, specs: list[RunSpec]) -> str:
        """One line: the runs per model and task and their expected run-seconds (from the stored wall times)."""
        groups: dict[tuple[str, str], list[RunSpec]] = {}
        for spec in specs:
            groups.setdefault(_kind(spec.config), []).append(spec)
        if not self.stored and not self.now:
            return f"{len(specs)} runs to do; no timed run to estimate their time from (--timings-from DIR adds some)"
        parts = []
        for (model, task), group in sorted(groups.items()):
            own = bool(self._times(lambda k: k == (model, task)))
            same_task = bool(self._times(lambda k: k[1] == task))
            parts.append(f"{task} on {model}: {len(group)} x {self.expected(group[0]):.0f} s"
                         + ("" if own else " (no timed run of its own: its task's on other models)" if same_task
                            else " (no timed run of its own: the median over all)"))
        total = sum(self.expected(s) for s in specs)
        return (f"{len(specs)} runs to do; expected run time (median of the stored runs of the same model and task, "
                f"at the concurrency they ran with): " + "; ".join(parts) + f"; {total / 3600:.2f} run-hours in all")

    def _times(self, keep: Callable[[tuple[str, str]], bool]) -> list[float]:
        """Finished (this invocation's where it has some, else stored) and stopped run times of the kinds kept."""
        kinds = {k for k in (*self.now, *self.stored, *self.stopped) if keep(k)}
        return [d for k in kinds for d in (self.now.get(k) or self.stored.get(k) or []) + self.stopped.get(k, [])]

    def expected(self, spec: RunSpec) -> float:
        """Seconds ``spec`` is expected to take (0 when nothing has finished or been stopped yet): its own model
        and task's times, else its task's on the other models (a task's length is mostly its own: on 2026-12-04
        Gemma-3's first gsm8k runs, expected at the other tasks' median, started beside SmolLM2's stopped ones'
        evidence and were stopped too), else any finished run's."""
        k = _kind(spec.config)
        # a stack: at most its runs one after another (a run's recorded time is its share of its stack's)
        runs = len(spec.specs)
        for durations in (self._times(lambda x: x == k), self._times(lambda x: x[1] == k[1]),
                          [d for v in self.now.values() for d in v], [d for v in self.stored.values() for d in v]):
            if durations:
                return runs * statistics.median(durations)
        return 0.0

    def next_index(self, queue: list[RunSpec]) -> int | None:
        """Index of the first queued run that can finish before the deadline, or None."""
        if self.deadline is None:
            return 0 if queue else None
        now, cache = time.time(), {}
        for i, spec in enumerate(queue):
            k = _kind(spec.config) + (len(spec.specs),)
            if k not in cache:
                cache[k] = now + SAFETY * self.expected(spec) < self.deadline
            if cache[k]:
                return i
        return None

    def finished(self, spec: RunSpec, seconds: float) -> None:
        self.now.setdefault(_kind(spec.config), []).append(float(seconds))

    def account(self, spec: RunSpec, res: dict) -> None:
        """A run's summary from ``execute``: its time, and for a run the deadline stopped, a line in
        ``interrupted.jsonl`` (a lost line costs a later call some time, never a result)."""
        if res["status"] != "interrupted":
            self.finished(spec, res["seconds"])
            return
        k = _kind(spec.config)
        self.stopped.setdefault(k, []).append(float(res["seconds"]))
        line = {"run_id": spec.run_id, "model": k[0], "task": k[1], "phase": self.phase, "at": now_iso(),
                "seconds": round(float(res["seconds"]), 1), "workers": self.workers, "where": res.get("message", "")}
        try:
            append_line(Path(self.root) / INTERRUPTED, line)
        except OSError:
            pass

    def why_not(self, queue: list[RunSpec]) -> str:
        """Why no queued run may start: the time left, and the kind whose expected time comes from stopped runs."""
        if self.deadline is None or not queue:
            return ""
        tasks_stopped = {k[1]: len(v) for k, v in self.stopped.items() if v}
        stopped = [s for s in queue if _kind(s.config)[1] in tasks_stopped]
        if not stopped:
            return "time budget"
        model, task = _kind(stopped[0].config)
        n = len(self.stopped.get((model, task), [])) or tasks_stopped[task]
        of = "" if self.stopped.get((model, task)) else " of this task on other models"
        return (f"time budget: a {task} run on {model} is expected to take {self.expected(stopped[0]):.0f} s or more "
                f"with {self.workers} or more runs per GPU ({n} stopped unfinished{of}: "
                f"{INTERRUPTED}), more than the {max(0.0, self.deadline - time.time()):.0f} s left; give it more "
                "minutes, or fewer workers")


# What a worker holds beyond its peak allocation: its CUDA context and the caching allocator's reserve (the
# processes that ran Gemma-3 out of an H200's memory held 0.7-1.7 GiB more than their tensors).
MEM_PER_PROCESS_MIB = 1536.0
MEM_SLACK = 1.15  # the allocator reserves more than the peak allocation it reports
MEM_USABLE = 0.95  # of a GPU's total: never plan to the last byte


class MemoryBudget:
    """Which runs fit on one GPU together: a run is expected to need the largest peak GPU memory of the stored
    ``ok`` runs of its model, task and method (else of its model and task; else of its model on any task: a
    task's first runs on a model), times ``MEM_SLACK``, plus ``MEM_PER_PROCESS_MIB``. A run of a model with no
    such record is expected to fit (the pool's OOM retry then lowers the GPU's concurrency). GPU visit of
    2026-12-02: 20 workers on one H200 and Gemma-3 runs of movie-reviews that peak at 12.3 GiB each; 25 of 60 runs
    ran out of memory. 2026-12-04: Gemma-3's first gsm8k runs, expected to fit, ran out of memory at 18-20 per GPU
    (11 of 20), and the retries, one at a time with one run fewer, did not fit in the call's time left.
    """

    def __init__(self, root: str, phase: str, records: list[dict] | None = None) -> None:
        """``records``: the folder's ``stored_ok`` records when already read (``TimeBudget.records``)."""
        self.peaks: dict[tuple[str, ...], float] = {}
        for r in stored_ok(root, phase) if records is None else records:
            self.add(r)

    def add(self, rec: dict) -> None:
        """Take a finished run's peak memory into the expectations."""
        perf = rec.get("perf") or {}
        peak = perf.get("peak_gpu_mem_mib")
        stacked = perf.get("stacked") or {}
        if peak is None and isinstance(stacked.get("peak_gpu_mem_mib"), (int, float)):
            peak = stacked["peak_gpu_mem_mib"] / max(1, int(stacked.get("runs") or 1))  # a stacked run's share
        if rec.get("status") != "ok" or not isinstance(peak, (int, float)) or not peak:
            return
        c = rec.get("config") or {}
        for key in (_kind(c) + (str(c.get("method")),), _kind(c), _kind(c)[:1]):
            self.peaks[key] = max(self.peaks.get(key, 0.0), float(peak))

    def need(self, spec: RunSpec) -> float:
        """MiB ``spec`` is expected to hold on its GPU (0: unknown)."""
        c = spec.config
        k = _kind(c)
        peak = self.peaks.get(k + (str(c.get("method")),)) or self.peaks.get(k) or self.peaks.get(k[:1])
        # a stack: at most its runs' peaks added up
        return len(spec.specs) * MEM_SLACK * peak + MEM_PER_PROCESS_MIB if peak else 0.0

    def gpu_share(self, spec: RunSpec, workers: int, total_mib: float | None) -> float:
        """The fraction of a GPU ``spec`` asks of Ray: ``1/workers``, or more when its expected memory needs more
        of a GPU of ``total_mib`` (the same expectation as the local pool's; at most one GPU)."""
        need = self.need(spec)
        if not need or not total_mib:
            return 1.0 / workers
        return min(1.0, max(1.0 / workers, need / (MEM_USABLE * total_mib)))

    @staticmethod
    def fits(need: float, held: list[float], total_mib: float | None) -> bool:
        """Whether a run needing ``need`` MiB may join runs holding ``held`` on a GPU of ``total_mib`` (None:
        unknown, no limit). A run alone on its GPU always starts: whether it fits there is its own result."""
        return total_mib is None or not held or need + sum(held) <= MEM_USABLE * total_mib


def gpu_memory_mib(ids: list[str]) -> dict[str, float | None]:
    """Total memory of each visible GPU ``ids`` (None where nvidia-smi cannot tell)."""
    from benchmarks.runner.ledger import nvidia_smi

    total = nvidia_smi("memory.total") if ids else {}

    def mib(g: str) -> float | None:
        try:
            return float(total[str(g).strip()])
        except (KeyError, ValueError):
            return None

    return {g: mib(g) for g in ids}
