"""When a grid invocation may still start a run: ``TimeBudget``, shared by the local pool and the Ray backend, and
the run-time estimate of a dry run."""

from __future__ import annotations

import datetime as dt
import json
import statistics
import time
from pathlib import Path

from benchmarks.runner.grid import RunSpec
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
    invocation's when it has some: they ran at today's concurrency; else the results folder's; else any
    run's), so a slow task's run is not started on the strength of a fast task's (a composed-VLM run took
    about 2.5 times a sarcasm run on an H200, and a median over both started runs the deadline then killed).
    A run starts when ``SAFETY`` times that fits before the deadline; runs that do not fit are passed over for
    later queued runs that do, in queue order.

    A run the deadline stopped took longer than it had run: ``account`` writes that to ``interrupted.jsonl`` in
    the results folder, with the runs sharing each GPU then (``workers``), and a run of its model and task is
    from then on expected to take at least that long wherever at least as many share a GPU. Without this a task
    with no finished run (gsm8k on 2026-12-02) was expected to take the other tasks' median, started in every
    call, and stopped by every call's end: no run ever finished.
    """

    def __init__(self, root: str, phase: str, max_minutes: float | None, workers: int = 1) -> None:
        self.deadline = time.time() + 60 * max_minutes if max_minutes else None
        self.root, self.phase, self.workers = str(root), phase, max(1, workers)
        self.records: list[dict] | None = None  # the stored ok records, once loaded
        self.stored: dict[tuple[str, str], list[float]] = {}
        self.now: dict[tuple[str, str], list[float]] = {}
        self.at_least: dict[tuple[str, str], float] = {}  # seconds a run takes at least, from stopped runs
        if self.deadline is not None:
            self.load(root, phase)

    def load(self, root: str, phase: str) -> TimeBudget:
        """Read the finished runs' wall times (this phase's and the other's) from the results folder; the records
        read stay in ``self.records`` (a ``MemoryBudget`` of the same grid takes them instead of reading again)."""
        self.records = stored_ok(root, phase)
        for r in self.records:
            wall = (r.get("perf") or {}).get("wall_s")
            if wall:
                self.stored.setdefault(_kind(r["config"]), []).append(float(wall))
        for line in read_interruptions(root):
            if int(line.get("workers") or 1) <= self.workers:  # as many or more sharing a GPU now: no faster
                k = (str(line.get("model")), str(line.get("task")))
                self.at_least[k] = max(self.at_least.get(k, 0.0), float(line.get("seconds") or 0.0))
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
            own = (model, task) in self.now or (model, task) in self.stored
            parts.append(f"{task} on {model}: {len(group)} x {self.expected(group[0]):.0f} s"
                         + ("" if own else " (no timed run of its own: the median over all)"))
        total = sum(self.expected(s) for s in specs)
        return (f"{len(specs)} runs to do; expected run time (median of the stored runs of the same model and task, "
                f"at the concurrency they ran with): " + "; ".join(parts) + f"; {total / 3600:.2f} run-hours in all")

    def expected(self, spec: RunSpec) -> float:
        """Seconds ``spec`` is expected to take (0 when nothing has finished or been stopped yet): the median of
        the finished runs (see the class), and at least as long as a stopped run of its model and task had run."""
        k = _kind(spec.config)
        floor = self.at_least.get(k, 0.0)
        for durations in (self.now.get(k), self.stored.get(k), [d for v in self.now.values() for d in v],
                          [d for v in self.stored.values() for d in v]):
            if durations:
                return max(statistics.median(durations), floor)
        return floor

    def next_index(self, queue: list[RunSpec]) -> int | None:
        """Index of the first queued run that can finish before the deadline, or None."""
        if self.deadline is None:
            return 0 if queue else None
        now, cache = time.time(), {}
        for i, spec in enumerate(queue):
            k = _kind(spec.config)
            if k not in cache:
                cache[k] = now + SAFETY * self.expected(spec) < self.deadline
            if cache[k]:
                return i
        return None

    def finished(self, spec: RunSpec, seconds: float) -> None:
        self.now.setdefault(_kind(spec.config), []).append(float(seconds))

    def account(self, spec: RunSpec, res: dict) -> None:
        """A run's summary from ``execute``: a finished run's time, or a stopped run's lower bound (written down)."""
        if res["status"] != "interrupted":
            self.finished(spec, res["seconds"])
            return
        k, seconds = _kind(spec.config), float(res["seconds"])
        self.at_least[k] = max(self.at_least.get(k, 0.0), seconds)
        line = {"run_id": spec.run_id, "model": k[0], "task": k[1], "phase": self.phase,
                "seconds": round(seconds, 1), "workers": self.workers, "where": res.get("message", ""),
                "at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        try:
            with open(Path(self.root) / INTERRUPTED, "a", encoding="utf-8") as f:
                f.write(json.dumps(line, sort_keys=True) + "\n")
        except OSError:
            pass  # a lost hint costs a later call some time, never a result

    def why_not(self, queue: list[RunSpec]) -> str:
        """Why no queued run may start: the time left, and the longest-known run kind if a stopped run says so."""
        if self.deadline is None or not queue:
            return ""
        left = max(0.0, self.deadline - time.time())
        bounded = [s for s in queue if self.at_least.get(_kind(s.config), 0.0) >= self.expected(s) > 0]
        if not bounded:
            return "time budget"
        model, task = _kind(bounded[0].config)
        return (f"time budget: a {task} run on {model} takes more than {self.at_least[(model, task)]:.0f} s with "
                f"{self.workers} or more runs per GPU (a run was stopped that far in; {INTERRUPTED}), more than the "
                f"{left:.0f} s left; give it more minutes, or fewer workers")


def read_interruptions(root: str | Path) -> list[dict]:
    """The lines of ``root/interrupted.jsonl`` (a torn last line, from a killed runner, is skipped)."""
    try:
        text = (Path(root) / INTERRUPTED).read_text(encoding="utf-8")
    except OSError:
        return []
    out = []
    for ln in text.splitlines():
        try:
            d = json.loads(ln)
        except ValueError:
            continue
        if isinstance(d, dict):
            out.append(d)
    return out


# What a worker holds beyond its peak allocation: its CUDA context and the caching allocator's reserve (the
# processes that ran Gemma-3 out of an H200's memory held 0.7-1.7 GiB more than their tensors).
MEM_PER_PROCESS_MIB = 1536.0
MEM_SLACK = 1.15  # the allocator reserves more than the peak allocation it reports
MEM_USABLE = 0.95  # of a GPU's total: never plan to the last byte


class MemoryBudget:
    """Which runs fit on one GPU together: a run is expected to need the largest peak GPU memory of the stored
    ``ok`` runs of its model, task and method (else of its model and task), times ``MEM_SLACK``, plus
    ``MEM_PER_PROCESS_MIB``. A run with no such record is expected to fit (the pool's OOM retry then lowers the
    GPU's concurrency). GPU visit of 2026-12-02: 20 workers on one H200 and Gemma-3 runs of movie-reviews that
    peak at 12.3 GiB each; 25 of 60 runs ran out of memory.
    """

    def __init__(self, root: str, phase: str, records: list[dict] | None = None) -> None:
        """``records``: the folder's ``stored_ok`` records when already read (``TimeBudget.records``)."""
        self.peaks: dict[tuple[str, ...], float] = {}
        for r in stored_ok(root, phase) if records is None else records:
            self.add(r)

    def add(self, rec: dict) -> None:
        """Take a finished run's peak memory into the expectations."""
        peak = (rec.get("perf") or {}).get("peak_gpu_mem_mib")
        if rec.get("status") != "ok" or not isinstance(peak, (int, float)) or not peak:
            return
        c = rec.get("config") or {}
        for key in (_kind(c) + (str(c.get("method")),), _kind(c)):
            self.peaks[key] = max(self.peaks.get(key, 0.0), float(peak))

    def need(self, spec: RunSpec) -> float:
        """MiB ``spec`` is expected to hold on its GPU (0: unknown)."""
        c = spec.config
        peak = self.peaks.get(_kind(c) + (str(c.get("method")),)) or self.peaks.get(_kind(c))
        return MEM_SLACK * peak + MEM_PER_PROCESS_MIB if peak else 0.0

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
