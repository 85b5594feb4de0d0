"""The run JSON schema (``results/<suite>/runs/<run_id>.json``) and the leaderboard columns built from it.

A record is a plain dict::

    schema            RECORD_SCHEMA version (2: resolved config, status collapsed/diverged, health, per_example)
    run_id            16 hex digits, sha256 of ``config``
    status            "ok" | "collapsed" | "diverged" | "failed"   (only "ok" runs are selectable)
    error             null, or {"type": "nan_loss"|"oom"|"bad_config"|"exception", "message": str}
    config            the whole resolved configuration: model, task, method (label), base_method, seed, lr,
                      adapter{targets,towers,rank,alpha,dropout[,tower_lr_scale]}, options (every method option, defaults
                      filled), training{every key of TrainingConfig}, task_fingerprint
    meta              suite, phase ("main"|"tune"), family, lr_grid (this cell's lrs so far), lr_bounds [lo, hi],
                      lr_round (0 = initial grid, k = k-th extension), lr_grid_reason, ablation, tuned;
                      substituted {asset: stand-in, "why": str} only where a stand-in ran for a built asset
                      (benchmarks/runner/built_models.py; config.model names the stand-in)
    task_info         Task.describe(): metrics, selection_metric, report_metric, protocol, source, ...
    metrics           {"validation": {...}, "test": {...}} final evaluation
    history           {"train_loss": [[step, loss], ...], "validation": [[step, {...}], ...], "lr": [[step, lr], ...]}
    trainable_params  int;  total_params int
    adapted_modules   Adapted.report (what was touched; fallbacks to plain LoRA)
    perf              wall_s, train_s, eval_s, step_time_s, setup_s (building the run: model load, injection, step
                      set-up), first_step_s (the first optimiser step, a compile included), units, units_per_s,
                      unit ("tokens"|"images"),
                      peak_gpu_mem_mib, mixed_precision, num_processes, step (the training step's setup:
                      compiled, graphs_kept, graphs_built, ...), worker ({"pid", "earlier_runs"}: the process that
                      ran it and how many runs it had started before; 0 = its first, which pays imports and compiles),
                      stacked (only for runs of ``run --stack K``: {"runs", "index", "peak_gpu_mem_mib"}; their
                      times are the stack's and their own peak_gpu_mem_mib is null)
    tower_lr          only for runs with adapter.tower_lr_scale: {tower: {"scale", "tensors", "numel"}}, the
                      trained parameters moved to lr x scale (``Adapted.tower_lr``; 0 tensors: none in that tower)
    nalora            {"history": controller.history()} for runs with a controller, else null
    diagnostics       {"selection_misalignment": {...} | {"error": str}, "source": str} for gate-touching methods
                      (source "validation": the task's held-out batches; "train-stream-fallback": a plugin
                      without ``heldout_batches``, fresh training batches instead)
    health            benchmarks.runner.health.assess: {"collapsed": bool, "reasons": [str, one per clause fired],
                      "clauses": {"a", "b"}, "top_pred", "top_pred_share", "val_vs_chance_p", "chance",
                      "answer_nll", "uniform_nll", "final_train_loss", "rule": {"version", constants}}
                      (rule version 1, before ``rule.version`` existed: clause (b) used the per-token train loss
                      and ``uniform_entropy``; such records keep the status they were judged with)
    per_example       {"validation": {"n", "ids_sha256", "correct": "0110...", "pred": [...], "answer_nll",
                      "uniform_nll"}, "test": {...}} (absent for tasks that give no per-example results;
                      answer_nll / uniform_nll only for tasks with choices)
    provenance        git{commit,dirty}, packages{...}, hardware{python,gpu,cuda}, assets{name: provenance},
                      files [{path, sha256, bytes, role: "weights"|"data", source: asset | "connector" | "task data"}]
                      (every weight and data file the run used; provenance.run_files)
    side              on disk only: {"file", "sha256", "keys"} naming the gzip side file that holds nalora.history,
                      diagnostics.selection_misalignment.per_layer, adapted_modules and per_example.*.pred
                      (``sidefile.py``; the store writes it, the report attaches it)
"""

from __future__ import annotations

from typing import Any

RECORD_SCHEMA = 2

# The leaderboard: one row per run. Names are stable; docs/results.md documents each one.
LEADERBOARD_COLUMNS = [
    "run_id", "status", "error_type", "model", "task", "family", "method", "base_method", "ablation",
    "seed", "lr", "selected", "options", "targets", "rank", "alpha", "dropout", "steps", "batch_size",
    "grad_accum", "selection_metric", "val_score", "report_metric", "test_score", "chance", "protocol",
    "trainable_params", "total_params", "trainable_pct", "peak_gpu_mem_mib", "wall_s", "step_time_s",
    "units_per_s", "unit", "misalignment_mean_ds", "misalignment_regime_flip", "git_commit", "gpu", "suite",
]


def make_record(spec_config: dict, meta: dict, run_id: str, *, status: str, task_info: dict | None = None,
                result: dict | None = None, error: dict | None = None, provenance: dict | None = None) -> dict[str, Any]:
    """Assemble one run record; ``result`` holds what training produced (may be partial on failure).

    The status is the caller's, refined by the run itself: a trained run that ``train_run`` judged
    degenerate (``result["status"] == "collapsed"``) is "collapsed"; a run stopped for a non-finite loss or
    gradient (error type ``nan_loss``/``diverged``) is "diverged". Neither is ever "ok".
    """
    result = result or {}
    if status == "ok" and result.get("status") in ("collapsed", "diverged"):
        status = result["status"]
    if status == "failed" and (error or {}).get("type") in ("nan_loss", "diverged"):
        status = "diverged"
    rec = {
        "schema": RECORD_SCHEMA,
        "run_id": run_id,
        "status": status,
        "error": error,
        "config": spec_config,
        "meta": meta,
        "task_info": task_info or {},
        "metrics": result.get("metrics", {}),
        "history": result.get("history", {}),
        "trainable_params": result.get("trainable_params"),
        "total_params": result.get("total_params"),
        "adapted_modules": result.get("adapted_modules", []),
        "perf": result.get("perf", {}),
        "nalora": result.get("nalora"),
        "diagnostics": result.get("diagnostics"),
        "provenance": provenance or {},
        "health": result.get("health"),
    }
    if result.get("per_example"):
        rec["per_example"] = result["per_example"]
    return rec


def _misalignment(rec: dict, *names: str) -> float | None:
    diag = (rec.get("diagnostics") or {}).get("selection_misalignment") or {}
    for n in names:
        v = diag.get(n)
        if isinstance(v, (int, float)):
            return float(v)
    return None


def record_chance(rec: dict, metric: str) -> float | None:
    """The chance level of ``metric`` for a record's task: ``task_info.chance`` (``Task.chance()``), else, for
    records written before it was recorded, ``1 / number of choices`` when the task info gives that count."""
    info = rec.get("task_info") or {}
    ch = info.get("chance")
    if isinstance(ch, dict) and isinstance(ch.get(metric), (int, float)):
        return float(ch[metric])
    if isinstance(ch, (int, float)) and not isinstance(ch, bool):
        return float(ch)
    for k in ("num_choices", "n_choices"):
        if isinstance(info.get(k), int) and info[k] > 0:
            return 1.0 / info[k]
    for k in ("choices", "labels", "classes"):
        if isinstance(info.get(k), list) and info[k]:
            return 1.0 / len(info[k])
    return None


def leaderboard_row(rec: dict, selected: bool) -> dict[str, Any]:
    """The leaderboard row of one record (columns in ``LEADERBOARD_COLUMNS``)."""
    c, info, perf = rec["config"], rec.get("task_info", {}), rec.get("perf", {})
    sel_metric, rep_metric = info.get("selection_metric", "acc"), info.get("report_metric", "acc")
    metrics = rec.get("metrics") or {}
    trainable, total = rec.get("trainable_params"), rec.get("total_params")
    return {
        "run_id": rec["run_id"],
        "status": rec.get("status"),
        "error_type": (rec.get("error") or {}).get("type", ""),
        "model": c["model"],
        "task": c["task"],
        "family": rec.get("meta", {}).get("family", ""),
        "method": c["method"],
        "base_method": c.get("base_method", c["method"]),
        "ablation": bool(rec.get("meta", {}).get("ablation", False)),
        "seed": c["seed"],
        "lr": c["lr"],
        "selected": bool(selected),
        "options": ";".join(f"{k}={v}" for k, v in sorted((c.get("options") or {}).items())),
        "targets": "+".join(c.get("adapter", {}).get("targets", [])),
        "rank": c.get("adapter", {}).get("rank"),
        "alpha": c.get("adapter", {}).get("alpha"),
        "dropout": c.get("adapter", {}).get("dropout"),
        "steps": c.get("training", {}).get("steps"),
        "batch_size": c.get("training", {}).get("batch_size"),
        "grad_accum": c.get("training", {}).get("grad_accum"),
        "selection_metric": sel_metric,
        "val_score": metrics.get("validation", {}).get(sel_metric),
        "report_metric": rep_metric,
        "test_score": metrics.get("test", {}).get(rep_metric),
        "chance": record_chance(rec, rep_metric),
        "protocol": info.get("protocol", ""),
        "trainable_params": trainable,
        "total_params": total,
        "trainable_pct": (100.0 * trainable / total) if trainable is not None and total else None,
        "peak_gpu_mem_mib": perf.get("peak_gpu_mem_mib"),
        "wall_s": perf.get("wall_s"),
        "step_time_s": perf.get("step_time_s"),
        "units_per_s": perf.get("units_per_s"),
        "unit": perf.get("unit", ""),
        "misalignment_mean_ds": _misalignment(rec, "misalignment", "mean_abs_ds"),
        "misalignment_regime_flip": _misalignment(rec, "regime_change", "regime_flip_fraction"),
        "git_commit": (rec.get("provenance", {}).get("git") or {}).get("commit") or "",
        "gpu": (rec.get("provenance", {}).get("hardware") or {}).get("gpu") or "",
        "suite": rec.get("meta", {}).get("suite", ""),
    }


def is_failure(rec: dict) -> bool:
    """A run that raised (a bug, OOM, bad input): not a result. ``collapsed``/``diverged`` are results."""
    if rec.get("status") != "failed":
        return False
    # Records written before execute.py knew "diverged" say failed/nan_loss for a non-finite loss.
    return (rec.get("error") or {}).get("type") not in ("nan_loss", "diverged")
