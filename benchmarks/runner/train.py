"""One run: adapt, train for a fixed number of optimiser steps, evaluate, diagnose.

nanoGPT-style: one readable loop. accelerate places the model (and wraps it for data parallelism
under ``accelerate launch``); the task owns data, loss and metrics; the method owns its optimiser.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from benchmarks.runner import health
from benchmarks.runner.compiled import dynamo_graphs, eager_mode, pad_to_bucket, prepare_model, step_options
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


def train_run(config: dict, task: Task, *, injector: Callable[..., Any] | None = None, deadline: float | None = None,
              progress: bool = True, position: int = 0) -> dict[str, Any]:
    """Train and evaluate one run described by ``config`` (see ``record.py``); returns its results.

    Raises on failure (the caller records it): ``Diverged`` for a NaN/inf loss or gradient. A run that trains
    to the end gets ``result["status"]`` ("ok" or "collapsed", ``health.assess``) and ``result["health"]``.
    Works in one process and under ``accelerate launch``
    (each process trains on its own data stream; evaluation runs on the main process).
    """
    from accelerate import Accelerator
    from transformers import get_cosine_schedule_with_warmup, set_seed

    t_start = time.time()
    # The run config is complete (suite.py validates it against TrainingConfig / AdapterConfig; every default
    # lives in benchmarks/suites/defaults.yaml): no fallbacks here.
    tr, ad = config["training"], config["adapter"]
    steps, ga = int(tr["steps"]), int(tr["grad_accum"])
    from accelerate.state import AcceleratorState, GradientState

    # Several runs share one process (grid, worker): each may set its own precision. The process/distributed
    # state (PartialState) is kept; only the per-run accelerator state is reset.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    accelerator = Accelerator(mixed_precision=_mixed_precision(tr["mixed_precision"]))
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats()
    device = accelerator.device

    setup = task.setup(config["model"], device=device)
    # Every method that moves the gate weights: adapters on the gate, and full fine-tuning.
    touches_gate = config["base_method"] == "full" or (config["base_method"] != "head" and "gate" in ad["targets"])
    want_diag = tr["diag_batches"] and touches_gate
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
    prep = prepare_model(model, **step_options(tr), method=config["base_method"],
                         mixed_precision=accelerator.mixed_precision)
    graphs_before = dynamo_graphs() if prep.compiled else 0  # compiling is lazy: the graphs come with the first step
    setup.extras["generation_cache"] = prep.generation_cache  # read by generation tasks (GenerationTask)
    unwrapped = accelerator.unwrap_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable, total = adapted.num_trainable(), sum(p.numel() for p in unwrapped.parameters())

    val_limit, test_limit = tr["eval_limit"], tr["test_limit"]
    curve_limit = curve_examples(val_limit, tr.get("curve_limit"))  # absent: a run config from before the key
    eval_bs, eval_every, log_every = tr["eval_batch_size"], tr["eval_every"], tr["log_every"]
    # Gradient norms are checked on every step but synchronised with the host only at log steps (and the last).
    # Under fp16 the loss scaler skips steps with inf gradients by design, so only the loss is checked there.
    check_grads = accelerator.scaler is None
    max_norm = tr["max_grad_norm"] if tr["max_grad_norm"] is not None else float("inf")
    grads_bad = torch.zeros((), dtype=torch.bool, device=device)
    history: dict[str, list] = {"train_loss": [], "validation": [], "lr": []}
    data = task.train_batches(setup, tr["batch_size"], config["seed"] + 7919 * accelerator.process_index)
    units, eval_s, unit = 0, 0.0, None
    loss_sum, loss_n = torch.zeros((), device=device), 0
    bar = tqdm(total=steps, desc=f"{config['method']} {config['task']} s{config['seed']} lr{config['lr']:g}",
               leave=False, position=position, disable=not (progress and accelerator.is_main_process))
    model.train()
    t_train = time.time()
    for step in range(1, steps + 1):
        for micro in range(ga):
            host_batch = pad_to_bucket(next(data), tr["seq_bucket"])
            # Counted on the host copy: on the device, Task.units' .sum() would synchronise every step.
            units += task.units(host_batch)
            batch = _to_device(host_batch, device)
            if unit is None:  # what Task.units counts (its default: real tokens if there is a mask, else images)
                unit = getattr(task, "unit", None) or ("tokens" if isinstance(batch, dict) and "attention_mask" in batch else "images")
            # Gradients are all-reduced only on the last micro-batch of an optimiser step.
            sync = contextlib.nullcontext() if micro == ga - 1 else accelerator.no_sync(model)
            with sync, accelerator.autocast():
                loss = task.loss(setup, model, batch) / ga
                accelerator.backward(loss)
            loss_sum += loss.detach().float()
        loss_n += 1
        # max_norm inf (max_grad_norm null) clips nothing but still gives the total norm for the check.
        total_norm = accelerator.clip_grad_norm_(params, max_norm)
        if check_grads and total_norm is not None:
            grads_bad |= ~torch.isfinite(torch.as_tensor(total_norm, device=device))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.update(1)
        # Host sync only every log_every steps (and the last): that is where a NaN loss or gradient is caught.
        if step % log_every == 0 or step == steps:
            mean_loss = float(loss_sum) / loss_n
            if not math.isfinite(mean_loss):
                raise Diverged(f"training loss is {mean_loss} at step {step}")
            if bool(grads_bad):
                raise Diverged(f"non-finite gradient norm at or before step {step} (loss {mean_loss:.4g})")
            history["train_loss"].append([step, mean_loss])
            history["lr"].append([step, scheduler.get_last_lr()[0]])
            bar.set_postfix(loss=f"{mean_loss:.4f}")
            loss_sum.zero_()
            loss_n = 0
        if eval_every and step % eval_every == 0 and step != steps and accelerator.is_main_process:
            t0 = time.time()
            history["validation"].append([step, _evaluate(task, setup, unwrapped, accelerator, "validation", curve_limit, eval_bs,
                                                          progress=progress, position=position, deadline=deadline)[0]])
            eval_s += time.time() - t0
        if deadline is not None and time.time() > deadline:
            raise RunInterrupted(f"time budget ran out at step {step}/{steps}, {time.time() - t_train:.0f} s in "
                                 f"({eval_s:.0f} s of them evaluating)")
    bar.close()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    train_s = time.time() - t_train - eval_s

    result: dict[str, Any] = {"trainable_params": trainable, "total_params": total, "adapted_modules": list(adapted.report),
                              "weight_files": list(setup.files)}  # for the record's provenance (execute.py)
    if tower_lr:
        result["tower_lr"] = tower_lr
    if adapted.controller is not None:
        result["nalora"] = {"history": adapted.controller.history()}
    adapted.finalize()  # NA-LoRA folds its mask: what is evaluated is exactly the adapter that is saved

    metrics: dict[str, dict] = {}
    if accelerator.is_main_process:
        t0 = time.time()
        per_example: dict[str, dict] = {}
        for split, limit in (("validation", val_limit), ("test", test_limit)):
            metrics[split], examples = _evaluate(task, setup, unwrapped, accelerator, split, limit, eval_bs, per_example=True,
                                                 progress=progress, position=position, deadline=deadline)
            if examples:
                per_example[split] = health.compact(examples)
        history["validation"].append([steps, metrics["validation"]])
        eval_s += time.time() - t0
        if per_example:
            result["per_example"] = per_example
        result["health"] = health.assess(
            val_metrics=metrics["validation"], selection_metric=task.selection_metric, chance=task.chance(),
            per_example=per_example.get("validation"),
            final_train_loss=history["train_loss"][-1][1] if history["train_loss"] else None)
        result["status"] = "collapsed" if result["health"]["collapsed"] else "ok"
        if want_diag:
            try:
                batches, source = _heldout_batches(task, setup, tr["diag_batches"], tr["batch_size"], config["seed"])
                result["diagnostics"] = {"selection_misalignment": _misalignment(unwrapped, ffns, batches, device, reference), "source": source}
            except Exception as err:  # noqa: BLE001 - a diagnostic must never fail the run
                result["diagnostics"] = {"selection_misalignment": {"error": f"{type(err).__name__}: {err}"}, "source": ""}
    accelerator.wait_for_everyone()

    n_proc = accelerator.num_processes
    result["metrics"] = metrics
    result["history"] = history
    result["perf"] = {
        "wall_s": time.time() - t_start,
        "train_s": train_s,
        "eval_s": eval_s,
        "step_time_s": train_s / steps,
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

