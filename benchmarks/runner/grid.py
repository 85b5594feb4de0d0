"""Expand a suite into runs, give each a stable id, and select hyperparameters on validation.

A run is one (model, task, method, seed, lr [, tuned options]). Its id is a hash of its full
config, so a finished run is recognised on any later invocation and never repeated.
Selection (used by tuning here and by the report) picks, per model x task x method, the setting
with the best mean validation metric over seeds; only that setting's test score is reported.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from benchmarks.runner.suite import MethodSpec, Suite, TaskSpec, deep_merge

NO_ADAPTER_METHODS = ("full", "head")


@dataclass
class RunSpec:
    """What one run needs: ``config`` (hashed into the id) and ``meta`` (recorded, not hashed)."""

    config: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        return run_id(self.config)

    def label(self) -> str:
        c = self.config
        return f"{c['model']}/{c['task']}/{c['method']}/s{c['seed']}/lr{c['lr']:g}"


def run_id(config: dict[str, Any]) -> str:
    """16 hex digits of the sha256 of the canonical JSON of ``config``."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _models_for(suite: Suite, spec: TaskSpec, family: str, default_model: str) -> list[str]:
    if spec.models:
        return list(spec.models)
    if family in suite.models:
        return list(suite.models[family])
    if "*" in suite.models:
        return list(suite.models["*"])
    return [default_model]


def _config(suite: Suite, task: TaskSpec, model: str, m: MethodSpec, seed: int, lr: float, options: dict) -> dict:
    return {
        "model": model,
        "task": task.name,
        "method": m.label,
        "base_method": m.method,
        "seed": int(seed),
        "lr": float(lr),
        "adapter": deep_merge(suite.adapter, m.adapter),
        "options": dict(sorted(options.items())),
        "training": deep_merge(suite.training, task.training),
    }


def _meta(suite: Suite, m: MethodSpec, family: str, phase: str) -> dict:
    return {
        "suite": suite.name, "phase": phase, "family": family, "lr_grid": list(m.lr_grid),
        "lr_grid_reason": m.lr_grid_reason, "ablation": m.ablation,
    }


def tuned_options(suite: Suite, m: MethodSpec, chosen: dict[str, dict] | None) -> dict:
    """Method options with the tuned values applied.

    Tuned values win over a method's default options; an ablation variant's explicit options win
    over tuned ones (that is what the variant ablates).
    """
    opts = dict(m.options)
    if not chosen or not suite.tune or m.label not in suite.tune["apply_to"]:
        return opts
    tuned = chosen.get(m.label) or chosen.get(m.method) or chosen.get(suite.tune["methods"][0]) or {}
    if m.ablation:
        return {**tuned, **opts}
    return {**opts, **tuned}


def expand(suite: Suite, family_of: Callable[[str], tuple[str, str]], chosen: dict[str, dict] | None = None) -> list[RunSpec]:
    """Every reported run of ``suite``. ``family_of(task) -> (family, default_model)``."""
    specs = []
    for t in suite.tasks:
        family, default_model = family_of(t.name)
        for model in _models_for(suite, t, family, default_model):
            for m in suite.methods:
                if m.families and family not in m.families:
                    continue
                opts = tuned_options(suite, m, chosen)
                for lr in m.lr_grid:
                    for seed in suite.seeds:
                        specs.append(RunSpec(_config(suite, t, model, m, seed, lr, opts), _meta(suite, m, family, "main")))
    return specs


def option_grid(options: dict[str, list]) -> list[dict]:
    """Cartesian product of ``{name: [values]}`` as a list of dicts (stable order)."""
    keys = sorted(options)
    return [dict(zip(keys, values)) for values in itertools.product(*(options[k] for k in keys))]


def expand_tune(suite: Suite, family_of: Callable[[str], tuple[str, str]]) -> list[RunSpec]:
    """The tuning runs: tuned methods x option grid x lr grid x tune seeds on the dev tasks."""
    if not suite.tune:
        return []
    specs = []
    by_label = {m.label: m for m in suite.methods}
    for t in suite.dev_tasks:
        family, default_model = family_of(t.name)
        for model in _models_for(suite, t, family, default_model):
            for label in suite.tune["methods"]:
                m = by_label[label]
                for combo in option_grid(suite.tune["options"]):
                    for lr in m.lr_grid:
                        for seed in suite.tune["seeds"]:
                            meta = _meta(suite, m, family, "tune") | {"tuned_keys": sorted(combo)}
                            specs.append(RunSpec(_config(suite, t, model, m, seed, lr, {**m.options, **combo}), meta))
    return specs


# ----------------------------------------------------------------------------------------------
# Selection on validation


def setting_key(config: dict) -> str:
    """Everything of a run's config but the seed: one hyperparameter setting."""
    return json.dumps({k: v for k, v in config.items() if k != "seed"}, sort_keys=True, default=str)


def _val_score(rec: dict) -> float | None:
    metric = rec.get("task_info", {}).get("selection_metric", "acc")
    v = (rec.get("metrics") or {}).get("validation", {}).get(metric)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def select_settings(records: list[dict], group_keys: tuple[str, ...] = ("model", "task", "method")) -> dict[tuple, dict]:
    """Best setting per group: ``{group: {"setting": key, "val_mean": x, "n": seeds, "complete": bool}}``.

    Score = mean validation selection metric over seeds. Settings where every seed finished
    ``ok`` rank before settings with failed seeds (an lr that diverges on one seed is not
    rewarded for its lucky seeds). Ties break towards the smaller lr, then the setting key, so the
    choice is deterministic.
    """
    groups: dict[tuple, dict[str, list[dict]]] = {}
    for rec in records:
        c = rec["config"]
        groups.setdefault(tuple(c[k] for k in group_keys), {}).setdefault(setting_key(c), []).append(rec)
    chosen = {}
    for g, settings in groups.items():
        best = None
        for key, recs in settings.items():
            scores = [_val_score(r) for r in recs if r.get("status") == "ok"]
            scores = [s for s in scores if s is not None]
            if not scores:
                continue
            higher = recs[0].get("task_info", {}).get("metrics", {}).get(
                recs[0].get("task_info", {}).get("selection_metric", "acc"), True)
            mean = sum(scores) / len(scores)
            complete = len(scores) == len(recs)
            rank = (complete, mean if higher else -mean, -recs[0]["config"]["lr"], key)
            if best is None or rank > best[0]:
                best = (rank, {"setting": key, "val_mean": mean, "n": len(scores), "complete": complete,
                               "lr": recs[0]["config"]["lr"], "options": recs[0]["config"].get("options", {})})
        if best is not None:
            chosen[g] = best[1]
    return chosen


def choose_tuned(records: list[dict], tuned_keys: dict[str, list[str]]) -> dict[str, Any]:
    """The option values the tuning picked, per tuned method.

    For each method and option combination: take the best lr per dev task (mean validation over
    seeds), then average that over dev tasks (and models); the combination with the best average
    wins (validation metrics are taken as higher-is-better here). Returns ``{"chosen": {method: {option: value}}, "scores": [...]}`` for the record.
    """
    out: dict[str, Any] = {"chosen": {}, "scores": []}
    for method, keys in sorted(tuned_keys.items()):
        recs = [r for r in records if r["config"]["method"] == method]
        for r in recs:
            r["config"]["_combo"] = json.dumps({k: r["config"]["options"].get(k) for k in keys}, sort_keys=True)
        best_lr = select_settings(recs, ("model", "task", "method", "_combo"))
        combos: dict[str, list[float]] = {}
        for (model, task, _m, combo), sel in best_lr.items():
            combos.setdefault(combo, []).append(sel["val_mean"])
        for r in recs:
            r["config"].pop("_combo", None)
        ranked = sorted(((sum(v) / len(v), combo, len(v)) for combo, v in combos.items()), key=lambda x: (-x[0], x[1]))
        for mean, combo, n in ranked:
            out["scores"].append({"method": method, "options": json.loads(combo), "val_mean": mean, "n_tasks": n})
        if ranked:
            out["chosen"][method] = json.loads(ranked[0][1])
    return out
