"""The Ray backend on a local Ray cluster (CPU) with the runner tests' fake tasks, and the multi-GPU
assignment of the local pool with fake GPU ids.

A fake task can kill its worker process (``os._exit``) the first time it runs: Ray must run it again
and the grid must record it ok; a task that always dies is recorded failed; a second invocation skips
what the first finished (resume).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from test_runner import BASE_SUITE, FakeTask, run, stand_in_inject, write_suite  # tests/ is on sys.path (conftest)

MARKER_ENV = "NALORA_TEST_DIE_DIR"


class DieOnceTask(FakeTask):
    """Kills its worker on the first attempt (marker file absent), trains normally on the second."""

    name = "fake-die-once"

    def setup(self, model_name, device="cpu"):
        marker = Path(os.environ[MARKER_ENV]) / self.name
        if not marker.exists():
            marker.write_text("died")
            os._exit(1)
        return super().setup(model_name, device)


class DieAlwaysTask(FakeTask):
    name = "fake-die-always"

    def setup(self, model_name, device="cpu"):
        os._exit(1)


TASKS = {c.name: c for c in (FakeTask, DieOnceTask, DieAlwaysTask)}


def resolver(name: str):
    return TASKS[name]()


def _specs(tmp_path: Path, tasks: list[str]):
    from benchmarks.runner import grid
    from benchmarks.runner.suite import load_suite

    suite = load_suite(str(write_suite(tmp_path / "s.yaml", BASE_SUITE.replace("tasks: [fake]", f"tasks: [{', '.join(tasks)}]"))), resolver=resolver)
    return grid.expand(suite, lambda n: (TASKS[n].family, TASKS[n].default_model))


@pytest.fixture
def ray_env(tmp_path, monkeypatch):
    # workers of the local Ray inherit this process's environment: the marker folder and the import path
    # that finds test_runner / this module
    monkeypatch.setenv(MARKER_ENV, str(tmp_path))
    here = str(Path(__file__).resolve().parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([here, str(Path(here).parent), os.environ.get("PYTHONPATH", "")]))
    yield tmp_path


@pytest.mark.slow  # starts a local Ray and three worker processes that import torch: about a minute
def test_ray_backend_retries_dead_worker_records_and_resumes(ray_env):
    pytest.importorskip("ray")
    from benchmarks.runner.ray_backend import run_grid_ray

    tmp = ray_env
    specs = _specs(tmp, ["fake", "fake-die-once", "fake-die-always"])
    out = tmp / "results"
    s = run_grid_ray(specs, str(out), phase="main", resolver=resolver, injector=stand_in_inject, workers=2,
                     progress=False, max_retries=1, num_cpus=2)
    assert (s.total, s.ok, s.failed, s.skipped) == (3, 2, 1, 0), s.failures
    assert (tmp / "fake-die-once").exists()  # it did die once, and was retried
    recs = {json.loads(p.read_text())["config"]["task"]: json.loads(p.read_text()) for p in (out / "runs").glob("*.json")}
    assert recs["fake"]["status"] == recs["fake-die-once"]["status"] == "ok"
    assert recs["fake-die-always"]["status"] == "failed"
    assert "worker process died" in recs["fake-die-always"]["error"]["message"]
    assert "worker process died" in s.failures[0]

    # resume: nothing left to do (the failed run is done unless retry_failed)
    s2 = run_grid_ray(specs, str(out), phase="main", resolver=resolver, injector=stand_in_inject, workers=2,
                      progress=False, num_cpus=2)
    assert (s2.skipped, s2.ok, s2.failed) == (3, 0, 0)
    # a lost record is redone, the others are not
    lost = next(p for p in (out / "runs").glob("*.json") if json.loads(p.read_text())["config"]["task"] == "fake")
    lost.unlink()
    s3 = run_grid_ray(specs, str(out), phase="main", resolver=resolver, injector=stand_in_inject, workers=2,
                      progress=False, num_cpus=2)
    assert (s3.skipped, s3.ok) == (2, 1) and lost.exists()


def test_ray_backend_rejects_zero_workers(tmp_path):
    from benchmarks.runner.ray_backend import run_grid_ray

    with pytest.raises(ValueError, match="workers"):
        run_grid_ray([], str(tmp_path), resolver=resolver, workers=0)


# ---------------------------------------------------------------------------------------------
# multi-GPU assignment of the local pool (benchmarks/runner/pool.py)


def _fake_execute(spec, ctx, position=0):
    """Stands in for execute in the spawned workers: records which GPU the worker was pinned to."""
    import time

    from benchmarks.runner.record import make_record
    from benchmarks.runner.store import ResultStore

    time.sleep(0.3)  # long enough that every worker gets work
    rec = make_record(spec.config, spec.meta, spec.run_id, status="ok", result={"perf": {"wall_s": 0.3}})
    rec["gpu_seen"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    ResultStore(ctx.root, ctx.phase).write(rec)
    return {"run_id": spec.run_id, "status": "ok", "message": "", "seconds": 0.3}


@pytest.mark.slow  # spawns 2 x 2 workers
def test_pool_spreads_runs_over_every_visible_gpu(tmp_path, monkeypatch):
    """One pool per visible GPU: with CUDA_VISIBLE_DEVICES=3,5 every run lands on GPU 3 or 5, both used."""
    import benchmarks.runner.execute as ex
    from benchmarks.runner.pool import run_grid

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    monkeypatch.setattr(ex, "execute", _fake_execute)  # pool imports execute at call time, from this module
    from benchmarks.runner import grid
    from benchmarks.runner.suite import load_suite

    suite = load_suite(str(write_suite(tmp_path / "s.yaml", BASE_SUITE.replace("seeds: [0]", "seeds: [0, 1, 2, 3, 4, 5, 6, 7]"))), resolver=resolver)
    specs = grid.expand(suite, lambda n: ("llm", "tiny-llama"))
    s = run_grid(specs, str(tmp_path / "r"), resolver=resolver, workers=2, progress=False)
    assert s.ok == 8, s.failures
    seen = [json.loads(p.read_text())["gpu_seen"] for p in (tmp_path / "r" / "runs").glob("*.json")]
    assert sorted(set(seen)) == ["3", "5"]


def _fake_execute_lr(spec, ctx, position=0):
    """Stands in for execute: validation accuracy grows with the lr (the lr rule extends the grid upward), and
    the record says which process ran it."""
    from benchmarks.runner.record import make_record
    from benchmarks.runner.store import ResultStore

    lr = float(spec.config["lr"])
    metrics = {"validation": {"acc": 100 * lr}, "test": {"acc": 100 * lr}}
    rec = make_record(spec.config, spec.meta, spec.run_id, status="ok", task_info={"selection_metric": "acc"},
                      result={"metrics": metrics, "perf": {"wall_s": 0.1}})
    rec["pid"] = os.getpid()
    ResultStore(ctx.root, ctx.phase).write(rec)
    return {"run_id": spec.run_id, "status": "ok", "message": "", "seconds": 0.1}


@pytest.mark.slow  # spawns 2 workers
def test_the_pool_keeps_its_workers_across_lr_rounds(tmp_path, monkeypatch):
    """One invocation starts its workers once: the runs of lr round 1 run in the processes of round 0, whose
    compiled graphs they keep (a pool per round compiled again in every round: results/perf/h200/tp-improved-v2)."""
    import benchmarks.runner.execute as ex

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # one CPU pool
    monkeypatch.setattr(ex, "execute", _fake_execute_lr)
    suite = write_suite(tmp_path / "s.yaml", BASE_SUITE.replace("seeds: [0]", "seeds: [0, 1]").replace(
        "lr_bounds: [1.0e-3, 1.0e-3]", "lr_bounds: [1.0e-3, 3.0e-3]"))
    assert run(suite, tmp_path / "r", workers=2) == 0
    recs = [json.loads(p.read_text()) for p in (tmp_path / "r" / "runs").glob("*.json")]
    pids = {r["meta"]["lr_round"]: set() for r in recs}
    for r in recs:
        pids[r["meta"]["lr_round"]].add(r["pid"])
    assert sorted(pids) == [0, 1] and len(recs) == 4  # round 1 added lr 3e-3 for both seeds
    assert pids[1] <= pids[0], pids


@pytest.mark.slow  # starts a local Ray and two worker processes that import torch
def test_ray_backend_keeps_one_local_ray_across_lr_rounds(ray_env, monkeypatch):
    """``run --backend ray`` starts its local Ray once for the whole invocation: lr round 1 runs in the Ray of
    round 0 (a Ray per round started its worker processes, and their compiles, again)."""
    ray = pytest.importorskip("ray")
    starts = []
    real_init = ray.init
    monkeypatch.setattr(ray, "init", lambda *a, **k: starts.append(k) or real_init(*a, **k))
    suite = write_suite(ray_env / "s.yaml", BASE_SUITE.replace("seeds: [0]", "seeds: [0, 1]").replace(
        "lr_bounds: [1.0e-3, 1.0e-3]", "lr_bounds: [1.0e-3, 3.0e-3]"))
    assert run(suite, ray_env / "r", workers=2, backend="ray", resolver=resolver) == 0
    recs = [json.loads(p.read_text()) for p in (ray_env / "r" / "runs").glob("*.json")]
    assert sorted(r["meta"]["lr_round"] for r in recs) == [0, 0, 1, 1]  # round 1 added lr 3e-3 for both seeds
    assert all(r["status"] == "ok" for r in recs), [r["error"] for r in recs]
    assert len(starts) == 1 and not ray.is_initialized()  # started once, stopped at the end


class _ThreadPools:
    """``WorkerPools`` of one GPU with threads for processes: what ``_run_pools`` schedules, without spawning."""

    gpus = ["0"]

    def __init__(self, workers: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.workers = workers
        self.ex = ThreadPoolExecutor(workers)

    def get(self, g):
        return self.ex


def test_a_run_out_of_memory_on_a_shared_gpu_is_retried_with_one_run_fewer_there(monkeypatch):
    """The pool, not the method, ran it out of memory: it goes back to the queue and the GPU takes one run fewer at
    once (GPU visit of 2026-12-02: 20 Gemma-3 runs on one H200, 25 recorded failed/oom)."""
    import threading
    import time

    import benchmarks.runner.execute as ex
    from benchmarks.runner.grid import RunSpec
    from benchmarks.runner.pool import GridSummary, _run_pools

    lock, state = threading.Lock(), {"now": 0, "peak_after_oom": 0, "oom_at": None, "calls": []}

    def fake_execute(spec, ctx, position=0):
        with lock:
            state["now"] += 1
            state["calls"].append(spec.config["seed"])
            if state["oom_at"] is not None:
                state["peak_after_oom"] = max(state["peak_after_oom"], state["now"])
            oom = spec.config["seed"] == 0 and state["calls"].count(0) == 1
        time.sleep(0.05 if oom else 0.2)
        with lock:
            state["now"] -= 1
            if oom:
                state["oom_at"] = time.time()
        return {"run_id": spec.run_id, "status": "failed" if oom else "ok", "seconds": 0.1,
                "error_type": "oom" if oom else "", "message": "CUDA out of memory" if oom else ""}

    monkeypatch.setattr(ex, "execute", fake_execute)
    specs = [RunSpec({"model": "m", "method": "lora", "task": "t", "seed": i, "lr": 1e-3}) for i in range(8)]
    accounted: list[str] = []
    summary = GridSummary(total=len(specs))
    pools = _ThreadPools(3)  # one GPU, three runs at once
    _run_pools(specs, None, pools, lambda q: q.pop(0) if q else None,
               lambda res, spec: accounted.append(f"{spec.config['seed']}:{res['status']}"), summary)
    pools.ex.shutdown()
    assert sorted(accounted) == sorted(f"{i}:ok" for i in range(8))  # the OOM was not a result: seed 0 ran again
    assert state["calls"].count(0) == 2
    assert state["peak_after_oom"] <= 2  # at most workers - 1 at once after it


def test_the_pool_starts_a_run_only_beside_runs_it_fits_with_in_gpu_memory(tmp_path, monkeypatch):
    """``--workers`` is an upper bound: runs whose stored peaks say three would not fit on the GPU run two at a
    time; a run with no stored peak is not held back."""
    import threading
    import time

    import benchmarks.runner.execute as ex
    import benchmarks.runner.pool as pool
    from benchmarks.runner.budget import MEM_PER_PROCESS_MIB, MEM_SLACK, MemoryBudget
    from benchmarks.runner.grid import RunSpec
    from benchmarks.runner.pool import GridSummary, _run_pools

    lock, state = threading.Lock(), {"now": {}, "peak": {}}

    def fake_execute(spec, ctx, position=0):
        m = spec.config["model"]
        with lock:
            state["now"][m] = state["now"].get(m, 0) + 1
            state["peak"][m] = max(state["peak"].get(m, 0), sum(state["now"].values()))
        time.sleep(0.1)
        with lock:
            state["now"][m] -= 1
        return {"run_id": spec.run_id, "status": "collapsed", "seconds": 0.1, "error_type": "", "message": ""}

    monkeypatch.setattr(ex, "execute", fake_execute)
    monkeypatch.setattr(pool, "gpu_memory_mib", lambda ids: {"0": 10_000.0})
    memory = MemoryBudget(str(tmp_path), "main")
    peak = (4000 - MEM_PER_PROCESS_MIB) / MEM_SLACK  # each big run then needs 4,000 of the 9,500 MiB usable
    memory.add({"status": "ok", "config": {"model": "big", "task": "t", "method": "lora"}, "perf": {"peak_gpu_mem_mib": peak}})
    big = [RunSpec({"model": "big", "method": "lora", "task": "t", "seed": i, "lr": 1e-3}) for i in range(6)]
    small = [RunSpec({"model": "new", "method": "lora", "task": "t", "seed": i, "lr": 1e-3}) for i in range(4)]
    p = _ThreadPools(4)
    _run_pools(big, None, p, lambda q: q.pop(0) if q else None, lambda res, spec: None, GridSummary(), memory)
    assert state["peak"]["big"] == 2
    state["peak"].clear()
    _run_pools(small, None, p, lambda q: q.pop(0) if q else None, lambda res, spec: None, GridSummary(), memory)
    p.ex.shutdown()
    assert state["peak"]["new"] == 4  # nothing stored: the worker count is the only bound


def test_a_ray_task_asks_the_gpu_share_its_expected_memory_needs(tmp_path):
    """The Ray backend's counterpart of the pool's memory check: a run expected to need 40% of the usable memory
    asks 0.4 of a GPU, not 1/workers; a run with no stored peak asks 1/workers; never more than one GPU."""
    from benchmarks.runner.budget import MEM_PER_PROCESS_MIB, MEM_SLACK, MEM_USABLE, MemoryBudget
    from benchmarks.runner.grid import RunSpec

    memory = MemoryBudget(str(tmp_path), "main")
    total = 10_000.0
    for model, frac in (("big", 0.4), ("huge", 3.0)):
        peak = (frac * MEM_USABLE * total - MEM_PER_PROCESS_MIB) / MEM_SLACK
        memory.add({"status": "ok", "config": {"model": model, "task": "t", "method": "lora"},
                    "perf": {"peak_gpu_mem_mib": peak}})
    spec = lambda m: RunSpec({"model": m, "method": "lora", "task": "t", "seed": 0, "lr": 1e-3})  # noqa: E731
    assert memory.gpu_share(spec("big"), 10, total) == pytest.approx(0.4)
    assert memory.gpu_share(spec("new"), 10, total) == pytest.approx(0.1)
    # a task's first run on a model that has records elsewhere: that model's largest peak on any task
    other_task = RunSpec({"model": "big", "method": "nalora", "task": "t2", "seed": 0, "lr": 1e-3})
    assert memory.gpu_share(other_task, 10, total) == pytest.approx(0.4)
    memory.add({"status": "ok", "config": {"model": "big", "task": "t2", "method": "lora"},
                "perf": {"peak_gpu_mem_mib": (0.2 * MEM_USABLE * total - MEM_PER_PROCESS_MIB) / MEM_SLACK}})
    assert memory.gpu_share(other_task, 10, total) == pytest.approx(0.2)  # then its own task's record
    assert memory.gpu_share(spec("huge"), 10, total) == 1.0
    assert memory.gpu_share(spec("big"), 10, None) == pytest.approx(0.1)  # GPU memory unknown
