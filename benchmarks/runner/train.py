"""One run: adapt, train for a fixed number of optimiser steps, evaluate, diagnose.

nanoGPT-style: one readable loop. accelerate places the model (and wraps it for data parallelism
under ``accelerate launch``); the task owns data, loss and metrics; the method owns its optimiser.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from benchmarks.runner import health
from benchmarks.runner.compiled import dynamo_graphs, eager_mode, pad_to_bucket, prepare_model, step_options
from benchmarks.runner.grid import STACK_FREE_KEYS, stack_key
from nalora.diagnostics import snapshot_trainable
from tasks.base import Task


class Diverged(RuntimeError):
    """The training loss or the gradients became NaN or infinite: the run is recorded ``diverged``."""


NonFiniteLoss = Diverged  # the name before gradients were checked too; kept for callers that catch it


class RunInterrupted(RuntimeError):
    """The invocation's time budget ran out mid-run; the run is not recorded and will be redone."""


def default_injector() -> Callable[..., Any]:
    from nalora.injection import inject

    return inject


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _mixed_precision(setting: str | None) -> str:
    # bf16 on GPUs that have it; plain fp32 on CPU (bf16 autocast on CPU is slow and not what users run).
    if setting in (None, "auto"):
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return setting


def _generation_fallback(setup: Any) -> dict[str, str]:
    """The record's generation-cache keys when the run's static cache fell back (GenerationTask), else none."""
    reason = setup.extras.get("generation_cache_fallback")
    return {"generation_cache": "dynamic", "generation_cache_reason": reason} if reason else {}


def _evaluate(task: Task, setup: Any, model: torch.nn.Module, accelerator: Any, split: str, limit: int | None, bs: int,
              per_example: bool = False, progress: bool = False, position: int = 0,
              deadline: float | None = None) -> tuple[dict, dict | None]:
    """``(metrics, per_example)``; per-example results (``Task.evaluate_examples``) only when asked and given.
    ``progress``: a bar counting forward passes, so that a long evaluation is never silent. ``deadline``: the
    time budget's end, checked before every forward (a generation task's evaluation can outlast a GPU call)."""
    from benchmarks.runner.progress import eval_progress, forward_module

    was_training = model.training
    model.eval()
    examples = None
    t0, forwards = time.time(), [0]

    @torch.compiler.disable  # a compiled generation step (static cache) calls it eagerly, never traced
    def check_deadline(module: torch.nn.Module, args: Any) -> None:
        forwards[0] += 1
        if time.time() > deadline:
            raise RunInterrupted(f"time budget ran out {time.time() - t0:.0f} s into the {split} evaluation "
                                 f"({forwards[0] - 1} forwards done)")

    hook = forward_module(model).register_forward_pre_hook(check_deadline) if deadline is not None else None
    try:
        with torch.no_grad(), accelerator.autocast(), eager_mode(model), \
                eval_progress(model, f"  eval {split}", progress, position + 1):
            fn = getattr(task, "evaluate_examples", None)
            if per_example and callable(fn):
                out, examples = fn(setup, model, split, limit=limit, batch_size=bs)
            else:
                out = task.evaluate(setup, model, split, limit=limit, batch_size=bs)
    finally:
        if hook is not None:
            hook.remove()
        model.train(was_training)
    return {k: float(v) for k, v in out.items()}, examples


def curve_examples(eval_limit: int | None, curve_limit: int | None) -> int | None:
    """Validation examples of a periodic evaluation: ``curve_limit`` capped at ``eval_limit`` (None = all).
    Tasks take the first ``limit`` of one fixed permutation, so the curve subset is nested in the final one."""
    if curve_limit is None:
        return eval_limit
    return curve_limit if eval_limit is None else min(curve_limit, eval_limit)


def _heldout_batches(task: Task, setup: Any, n: int, batch_size: int, seed: int) -> tuple[list, str]:
    """A few batches for the misalignment diagnostic: the task's held-out batches when it offers them."""
    fn = getattr(task, "heldout_batches", None)
    if callable(fn):
        return list(fn(setup, n=n, batch_size=batch_size)), "validation"
    # Fallback for plugins without held-out batches: a training stream with a seed the run never used (fresh
    # order, same distribution, but examples training may have seen). Labelled so tables can tell.
    it = task.train_batches(setup, batch_size, seed + 1_000_003)
    return [next(it) for _ in range(n)], "train-stream-fallback"


def _gated_ffns(model: torch.nn.Module) -> list | None:
    """The gated FFNs of the *unadapted* model (discovery does not see through peft's wrapped Linears)."""
    try:
        from nalora.discovery import find_gated_ffns

        return find_gated_ffns(model)
    except Exception:  # noqa: BLE001 - only the diagnostic needs them
        return None


def _misalignment(model: torch.nn.Module, ffns: list | None, batches: list, device: torch.device,
                  reference: dict[str, torch.Tensor]) -> dict:
    from nalora.diagnostics import selection_misalignment

    # Module paths are unchanged under peft (base_model.model is the original model, Linears wrapped in place).
    batches = [_to_device(b, device) for b in batches]
    # Eagerly, like evaluation: its no-grad forwards build a KV cache, and compiled blocks would then compile one
    # graph per layer (dynamo guards on each layer's cache entry), enough to reset the graphs a worker keeps.
    with eager_mode(model):
        return dict(selection_misalignment(model, ffns or [], batches, reference=reference))


def shared_lr_group(optimizer: torch.optim.Optimizer, model: torch.nn.Module, paths: list[str], lr: float) -> int:
    """Move the parameters of the modules ``paths`` (a task's shared trainables, e.g. the VLM connector, also
    under peft's ``modules_to_save`` copy) into one param group at the fixed ``lr``; returns how many moved.
    Call before the scheduler is built and before the first step (the group's lr is its schedule's base)."""
    def shared(name: str) -> bool:
        parts = name.split(".")
        return any(p.split(".") == parts[i:i + len(p.split("."))] for p in paths for i in range(len(parts)))

    ids = {id(p) for n, p in model.named_parameters() if p.requires_grad and shared(n)}
    if not ids:
        return 0
    moved = []
    for group in optimizer.param_groups:
        keep = [p for p in group["params"] if id(p) not in ids]
        moved += [p for p in group["params"] if id(p) in ids]
        group["params"] = keep
    optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
    wd = optimizer.param_groups[0]["weight_decay"] if optimizer.param_groups else 0.0
    optimizer.add_param_group({"params": moved, "lr": lr, "weight_decay": wd})
    return len(moved)


@dataclass
class _Run:
    """One run between its build and its record: what ``_finish_run`` needs besides the training loop's totals."""

    config: dict
    task: Task
    setup: Any
    adapted: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    model: torch.nn.Module  # as accelerate prepared it (wrapped under data parallelism)
    unwrapped: torch.nn.Module
    params: list[torch.nn.Parameter]
    want_diag: bool
    ffns: list | None
    reference: dict | None
    tower_lr: dict | None
    trainable: int
    total: int
    history: dict[str, list] = field(default_factory=lambda: {"train_loss": [], "validation": [], "lr": []})
    eval_s: float = 0.0


def _accelerator(tr: dict) -> Any:
    """A fresh accelerate state for a run (several runs share one process: grid, worker), its own precision."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # The process/distributed state (PartialState) is kept; only the per-run accelerator state is reset.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    accelerator = Accelerator(mixed_precision=_mixed_precision(tr["mixed_precision"]))
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats()
    return accelerator


def _build_run(config: dict, task: Task, accelerator: Any, injector: Callable[..., Any] | None,
               setup: Any = None) -> _Run:
    """Set up, adapt (the seed fixes the adapter init), build the optimiser and scheduler, and let accelerate
    place the model. ``setup``: the task's setup to adapt (stacked runs pass copies sharing one base model)."""
    from transformers import get_cosine_schedule_with_warmup, set_seed

    # The run config is complete (suite.py validates it against TrainingConfig / AdapterConfig; every default
    # lives in benchmarks/suites/defaults.yaml): no fallbacks here.
    tr, ad = config["training"], config["adapter"]
    steps = int(tr["steps"])
    device = accelerator.device
    setup = setup if setup is not None else task.setup(config["model"], device=device)
    # Every method that moves the gate weights: adapters on the gate, and full fine-tuning.
    touches_gate = config["base_method"] == "full" or (config["base_method"] != "head" and "gate" in ad["targets"])
    want_diag = bool(tr["diag_batches"] and touches_gate)
    ffns = _gated_ffns(setup.model) if want_diag else None
    set_seed(config["seed"])  # before adapters are initialised: the seed fixes the adapter init
    inject = injector or default_injector()
    adapted = inject(
        setup.model, config["base_method"], targets=tuple(ad["targets"]), towers=tuple(ad["towers"]),
        rank=ad["rank"], alpha=ad["alpha"], dropout=ad["dropout"], trainable=list(setup.trainable),
        method_options=dict(config["options"]),
    )
    adapted.model.to(device)
    # The diagnostic measures against the model as it was before training (not "adapter off": PiSSA's base is
    # a residual, and full fine-tuning has no adapter to switch off).
    reference = snapshot_trainable(adapted.model) if want_diag else None
    # Absent from configs without multipliers (grid.py drops an empty one, so those runs keep their ids); passed
    # only when set, so that a plugin injector's own Adapted without the keyword keeps working.
    scales = ad.get("tower_lr_scale")
    optimizer = adapted.make_optimizer(config["lr"], tr["weight_decay"], total_steps=steps,
                                       **({"tower_lr_scale": scales} if scales else {}))
    tower_lr = getattr(adapted, "tower_lr", None)
    if scales and not tower_lr:  # a make_optimizer that swallowed the keyword: never train without it silently
        raise ValueError(f"adapter.tower_lr_scale {scales} was not applied by {type(adapted).__name__}.make_optimizer")
    if setup.trainable_lr is not None and getattr(adapted.method, "uses_adapters", True):
        shared_lr_group(optimizer, adapted.model, list(setup.trainable), float(setup.trainable_lr))
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(tr["warmup_ratio"] * steps), steps)
    model = accelerator.prepare(adapted.model)
    unwrapped = accelerator.unwrap_model(model)
    return _Run(config=config, task=task, setup=setup, adapted=adapted, optimizer=optimizer, scheduler=scheduler,
                model=model, unwrapped=unwrapped, params=[p for p in model.parameters() if p.requires_grad],
                want_diag=want_diag, ffns=ffns, reference=reference, tower_lr=tower_lr,
                trainable=adapted.num_trainable(), total=sum(p.numel() for p in unwrapped.parameters()))


def _log_step(run: _Run, step: int, mean_loss: float, grads_bad: bool) -> None:
    """A log step's check and history entry: ``Diverged`` for a NaN/inf loss or gradient."""
    if not math.isfinite(mean_loss):
        raise Diverged(f"training loss is {mean_loss} at step {step}")
    if grads_bad:
        raise Diverged(f"non-finite gradient norm at or before step {step} (loss {mean_loss:.4g})")
    run.history["train_loss"].append([step, mean_loss])
    run.history["lr"].append([step, run.scheduler.get_last_lr()[0]])


def _curve_eval(run: _Run, accelerator: Any, step: int, *, progress: bool, position: int,
                deadline: float | None) -> None:
    """A periodic validation point of the learning curve (main process)."""
    tr = run.config["training"]
    t0 = time.time()
    limit = curve_examples(tr["eval_limit"], tr.get("curve_limit"))  # absent: a run config from before the key
    run.history["validation"].append([step, _evaluate(run.task, run.setup, run.unwrapped, accelerator, "validation",
                                                      limit, tr["eval_batch_size"], progress=progress,
                                                      position=position, deadline=deadline)[0]])
    run.eval_s += time.time() - t0


def _synced_since(t0: float) -> float:
    """Seconds since ``t0`` once the GPU has run what is queued: one synchronisation, after the first step (its
    compile, when the step is compiled, and its kernels)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.time() - t0


def _finish_run(run: _Run, accelerator: Any, *, train_s: float, units: int, unit: str | None, prep: Any,
                graphs_before: int, t_start: float, deadline: float | None, progress: bool,
                position: int, timing: dict[str, float | None] | None = None) -> dict[str, Any]:
    """After the last step: fold, evaluate, assess health, diagnose; the run's results (see ``train_run``)."""
    config, task, setup, adapted, unwrapped = run.config, run.task, run.setup, run.adapted, run.unwrapped
    tr, history, steps = config["training"], run.history, int(config["training"]["steps"])
    result: dict[str, Any] = {"trainable_params": run.trainable, "total_params": run.total,
                              "adapted_modules": list(adapted.report),
                              "weight_files": list(setup.files)}  # for the record's provenance (execute.py)
    if run.tower_lr:
        result["tower_lr"] = run.tower_lr
    if adapted.controller is not None:
        result["nalora"] = {"history": adapted.controller.history()}
    adapted.finalize()  # NA-LoRA folds its mask: what is evaluated is exactly the adapter that is saved

    metrics: dict[str, dict] = {}
    device = accelerator.device
    if accelerator.is_main_process:
        t0 = time.time()
        per_example: dict[str, dict] = {}
        for split, limit in (("validation", tr["eval_limit"]), ("test", tr["test_limit"])):
            metrics[split], examples = _evaluate(task, setup, unwrapped, accelerator, split, limit,
                                                 tr["eval_batch_size"], per_example=True, progress=progress,
                                                 position=position, deadline=deadline)
            if examples:
                per_example[split] = health.compact(examples)
        history["validation"].append([steps, metrics["validation"]])
        run.eval_s += time.time() - t0
        if per_example:
            result["per_example"] = per_example
        result["health"] = health.assess(
            val_metrics=metrics["validation"], selection_metric=task.selection_metric, chance=task.chance(),
            per_example=per_example.get("validation"),
            final_train_loss=history["train_loss"][-1][1] if history["train_loss"] else None)
        result["status"] = "collapsed" if result["health"]["collapsed"] else "ok"
        if run.want_diag:
            try:
                batches, source = _heldout_batches(task, setup, tr["diag_batches"], tr["batch_size"], config["seed"])
                result["diagnostics"] = {"selection_misalignment": _misalignment(unwrapped, run.ffns, batches, device,
                                                                                 run.reference), "source": source}
            except Exception as err:  # noqa: BLE001 - a diagnostic must never fail the run
                result["diagnostics"] = {"selection_misalignment": {"error": f"{type(err).__name__}: {err}"}, "source": ""}
    accelerator.wait_for_everyone()

    n_proc = accelerator.num_processes
    result["metrics"] = metrics
    result["history"] = history
    result["perf"] = {
        "wall_s": time.time() - t_start,
        "train_s": train_s,
        "eval_s": run.eval_s,
        "step_time_s": train_s / steps,
        # where the start goes: building the run (model load, injection, step set-up) and the first step
        **(timing or {}),
        "units": units * n_proc,
        "units_per_s": units * n_proc / train_s if train_s > 0 else None,
        "unit": unit,
        "peak_gpu_mem_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "mixed_precision": accelerator.mixed_precision,
        "num_processes": n_proc,
        # graphs this run compiled (train, evaluation, diagnostics): 0 where a worker's kept graphs served it all
        "step": {**prep.to_dict(), "graphs_built": dynamo_graphs() - graphs_before if prep.compiled else 0,
                 **_generation_fallback(setup)},
    }
    return result


def _unit_of(task: Task, batch: Any) -> str:
    """What ``Task.units`` counts (its default: real tokens if there is a mask, else images)."""
    return getattr(task, "unit", None) or ("tokens" if isinstance(batch, dict) and "attention_mask" in batch else "images")


def train_run(config: dict, task: Task, *, injector: Callable[..., Any] | None = None, deadline: float | None = None,
              progress: bool = True, position: int = 0) -> dict[str, Any]:
    """Train and evaluate one run described by ``config`` (see ``record.py``); returns its results.

    Raises on failure (the caller records it): ``Diverged`` for a NaN/inf loss or gradient. A run that trains
    to the end gets ``result["status"]`` ("ok" or "collapsed", ``health.assess``) and ``result["health"]``.
    Works in one process and under ``accelerate launch``
    (each process trains on its own data stream; evaluation runs on the main process).
    """
    t_start = time.time()
    tr = config["training"]
    steps, ga = int(tr["steps"]), int(tr["grad_accum"])
    accelerator = _accelerator(tr)
    device = accelerator.device
    run = _build_run(config, task, accelerator, injector)
    model, optimizer, scheduler, setup = run.model, run.optimizer, run.scheduler, run.setup
    prep = prepare_model(model, **step_options(tr), method=config["base_method"],
                         mixed_precision=accelerator.mixed_precision)
    graphs_before = dynamo_graphs() if prep.compiled else 0  # compiling is lazy: the graphs come with the first step
    setup.extras["generation_cache"] = prep.generation_cache  # read by generation tasks (GenerationTask)

    eval_every, log_every = tr["eval_every"], tr["log_every"]
    # Gradient norms are checked on every step but synchronised with the host only at log steps (and the last).
    # Under fp16 the loss scaler skips steps with inf gradients by design, so only the loss is checked there.
    check_grads = accelerator.scaler is None
    max_norm = tr["max_grad_norm"] if tr["max_grad_norm"] is not None else float("inf")
    grads_bad = torch.zeros((), dtype=torch.bool, device=device)
    data = task.train_batches(setup, tr["batch_size"], config["seed"] + 7919 * accelerator.process_index)
    units, unit = 0, None
    loss_sum, loss_n = torch.zeros((), device=device), 0
    bar = tqdm(total=steps, desc=f"{config['method']} {config['task']} s{config['seed']} lr{config['lr']:g}",
               leave=False, position=position, disable=not (progress and accelerator.is_main_process))
    model.train()
    first_step_s: float | None = None
    t_train = time.time()
    for step in range(1, steps + 1):
        for micro in range(ga):
            host_batch = pad_to_bucket(next(data), tr["seq_bucket"])
            # Counted on the host copy: on the device, Task.units' .sum() would synchronise every step.
            units += task.units(host_batch)
            batch = _to_device(host_batch, device)
            unit = unit or _unit_of(task, batch)
            # Gradients are all-reduced only on the last micro-batch of an optimiser step.
            sync = contextlib.nullcontext() if micro == ga - 1 else accelerator.no_sync(model)
            with sync, accelerator.autocast():
                loss = task.loss(setup, model, batch) / ga
                accelerator.backward(loss)
            loss_sum += loss.detach().float()
        loss_n += 1
        # max_norm inf (max_grad_norm null) clips nothing but still gives the total norm for the check.
        total_norm = accelerator.clip_grad_norm_(run.params, max_norm)
        if check_grads and total_norm is not None:
            grads_bad |= ~torch.isfinite(torch.as_tensor(total_norm, device=device))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.update(1)
        if step == 1:
            first_step_s = _synced_since(t_train)
        # Host sync only every log_every steps (and the last): that is where a NaN loss or gradient is caught.
        if step % log_every == 0 or step == steps:
            mean_loss = float(loss_sum) / loss_n
            _log_step(run, step, mean_loss, bool(grads_bad))
            bar.set_postfix(loss=f"{mean_loss:.4f}")
            loss_sum.zero_()
            loss_n = 0
        if eval_every and step % eval_every == 0 and step != steps and accelerator.is_main_process:
            _curve_eval(run, accelerator, step, progress=progress, position=position, deadline=deadline)
        if deadline is not None and time.time() > deadline:
            raise RunInterrupted(f"time budget ran out at step {step}/{steps}, {time.time() - t_train:.0f} s in "
                                 f"({run.eval_s:.0f} s of them evaluating)")
    bar.close()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    train_s = time.time() - t_train - run.eval_s
    return _finish_run(run, accelerator, train_s=train_s, units=units, unit=unit, prep=prep,
                       graphs_before=graphs_before, t_start=t_start, deadline=deadline, progress=progress,
                       position=position, timing={"setup_s": t_train - t_start, "first_step_s": first_step_s})


def _cat_batches(batches: list[Any]) -> Any:
    """The runs' host batches as one: each right-padded to the longest (``pad_to_bucket``), then concatenated."""
    from benchmarks.runner.stacked import NotStackable

    if not all(isinstance(b, dict) and torch.is_tensor(b.get("input_ids")) for b in batches):
        raise NotStackable("stacking needs dict batches with input_ids")
    length = max(b["input_ids"].shape[1] for b in batches)
    padded = [pad_to_bucket(b, length) for b in batches]
    keys = set(padded[0])
    if any(set(b) != keys for b in padded) or not all(torch.is_tensor(v) for b in padded for v in b.values()):
        raise NotStackable(f"stacking needs batches of tensors with the same keys, got {sorted(keys)}")
    return {k: torch.cat([b[k] for b in padded]) for k in padded[0]}


def train_stacked(configs: list[dict], task: Task, *, injector: Callable[..., Any] | None = None,
                  deadline: float | None = None, progress: bool = True,
                  position: int = 0) -> list[dict[str, Any] | BaseException]:
    """Train the runs ``configs`` (equal ``stack_key``: they differ in seed and lr) together through one model
    (``benchmarks.runner.stacked.stack_runs``: one base forward, each run its own adapters, optimiser, scheduler,
    clip and NA-LoRA controller), then evaluate each on its own model as ``train_run`` does. Returns, per config,
    its results (as ``train_run``'s, with ``perf.stacked``) or the exception that ended it (``Diverged``: that run
    stops stepping, the others go on). Raises ``RunInterrupted`` for all when the time budget runs out, and
    ``NotStackable`` (a one-line ``ValueError``) before any step for runs that cannot be stacked (the caller then
    trains them one by one). One process only."""
    import dataclasses

    from benchmarks.runner.stacked import NotStackable, shared_copy, stack_runs, stacked_losses

    if len(configs) < 2 or len({stack_key(c) for c in configs}) != 1:
        raise NotStackable("train_stacked needs 2 or more runs that differ only in " + " and ".join(STACK_FREE_KEYS))
    t_start = time.time()
    tr = configs[0]["training"]
    steps, ga, k = int(tr["steps"]), int(tr["grad_accum"]), len(configs)
    accelerator = _accelerator(tr)
    if accelerator.num_processes != 1:
        raise NotStackable("stacked runs train in one process (not under accelerate launch)")
    device = accelerator.device
    first = task.setup(configs[0]["model"], device=device)
    # before any run is adapted: the others' models share its tensors, not its (then wrapped) modules
    setups = [first] + [dataclasses.replace(first, model=shared_copy(first.model), extras=dict(first.extras))
                        for _ in configs[1:]]
    runs = [_build_run(c, task, accelerator, injector, setup=s) for c, s in zip(configs, setups)]
    model = stack_runs([r.adapted for r in runs])
    prep = prepare_model(model, **step_options(tr), method=configs[0]["base_method"],
                         mixed_precision=accelerator.mixed_precision)
    graphs_before = dynamo_graphs() if prep.compiled else 0
    for r in runs:
        r.setup.extras["generation_cache"] = prep.generation_cache

    eval_every, log_every = tr["eval_every"], tr["log_every"]
    check_grads = accelerator.scaler is None
    max_norm = tr["max_grad_norm"] if tr["max_grad_norm"] is not None else float("inf")
    grads_bad = torch.zeros(k, dtype=torch.bool, device=device)
    data = [task.train_batches(r.setup, tr["batch_size"], r.config["seed"]) for r in runs]
    units, unit = [0] * k, None
    loss_sum, loss_n = torch.zeros(k, device=device), 0
    ended: dict[int, BaseException] = {}
    c0 = configs[0]
    bar = tqdm(total=steps, desc=f"{c0['method']} {c0['task']} x{k} stacked", leave=False, position=position,
               disable=not progress)
    model.train()
    first_step_s: float | None = None
    t_train = time.time()
    for step in range(1, steps + 1):
        for _ in range(ga):
            hosts = [pad_to_bucket(next(d), tr["seq_bucket"]) for d in data]
            for i, h in enumerate(hosts):
                units[i] += task.units(h)
            batch = _to_device(_cat_batches(hosts), device)
            unit = unit or _unit_of(task, batch)
            with accelerator.autocast():
                loss = task.loss(first, model, batch) / ga
                per_run = stacked_losses(model)
                if per_run is None:  # such a task fails at its first forward, before any step: train one by one
                    raise NotStackable(f"task {getattr(task, 'name', type(task).__name__)!r}: its loss does not "
                                       "come from the model's labels, so it cannot be split by run")
                accelerator.backward(loss)
            loss_sum += per_run.float() / ga
        loss_n += 1
        for i, r in enumerate(runs):
            if i in ended:
                r.optimizer.zero_grad(set_to_none=True)
                continue
            total_norm = accelerator.clip_grad_norm_(r.params, max_norm)
            if check_grads and total_norm is not None:
                grads_bad[i] |= ~torch.isfinite(torch.as_tensor(total_norm, device=device))
            r.optimizer.step()
            r.scheduler.step()
            r.optimizer.zero_grad(set_to_none=True)
        bar.update(1)
        if step == 1:
            first_step_s = _synced_since(t_train)
        if step % log_every == 0 or step == steps:
            means, bad = (loss_sum / loss_n).tolist(), grads_bad.tolist()
            for i, r in enumerate(runs):
                if i not in ended:
                    try:
                        _log_step(r, step, means[i], bad[i])
                    except Diverged as err:
                        ended[i] = err
            loss_sum.zero_()
            loss_n = 0
        if eval_every and step % eval_every == 0 and step != steps:
            for i, r in enumerate(runs):
                if i not in ended:
                    _curve_eval(r, accelerator, step, progress=progress, position=position, deadline=deadline)
        if deadline is not None and time.time() > deadline:
            raise RunInterrupted(f"time budget ran out at step {step}/{steps} of {k} stacked runs, "
                                 f"{time.time() - t_train:.0f} s in")
        if len(ended) == k:
            break
    bar.close()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    train_s = time.time() - t_train - sum(r.eval_s for r in runs)
    out: list[dict[str, Any] | BaseException] = []
    for i, r in enumerate(runs):
        if i in ended:
            out.append(ended[i])
            continue
        result = _finish_run(r, accelerator, train_s=train_s, units=units[i], unit=unit, prep=prep,
                             graphs_before=graphs_before, t_start=t_start, deadline=deadline, progress=progress,
                             position=position, timing={"setup_s": t_train - t_start, "first_step_s": first_step_s})
        # the process's peak is the stack's, not one run's: kept under perf.stacked, none per run
        result["perf"]["stacked"] = {"runs": k, "index": i, "peak_gpu_mem_mib": result["perf"]["peak_gpu_mem_mib"]}
        result["perf"]["peak_gpu_mem_mib"] = None
        out.append(result)
    return out
