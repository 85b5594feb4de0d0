"""``run --backend ray``: the same runs as ``pool.run_grid``, scheduled as Ray tasks (one machine or a cluster).

Each run is one Ray task calling ``benchmarks.runner.execute.execute`` (the same code, the same result
store and resume: a run whose JSON exists is skipped). With GPUs in the cluster a task asks for
``1 / workers`` of a GPU, so ``workers`` runs share each GPU as in the local pool; Ray sets
``CUDA_VISIBLE_DEVICES`` for the task. A task whose worker process dies (killed for memory, segfault) is
retried by Ray up to ``max_retries`` times, then recorded failed. Without ``address`` a local Ray is
started (and stopped at the end: of the grid, or of the invocation inside ``ray_session``, whose worker processes
and their compiled graphs then serve every phase and lr round); with one, the run store ``root`` must be on a
filesystem every node sees.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Callable, Iterator

from benchmarks.runner.budget import MemoryBudget, TimeBudget, gpu_memory_mib
from benchmarks.runner.grid import RunSpec
from benchmarks.runner.pool import GridSummary, _dedup, _gpu_ids, _record_dead_worker
from benchmarks.runner.store import ResultStore


def _execute_task(spec: RunSpec, root: str, phase: str, resolver: Callable, injector: Callable | None,
                  deadline: float | None) -> dict[str, Any]:
    """Body of the Ray task: one run through the shared ``execute`` (imported in the worker)."""
    from benchmarks.runner.execute import RunContext, execute

    return execute(spec, RunContext(root, phase, resolver, injector, deadline, progress=False))


def _start_ray(address: str | None, workers: int, num_cpus: int | None, max_retries: int) -> bool:
    """Connect to ``address`` or start a local Ray; True when this call started it (and must stop it)."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=False)
        return False
    # Local workers import the same code as this process: hand them this process's import path.
    path = os.pathsep.join(p for p in sys.path if p)
    # Ray retries a task killed by its host-memory monitor without limit by default: bound it like a crash.
    if num_cpus is None:  # every task asks for one CPU: enough for `workers` tasks on each visible GPU
        import torch

        num_cpus = max(1, workers) * max(1, torch.cuda.device_count())
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}}, _system_config={"task_oom_retries": max_retries})
    return True


@contextlib.contextmanager
def ray_session(address: str | None, workers: int, num_cpus: int | None = None, max_retries: int = 1) -> Iterator[None]:
    """Ray for a whole invocation: ``run_grid_ray`` inside uses it (a local Ray started here is stopped on exit),
    so its worker processes are not started again for each lr round."""
    started = _start_ray(address, workers, num_cpus, max_retries)
    try:
        yield
    finally:
        if started:
            import ray

            ray.shutdown()


def run_grid_ray(specs: list[RunSpec], root: str, *, phase: str = "main", resolver: Callable[[str], Any],
                 injector: Callable | None = None, workers: int = 1, max_minutes: float | None = None,
                 retry_failed: bool = False, progress: bool = True, address: str | None = None,
                 max_retries: int = 1, num_cpus: int | None = None) -> GridSummary:
    """Run every spec without a result JSON under ``root`` as Ray tasks; same contract as ``pool.run_grid``.

    ``workers``: runs sharing one GPU (each task asks for ``1/workers`` GPU, or the larger share its expected
    memory needs on a local Ray: ``MemoryBudget.gpu_share``); on a CPU-only cluster, runs at a time (one CPU each). ``num_cpus``: CPUs of a local Ray (default ``workers`` per visible GPU). ``max_retries``:
    how often a task whose worker process died is run again before it is recorded failed.
    """
    if workers < 1:
        raise ValueError(f"the ray backend needs workers >= 1, got {workers}")
    import ray
    from tqdm.auto import tqdm

    store = ResultStore(root, phase)
    store.clean_temp()
    specs = _dedup(specs)
    todo = [s for s in specs if not store.is_done(s.run_id, retry_failed)]
    summary = GridSummary(total=len(specs), skipped=len(specs) - len(todo))
    if not todo:
        return summary
    budget = TimeBudget(str(root), phase, max_minutes, workers)
    deadline = budget.deadline
    with ray_session(address, workers, num_cpus, max_retries):  # a no-op inside the invocation's session
        gpus = int(ray.cluster_resources().get("GPU", 0))
        opts: dict[str, Any] = {"max_retries": max_retries, "retry_exceptions": False, "num_cpus": 1}
        if gpus:
            opts["num_gpus"] = 1.0 / workers
        slots = workers * max(1, gpus) if gpus else workers  # tasks in flight: the pool's capacity
        remote_fn = ray.remote(_execute_task)
        task = remote_fn.options(**opts)
        memory = MemoryBudget(str(root), phase, budget.records)
        # the GPUs of a cluster given by --address are not this machine's: there every run asks 1/workers
        total = None if (address or not gpus) else min((t for t in gpu_memory_mib(_gpu_ids()).values() if t), default=None)
        resolver_ref = ray.put(resolver)
        injector_ref = ray.put(injector)

        bar = tqdm(total=len(specs), initial=summary.skipped, desc=f"grid ({phase}, ray)", disable=not progress)
        queue = list(todo)
        running: dict[Any, RunSpec] = {}
        try:
            while queue or running:
                while queue and len(running) < slots and (i := budget.next_index(queue)) is not None:
                    spec = queue.pop(i)
                    run = remote_fn.options(**{**opts, "num_gpus": memory.gpu_share(spec, workers, total)}) if total else task
                    running[run.remote(spec, str(root), phase, resolver_ref, injector_ref, deadline)] = spec
                if not running:
                    break
                done, _ = ray.wait(list(running), num_returns=1)
                for ref in done:
                    spec = running.pop(ref)
                    try:
                        res = ray.get(ref)
                    except ray.exceptions.RayTaskError as err:  # execute itself raised: not recorded, redone next time
                        res = {"status": "failed", "message": str(err).strip().splitlines()[0], "seconds": 0.0}
                    except ray.exceptions.RayError as err:  # the worker died (crash, host OOM, node lost) every attempt
                        _record_dead_worker(spec, str(root), phase)
                        res = {"status": "failed", "seconds": 0.0,
                               "message": f"worker process died ({type(err).__name__}, {max_retries + 1} attempts)"}
                    _account(summary, res, spec, budget)
                    bar.update(1)
                    bar.set_postfix(ok=summary.ok, failed=summary.failed)
            summary.remaining = len(queue)
            if queue:
                summary.stop_reason = budget.why_not(queue)
        finally:
            bar.close()
            for ref in running:  # interrupted: the runs in flight are abandoned, unrecorded
                ray.cancel(ref, force=True)
    return summary


def _account(summary: GridSummary, res: dict, spec: RunSpec, budget: TimeBudget) -> None:
    summary.add(res, spec.label())  # the pool's counting: collapsed / diverged are results, not interruptions
    budget.account(spec, res)
