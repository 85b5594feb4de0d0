"""Run one grid entry end to end and record it. Never raises for a run's own failure (NaN loss, OOM, bad
config, exception), so the grid goes on; only an interrupt or the time budget stops it, and then nothing
is written (the run is redone next time).

Record statuses (docs/fault_model.md): ``ok`` and ``collapsed`` as ``train_run`` reports them, ``diverged``
when training raised ``Diverged`` (NaN/inf loss or gradients), ``failed`` for any other exception. A
failure caused by the machine rather than the method (missing or corrupt asset, missing file, OSError,
ImportError, failed download, CUDA unavailable) has error type ``environment`` and is retried by default.
"""

from __future__ import annotations

import functools
import gc
import os
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

from benchmarks.runner.grid import RunSpec, StackSpec
from benchmarks.runner.mps import worker_state as mps_state
from benchmarks.runner.record import make_record
from benchmarks.runner.store import ENVIRONMENT, ResultStore

TaskResolver = Callable[[str], Any]
RESULT_STATUSES = ("ok", "collapsed")  # what train_run may report; "diverged" comes as an exception
OPTIONAL_RESULT_KEYS = ("health", "per_example", "tower_lr")  # tower_lr: only runs with adapter.tower_lr_scale


def registry_resolver(name: str, task_paths: tuple[str, ...] = (), **options: Any) -> Any:
    """The task ``name`` from ``tasks.registry`` (user task folders loaded first), built with ``options``
    (a suite's task ``options:``)."""
    from tasks import registry

    if task_paths:
        registry.load_tasks(include_paths=list(task_paths))
    return registry.get_task(name, **options)


def resolve_task(resolver: TaskResolver, config: dict[str, Any]) -> Any:
    """The task of a run config, built with its ``task_options`` (resolvers without options still work)."""
    options = config.get("task_options") or {}
    return resolver(config["task"], **options) if options else resolver(config["task"])


def make_resolver(task_paths: list[str] | tuple[str, ...] = ()) -> TaskResolver:
    # A partial of a module-level function pickles, so it can cross into spawned workers.
    return functools.partial(registry_resolver, task_paths=tuple(task_paths))


def _diverged_class() -> type[BaseException]:
    """``train.Diverged`` (NaN/inf loss or gradients); older train.py raises only ``NonFiniteLoss``."""
    from benchmarks.runner import train
    from benchmarks.runner.train import NonFiniteLoss

    return getattr(train, "Diverged", NonFiniteLoss)


_CUDA_MISSING = ("no cuda gpus are available", "not compiled with cuda", "cuda driver", "found no nvidia driver",
                 "cuda is not available", "cuda unavailable")


def _is_environment(err: BaseException) -> bool:
    """Caused by the machine, not the method: the error or an explicit cause (``raise ... from``) is an
    OSError (missing file, failed download, full disk), ImportError, ``AssetError``, or CUDA missing."""
    from benchmarks.assets.cache import AssetError

    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (OSError, ImportError, AssetError)):
            return True
        if any(m in str(e).lower() for m in _CUDA_MISSING):
            return True
        e = e.__cause__
    return False


def _classify(err: BaseException) -> str:
    import torch

    from benchmarks.runner.train import NonFiniteLoss

    if isinstance(err, NonFiniteLoss):
        return "nan_loss"
    if isinstance(err, _diverged_class()):
        return "diverged"
    if isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower():
        return "oom"
    if _is_environment(err):
        return ENVIRONMENT
    if isinstance(err, (ValueError, KeyError, TypeError)):
        return "bad_config"
    return "exception"


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _used(model: str, task: Any, weights: list[str]) -> tuple[list[str], list[dict[str, Any]]]:
    """The assets a run used (every part of a composed model, its dataset, the connector's alignment data)
    and every weight and data file with its sha256 (``provenance.run_files``). Never raises: a problem is
    recorded in place of the files, so the run's own result is still written."""
    from benchmarks.runner import provenance

    if task is None:
        return [model], []
    try:
        assets = list(task.assets(model))
        return assets, provenance.run_files(assets, weights, task.data_paths())
    except Exception as err:  # noqa: BLE001 - a plugin's assets()/data_paths() or a vanished file
        return [model], [{"error": _one_line(err)}]


@dataclass(frozen=True)
class RunContext:
    """What every run of one grid invocation shares, built once by the backend and passed to each run (it
    pickles, so it crosses into spawned workers and Ray tasks)."""

    root: str  # results folder
    phase: str  # "main" | "tune"
    resolver: TaskResolver  # task name (+ options) -> Task
    injector: Callable | None = None  # nalora.inject's signature; None: nalora.inject
    deadline: float | None = None  # time.time() after which a run stops unrecorded (time budget)
    progress: bool = True


_PROCESS_RUNS = [0]  # runs this process has started: a pool worker's first run pays its imports and compiles


def execute(spec: RunSpec, ctx: RunContext, position: int = 0) -> dict[str, Any]:
    """Train ``spec`` and write its record under ``ctx.root``; returns a short summary for the grid bar."""

    root, phase, resolver, injector, deadline, progress = (ctx.root, ctx.phase, ctx.resolver, ctx.injector,
                                                           ctx.deadline, ctx.progress)

    from benchmarks.runner.train import RunInterrupted, train_run

    diverged = _diverged_class()

    store = ResultStore(root, phase)
    rid = spec.run_id
    t0 = time.time()
    task_info: dict = {}
    task = None
    try:
        task = resolve_task(resolver, spec.config)
        task_info = task.describe()
        earlier, _PROCESS_RUNS[0] = _PROCESS_RUNS[0], _PROCESS_RUNS[0] + 1
        result = train_run(spec.config, task, injector=injector, deadline=deadline, progress=progress, position=position)
        if isinstance(result.get("perf"), dict):  # which process ran it, and after how many runs of its own
            result["perf"]["worker"] = {"pid": os.getpid(), "earlier_runs": earlier,
                                        "mps": mps_state()}
        status, error = result.get("status", "ok"), None
        if status not in RESULT_STATUSES:
            raise RuntimeError(f"train_run returned unknown status {status!r} (expected one of {RESULT_STATUSES})")
    except RunInterrupted as err:
        return {"run_id": rid, "status": "interrupted", "message": str(err), "seconds": time.time() - t0}
    except KeyboardInterrupt:
        raise
    except BaseException as err:  # noqa: BLE001 - record every failure, keep the grid going
        result, status, error = _failure(err, diverged)
    return _record(spec, ctx, store, task, task_info, result, status, error, t0)


def _failure(err: BaseException, diverged: type[BaseException]) -> tuple[dict, str, dict]:
    """``(result, status, error)`` of a run that raised ``err``."""
    status = "diverged" if isinstance(err, diverged) else "failed"
    tb = "".join(traceback.format_exception(type(err), err, err.__traceback__, limit=8))
    return {}, status, {"type": _classify(err), "message": _one_line(err), "traceback": tb}


def _record(spec: RunSpec, ctx: RunContext, store: ResultStore, task: Any, task_info: dict, result: dict, status: str,
            error: dict | None, t0: float) -> dict[str, Any]:
    """Write ``spec``'s record (main process only) and free what the run held; the grid bar's summary."""
    import torch

    from benchmarks.runner import provenance

    rid = spec.run_id
    assets, files = _used(spec.config["model"], task, result.get("weight_files") or [])
    rec = make_record(spec.config, spec.meta, rid, status=status, task_info=task_info, result=result,
                      error=error, provenance=provenance.collect(assets, files))
    # Optional results of train_run (run record interface of docs/fault_model.md), stored as they come.
    rec.update({k: result[k] for k in OPTIONAL_RESULT_KEYS if result.get(k) is not None})
    written = None
    if int(os.environ.get("RANK", "0")) == 0:  # under `accelerate launch` only the main process writes
        written = store.write(rec)
    # Free what the run held before the next one shares this worker / GPU.
    del result
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    out = {"run_id": rid, "status": status, "message": error["message"] if error else "", "seconds": time.time() - t0,
           "error_type": error["type"] if error else ""}
    if written is not None and written != store.path(rid):
        out["orphaned"] = str(written)  # the results folder refused it: the grid stops starting runs
    return out


def execute_stack(stack: StackSpec, ctx: RunContext, position: int = 0) -> list[dict[str, Any]]:
    """Train the runs of ``stack`` together (``train.train_stacked``) and write each one's record as ``execute``
    would; runs that cannot be stacked (``NotStackable``) are run one by one instead. One summary per run, in
    order; each run's ``seconds`` is its share of the stack's time (what the time budget learns a run costs)."""
    from benchmarks.runner.stacked import NotStackable
    from benchmarks.runner.train import RunInterrupted, train_stacked

    store = ResultStore(ctx.root, ctx.phase)
    t0, k = time.time(), len(stack.specs)
    task, task_info, earlier = None, {}, _PROCESS_RUNS[0]
    try:
        task = resolve_task(ctx.resolver, stack.config)
        task_info = task.describe()
        outcomes: list[Any] = train_stacked([s.config for s in stack.specs], task, injector=ctx.injector,
                                            deadline=ctx.deadline, progress=ctx.progress, position=position)
    except NotStackable as err:
        print(f"stack of {k} ({stack.label()}): {err}; running them one by one", file=sys.stderr, flush=True)
        return [execute(s, ctx, position) for s in stack.specs]
    except RunInterrupted as err:
        return [{"run_id": s.run_id, "status": "interrupted", "message": str(err), "seconds": (time.time() - t0) / k}
                for s in stack.specs]
    except KeyboardInterrupt:
        raise
    except BaseException as err:  # noqa: BLE001 - the stack failed as a whole (set-up, out of memory): every run
        outcomes = [err] * k
    _PROCESS_RUNS[0] += k  # (a stack run one by one was counted by execute)
    diverged = _diverged_class()
    summaries = []
    for spec, outcome in zip(stack.specs, outcomes):
        if isinstance(outcome, BaseException):
            result, status, error = _failure(outcome, diverged)
        elif outcome.get("status", "ok") not in RESULT_STATUSES:
            result, status, error = _failure(RuntimeError(f"train_stacked returned unknown status "
                                                          f"{outcome.get('status')!r}"), diverged)
        else:
            result, status, error = outcome, outcome.get("status", "ok"), None
            if isinstance(result.get("perf"), dict):
                result["perf"]["worker"] = {"pid": os.getpid(), "earlier_runs": earlier, "mps": mps_state()}
        summaries.append(_record(spec, ctx, store, task, task_info, result, status, error, t0))
    for out in summaries:
        out["seconds"] = (time.time() - t0) / k
    return summaries

