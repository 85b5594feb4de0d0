"""Evaluation cost before / after shared-context scoring, as ratios (interleaved rounds on one machine).

Two measurements, each alternating the two setups round by round so that a shared or drifting machine
affects both alike:

* ``scoring``: seconds per example of ``ChoiceTask.score`` on a validation subset, one sequence per choice
  (before) vs one shared forward of each context (after), at each ``--batch-size``; also the largest
  log-likelihood difference and whether ``acc`` / ``acc_norm`` agree.
* ``--runs``: the share of a short run's wall time spent evaluating (``perf.eval_s / perf.wall_s`` of
  ``train_run``): before = per-choice scoring and periodic evaluations on all ``eval_limit`` examples
  (``curve_limit`` null), after = shared contexts and the suite's ``curve_limit`` (or ``--curve-limit``).

``python3 -m benchmarks.perf.eval_time --model smollm2-135m --task sarcasm --limit 64 --rounds 5
[--batch-size 16 64] [--runs 2 --suite demo --steps 20] [--out results/perf/eval_time.json]``

* ``--eval-batch-sizes 16 64``: instead, seconds per example of the task's own evaluation at each
  ``eval_batch_size`` (any task, the composed VLM's too) and whether any prediction changes with it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.perf.step_time import spread
from tasks.common import GENERATION_CACHES

MODES = ("per_choice", "shared")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _interleaved(rounds: int) -> list[tuple[str, ...]]:
    """Round r runs the two modes in alternating order (ABBA...), so neither always goes first."""
    return [MODES if r % 2 == 0 else MODES[::-1] for r in range(rounds)]


def _eval_mode(setup: Any) -> tuple[torch.nn.Module, Any]:
    """The task's model in eval mode and the autocast its runs evaluate under (bf16 on a GPU)."""
    model = setup.model.eval()
    dev = next(model.parameters()).device
    return model, torch.autocast("cuda", torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()


def measure_scoring(task: Any, setup: Any, *, limit: int, batch_size: int, rounds: int) -> dict[str, Any]:
    """Seconds per example of ``task.score`` per mode (median over rounds) and the per-round ratio."""
    model, autocast = _eval_mode(setup)
    secs: dict[str, list[float]] = {m: [] for m in MODES}
    out: dict[str, Any] = {}
    with torch.no_grad(), autocast:
        for m in MODES:  # warm-up (allocator, kernels, tokenizer caches) and the outputs to compare
            out[m] = task.score(setup, model, "validation", limit, batch_size, share_context=m == "shared")
        n = len(out["per_choice"][0])  # examples actually scored (a split smaller than ``limit``)
        for order in _interleaved(rounds):
            for m in order:
                _sync()
                t0 = time.perf_counter()
                task.score(setup, model, "validation", limit, batch_size, share_context=m == "shared")
                _sync()
                secs[m].append((time.perf_counter() - t0) / n)
    (a, choices, labels), (b, _, _) = out["per_choice"], out["shared"]
    diff = max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    return {
        "batch_size": batch_size, "examples": n,
        "s_per_example": {m: spread(v) for m, v in secs.items()},
        "speedup": spread([p / s for p, s in zip(secs["per_choice"], secs["shared"])]),
        "max_abs_ll_diff": diff,
        "metrics": {m: task.metrics_from(out[m][0], choices, labels) for m in MODES},
    }


def measure_eval_batches(task: Any, setup: Any, *, split: str, limit: int, batch_sizes: list[int],
                         rounds: int, caches: tuple[str, ...] = ("dynamic",)) -> dict[str, Any]:
    """Seconds per example of ``task.evaluate_examples`` at each evaluation batch size (any task: language or
    vision-language; rounds rotate the order), and whether the batch size changes any prediction: each size's
    per-example predictions against the first size's, and its metrics. ``caches``: for a generation task, each
    size with each KV cache (``tasks.common.greedy_generate``; keys ``"256"`` dynamic, ``"256-static"``); a
    variant's first call (its compile, for the static cache on a GPU) is timed apart, as ``first_call_s``."""
    model, autocast = _eval_mode(setup)
    variants = [(b, c) for c in caches for b in batch_sizes]
    keys = [str(b) if c == "dynamic" else f"{b}-{c}" for b, c in variants]
    secs: dict[str, list[float]] = {k: [] for k in keys}
    out: dict[str, Any] = {}
    peak: dict[str, float] = {}  # GPU only: what a worker sharing the GPU must have free for this batch size
    first_call: dict[str, float] = {}

    def call(b: int, cache: str) -> Any:
        setup.extras["generation_cache"] = cache  # read by generation tasks only
        return task.evaluate_examples(setup, model, split, limit=limit, batch_size=b)

    with torch.no_grad(), autocast:
        for k, (b, c) in zip(keys, variants):  # warm-up, the outputs to compare and the peak memory
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            _sync()
            t0 = time.perf_counter()
            out[k] = call(b, c)
            _sync()
            first_call[k] = round(time.perf_counter() - t0, 2)
            if torch.cuda.is_available():
                peak[k] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            if setup.extras.pop("generation_cache_fallback", None):
                raise RuntimeError(f"the {c} cache fell back to dynamic at batch size {b}: nothing to compare")
        n = len(out[keys[0]][1]["pred"])
        order = list(zip(keys, variants))
        for r in range(rounds):
            for k, (b, c) in order[r % len(order):] + order[: r % len(order)]:
                _sync()
                t0 = time.perf_counter()
                call(b, c)
                _sync()
                secs[k].append((time.perf_counter() - t0) / n)
    setup.extras.pop("generation_cache", None)
    first = out[keys[0]][1]["pred"]
    return {
        "split": split, "examples": n, "batch_sizes": batch_sizes, "caches": list(caches),
        "s_per_example": {k: spread(v) for k, v in secs.items()},
        "speedup_vs_first": {k: spread([a / c for a, c in zip(secs[keys[0]], secs[k])]) for k in keys},
        "same_predictions_as_first": {k: sum(x == y for x, y in zip(first, out[k][1]["pred"])) / n for k in keys},
        "metrics": {k: out[k][0] for k in keys},
        "peak_mib": peak,
        "first_call_s": first_call,
    }


def measure_runs(suite_name: str, task_name: str, model: str, *, rounds: int, steps: int | None,
                 curve_limit: int | None) -> dict[str, Any]:
    """``eval_s / wall_s`` of one short run per mode and round (the suite's first lora run of the task)."""
    from benchmarks.runner import grid
    from benchmarks.runner.execute import make_resolver, resolve_task
    from benchmarks.runner.suite import load_suite
    from benchmarks.runner.train import train_run

    suite = load_suite(suite_name, methods=["lora"], tasks=[task_name], seeds=[0], models=[model])
    resolver = make_resolver(suite.task_paths)

    def info_of(name: str) -> grid.TaskFacts:
        t = resolve_task(resolver, {"task": name})
        return grid.TaskFacts(t.family, t.default_model, grid.task_fingerprint(t))

    base = grid.expand(suite, info_of)[0].config
    if steps is not None:
        base["training"]["steps"] = steps
    after_curve = curve_limit if curve_limit is not None else base["training"].get("curve_limit")
    shares: dict[str, list[float]] = {m: [] for m in MODES}
    walls: dict[str, list[float]] = {m: [] for m in MODES}
    for order in _interleaved(rounds):
        for m in order:
            config = json.loads(json.dumps(base))
            config["training"]["curve_limit"] = after_curve if m == "shared" else None
            task = resolve_task(resolver, config)
            task.share_context = m == "shared"
            perf = train_run(config, task, progress=False)["perf"]
            shares[m].append(perf["eval_s"] / perf["wall_s"])
            walls[m].append(perf["wall_s"])
    t = base["training"]
    return {
        "suite": suite_name, "task": task_name, "model": model, "method": "lora",
        "training": {k: t[k] for k in ("steps", "batch_size", "eval_every", "eval_limit", "test_limit", "eval_batch_size")},
        "curve_limit_after": after_curve,
        "eval_share": {m: spread(v) for m, v in shares.items()},
        "wall_s": {m: spread(v) for m, v in walls.items()},
        "share_ratio": spread([b / a for b, a in zip(shares["per_choice"], shares["shared"])]),
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default="sarcasm", help="a choice task (ChoiceTask)")
    p.add_argument("--limit", type=int, default=64, help="validation examples scored per round")
    p.add_argument("--batch-size", type=int, nargs="+", default=[16])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--runs", type=int, default=0, help="rounds of the run-level measurement (0: skip it)")
    p.add_argument("--suite", default="demo", help="suite whose training settings the short runs use")
    p.add_argument("--steps", type=int, default=None, help="override the suite's steps for the short runs")
    p.add_argument("--curve-limit", type=int, default=None, help="curve_limit of the 'after' runs (default: the suite's)")
    p.add_argument("--eval-batch-sizes", type=int, nargs="+", default=None,
                   help="instead: evaluation time per example at these eval_batch_size values, any task (VLM too)")
    p.add_argument("--split", default="validation", help="split of the --eval-batch-sizes measurement")
    p.add_argument("--generation-caches", nargs="+", default=["dynamic"], choices=GENERATION_CACHES,
                   help="generation tasks: time each --eval-batch-sizes value with each KV cache (static: compiled "
                        "decoding on a GPU; static-eager: the static cache uncompiled)")
    p.add_argument("--adapter", default=None, metavar="METHOD",
                   help="evaluate the model with this method's fresh adapter on gate, up and down (rank 8; the "
                        "runs' own layers, whose operators an eager decoding step launches too); default: the bare model")
    p.add_argument("--max-seqs-per-forward", type=int, default=None,
                   help="for this measurement only, the VLM QA tasks' cap on choice sequences per forward "
                        "(tasks/vlm/qa.py MAX_SEQS_PER_FORWARD, 2560: 256 images of 10 classes). It is part of those "
                        "tasks' definition, so changing it in the code gives every VLM run a new id")
    p.add_argument("--out", default=None, help="write the JSON here")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    a = p.parse_args(argv)
    if a.rounds < 1 or a.limit < 1 or a.runs < 0 or min(a.batch_size) < 1:
        p.error("--rounds, --limit and --batch-size must be >= 1, --runs >= 0")
    from tasks.llm.lm import ChoiceTask
    from tasks.registry import get_task, load_tasks

    load_tasks()
    task = get_task(a.task)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.eval_batch_sizes:
        if min(a.eval_batch_sizes) < 1:
            p.error("--eval-batch-sizes must be >= 1")
        if a.max_seqs_per_forward is not None:
            import tasks.vlm.qa as qa

            if a.max_seqs_per_forward < 1:
                p.error("--max-seqs-per-forward must be >= 1")
            qa.MAX_SEQS_PER_FORWARD = a.max_seqs_per_forward
        setup = task.setup(a.model, device=device)
        if a.adapter:
            from nalora import inject

            setup.model = inject(setup.model, a.adapter, targets=("gate", "up", "down")).model
        rec = {"model": a.model, "task": a.task, "torch_threads": torch.get_num_threads(),
               "max_seqs_per_forward": a.max_seqs_per_forward, "adapter": a.adapter,
               "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
               "eval_batches": measure_eval_batches(task, setup, split=a.split, limit=a.limit,
                                                    batch_sizes=a.eval_batch_sizes, rounds=a.rounds,
                                                    caches=tuple(a.generation_caches))}
        return _emit(rec, a.out)
    if not isinstance(task, ChoiceTask):
        p.error(f"task {a.task!r} is not a choice task scored by log-likelihood")
    setup = task.setup(a.model, device=device)
    rec: dict[str, Any] = {
        "model": a.model, "task": a.task, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "scoring": [measure_scoring(task, setup, limit=a.limit, batch_size=bs, rounds=a.rounds) for bs in a.batch_size],
    }
    del setup
    if a.runs:
        rec["runs"] = measure_runs(a.suite, a.task, a.model, rounds=a.runs, steps=a.steps, curve_limit=a.curve_limit)
    return _emit(rec, a.out)


def _emit(rec: dict[str, Any], out: str | None) -> int:
    text = json.dumps(rec, indent=2)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
