"""When a grid invocation may still start a run: ``TimeBudget``, shared by the local pool and the Ray backend, and
the run-time estimate of a dry run."""

from __future__ import annotations

import statistics
import time

from benchmarks.runner.grid import RunSpec
from benchmarks.runner.store import ResultStore


def _kind(config: dict) -> tuple[str, str]:
    return str(config.get("model")), str(config.get("task"))


SAFETY = 1.2  # a run's time varies with how many share its GPU (Fashion-MNIST runs on an H200: 239-327 s)


class TimeBudget:
    """Which queued run may still start before an invocation's deadline (``max_minutes``).

    A run is expected to take the median wall time of the finished runs of its own model and task (this
    invocation's when it has some: they ran at today's concurrency; else the results folder's; else any
    run's), so a slow task's run is not started on the strength of a fast task's (a composed-VLM run took
    about 2.5 times a sarcasm run on an H200, and a median over both started runs the deadline then killed).
    A run starts when ``SAFETY`` times that fits before the deadline; runs that do not fit are passed over for
    later queued runs that do, in queue order.
    """

    def __init__(self, root: str, phase: str, max_minutes: float | None) -> None:
        self.deadline = time.time() + 60 * max_minutes if max_minutes else None
        self.stored: dict[tuple[str, str], list[float]] = {}
        self.now: dict[tuple[str, str], list[float]] = {}
        if self.deadline is not None:
            self.load(root, phase)

    def load(self, root: str, phase: str) -> TimeBudget:
        """Read the finished runs' wall times (this phase's and the other's) from the results folder."""
        for ph in (phase, "tune" if phase == "main" else "main"):
            for r in ResultStore(root, ph).records():
                wall = (r.get("perf") or {}).get("wall_s")
                if r.get("status") == "ok" and wall:
                    self.stored.setdefault(_kind(r["config"]), []).append(float(wall))
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
        """Seconds ``spec`` is expected to take (0 when nothing has finished yet)."""
        k = _kind(spec.config)
        for durations in (self.now.get(k), self.stored.get(k), [d for v in self.now.values() for d in v],
                          [d for v in self.stored.values() for d in v]):
            if durations:
                return statistics.median(durations)
        return 0.0

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
