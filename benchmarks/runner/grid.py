"""Expand a suite into runs, give each a stable id, and select hyperparameters on validation.

A run is one (model, task, method, seed, lr). Its id is a hash of its whole resolved config (method
options with defaults filled, training, adapter, task fingerprint), so a finished run is recognised on any
later invocation and never repeated, and a changed default gives new ids. Each (model, task, method) cell's
lr grid grows in rounds until its validation-best lr is interior or at a documented bound (docs/protocol.md).
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

from benchmarks.runner.record import is_failure
from benchmarks.runner.suite import MethodSpec, Suite, TaskSpec

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

    @property
    def specs(self) -> tuple[RunSpec, ...]:
        """The runs this work item trains: itself (a ``StackSpec`` has several)."""
        return (self,)


# The keys that may differ between the runs of one stack: everything else (model, task, method, options, adapter,
# training settings) is the same, so that the runs share one base model and one batch shape.
STACK_FREE_KEYS = ("seed", "lr")


def stack_key(config: dict[str, Any]) -> str:
    """Runs with equal keys can be trained together (``train.train_stacked``): the config without its seed and lr."""
    return json.dumps({k: v for k, v in config.items() if k not in STACK_FREE_KEYS}, sort_keys=True, default=str)


@dataclass(frozen=True)
class StackSpec:
    """Runs of one ``stack_key`` a worker trains together (``run --stack K``); each keeps its own id and record."""

    specs: tuple[RunSpec, ...]

    @property
    def config(self) -> dict[str, Any]:
        """The first run's config: model, task and method are the stack's (what budgets look up)."""
        return self.specs[0].config

    @property
    def run_id(self) -> str:
        return "stack:" + "+".join(s.run_id for s in self.specs)

    def label(self) -> str:
        return f"{self.specs[0].label()} and {len(self.specs) - 1} more, stacked"


def group_stacks(specs: list[RunSpec], k: int, slots: int = 1) -> list[RunSpec | StackSpec]:
    """``specs`` with the runs of one ``stack_key`` gathered into stacks of up to ``k`` (in order of first
    appearance), each key's runs split into stacks of sizes that differ by at most one; a run alone stays a
    ``RunSpec``. ``k`` 1: unchanged. ``slots`` (workers that train at once): stacks are made smaller, down to two
    runs, while fewer work items than slots would leave workers idle (GPU visit of 2026-12-07, third: 30 runs in
    stacks of 8 gave 4 items to 6 workers, and the call took as long as its largest stack)."""
    if k <= 1:
        return list(specs)
    groups: dict[str, list[RunSpec]] = {}
    for s in specs:
        groups.setdefault(stack_key(s.config), []).append(s)
    items = lambda size: sum(math.ceil(len(m) / size) for m in groups.values())  # noqa: E731
    size = k
    while size > 2 and items(size) < slots:
        size -= 1
    out: list[RunSpec | StackSpec] = []
    for members in groups.values():
        n = math.ceil(len(members) / size)
        bounds = [round(i * len(members) / n) for i in range(n + 1)]
        for lo, hi in zip(bounds, bounds[1:]):
            chunk = members[lo:hi]
            out.append(StackSpec(tuple(chunk)) if len(chunk) > 1 else chunk[0])
    return out


def run_id(config: dict[str, Any]) -> str:
    """16 hex digits of the sha256 of the canonical JSON of ``config``."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


Cell = tuple[str, str, str]  # (model, task, method label): one lr grid, one selected lr
Grids = dict[Cell, dict[float, int]]  # cell -> {lr: round it was added in (0 = the initial grid)}


@dataclass(frozen=True)
class TaskFacts:
    """What expansion needs to know of a task: its family, default model and fingerprint (hashed into ids)."""

    family: str
    default_model: str
    fingerprint: str | None = None


def task_fingerprint(task: Any) -> str:
    """``Task.fingerprint()`` (definition + data), or for tasks without it a hash of their static description."""
    fn = getattr(task, "fingerprint", None)
    if callable(fn):
        return str(fn())
    text = json.dumps({"class": type(task).__qualname__, "describe": task.describe()}, sort_keys=True, default=str)
    return "describe:" + hashlib.sha256(text.encode()).hexdigest()[:16]


def _facts(info: Any) -> TaskFacts:
    # ``family_of`` callables of the old API return (family, default_model).
    return info if isinstance(info, TaskFacts) else TaskFacts(*info)


def _models_for(suite: Suite, spec: TaskSpec, family: str, default_model: str) -> list[str]:
    return suite.models_for(spec, family, default_model)  # kept for old callers; use Suite.models_for


# The towers a task family's models have: a multiplier for a tower the model lacks changes nothing and is dropped.
FAMILY_TOWERS = {"llm": ("language",), "vlm": ("language", "vision")}


def _config(task: TaskSpec, model: str, m: MethodSpec, seed: int, lr: float, options: dict,
            fingerprint: str | None, family: str | None = None) -> dict:
    """The whole resolved configuration of one run (hashed into its id)."""
    config = {
        "model": model,
        "task": task.name,
        "method": m.label,
        "base_method": m.method,
        "seed": int(seed),
        "lr": float(lr),
        "adapter": m.adapter.model_dump(mode="json"),
        "options": dict(sorted(options.items())),
        "training": task.training.model_dump(mode="json"),
    }
    if family in FAMILY_TOWERS:  # so the VLM recipe's {vision: ...} default leaves language-model runs' ids alone
        config["adapter"]["tower_lr_scale"] = {t: s for t, s in config["adapter"]["tower_lr_scale"].items()
                                               if t in FAMILY_TOWERS[family]}
    if not config["adapter"]["tower_lr_scale"]:  # empty is the behaviour before the key: those runs keep their ids
        del config["adapter"]["tower_lr_scale"]
    if config["training"]["curve_limit"] is None:  # null is the behaviour before the key: those runs keep their ids
        del config["training"]["curve_limit"]
    if task.options:  # only when given, so that runs without task options keep their ids
        config["task_options"] = dict(sorted(task.options.items()))
    if fingerprint is not None:
        config["task_fingerprint"] = fingerprint
    return config


def _meta(suite: Suite, m: MethodSpec, family: str, phase: str, lrs: dict[float, int] | None = None,
          lr: float | None = None, substituted: dict | None = None) -> dict:
    lrs = lrs if lrs is not None else {x: 0 for x in m.lr_grid}
    meta = {
        "suite": suite.name, "phase": phase, "family": family, "lr_grid": sorted(lrs),
        "lr_bounds": list(m.lr_bounds), "lr_round": lrs.get(lr, 0) if lr is not None else 0,
        "lr_grid_reason": m.lr_grid_reason, "ablation": m.ablation, "tuned": m.tuned,
    }
    if phase == "main":  # the cell's seeds: the report finds a seed missing at every lr from these (analysis._missing)
        meta["seeds"] = [int(x) for x in m.seeds]
    if substituted:  # a stand-in ran instead of a built asset (benchmarks/runner/built_models.py)
        meta["substituted"] = dict(substituted)
    return meta


def method_options(suite: Suite, m: MethodSpec, chosen: dict[str, dict] | None) -> dict | None:
    """The options a run of ``m`` uses: its resolved options; for a ``-tuned`` entry, the options the tuning
    chose (None while the tuning is not complete)."""
    if not m.tuned:
        return dict(m.resolved) if m.resolved is not None else dict(m.options)
    base = m.label[: -len("-tuned")]
    if not chosen or base not in chosen:
        return None
    from benchmarks.runner.suite import resolve_method_options

    return resolve_method_options(m.method, {**m.options, **chosen[base]})


def _models(suite: Suite, t: TaskSpec, facts: TaskFacts) -> list[tuple[str, dict | None]]:
    """The models ``t`` runs on, each with what it stands in for (``meta.substituted``; None: as declared)."""
    out: dict[str, dict | None] = {}
    for declared in suite.declared_models_for(t, facts.family, facts.default_model):
        out.setdefault(suite.stand_in(declared), suite.substituted(declared))
    return list(out.items())


def cells(suite: Suite, info_of: Callable[[str], Any]) -> list[tuple[Cell, TaskSpec, MethodSpec, TaskFacts, dict | None]]:
    """Every (model, task, method) of the reported grid, in a stable order, with its model's substitution."""
    out = []
    for t in suite.tasks:
        facts = _facts(info_of(t.name))
        for model, substituted in _models(suite, t, facts):
            for m in suite.methods:
                if m.families and facts.family not in m.families:
                    continue
                out.append(((model, t.name, m.label), t, m, facts, substituted))
    return out


def initial_grids(suite: Suite, info_of: Callable[[str], Any]) -> Grids:
    """Round 0: every cell's lr grid as the suite gives it."""
    return {cell: {float(lr): 0 for lr in m.lr_grid} for cell, _, m, _, _ in cells(suite, info_of)}


def expand(suite: Suite, info_of: Callable[[str], Any], chosen: dict[str, dict] | None = None,
           grids: Grids | None = None) -> list[RunSpec]:
    """Every reported run of ``suite`` with each cell's lr grid (``grids``; default: round 0).

    ``info_of(task) -> TaskFacts`` (or ``(family, default_model)``). ``-tuned`` entries are left out until
    ``chosen`` holds their options.
    """
    grids = grids if grids is not None else initial_grids(suite, info_of)
    specs = []
    for cell, t, m, facts, substituted in cells(suite, info_of):
        opts = method_options(suite, m, chosen)
        if opts is None:
            continue
        lrs = grids.get(cell, {float(lr): 0 for lr in m.lr_grid})
        for lr in sorted(lrs):
            for seed in m.seeds:
                specs.append(RunSpec(_config(t, cell[0], m, seed, lr, opts, facts.fingerprint, facts.family),
                                     _meta(suite, m, facts.family, "main", lrs, lr, substituted)))
    return specs


def option_grid(options: dict[str, list]) -> list[dict]:
    """Cartesian product of ``{name: [values]}`` as a list of dicts (stable order)."""
    keys = sorted(options)
    return [dict(zip(keys, values)) for values in itertools.product(*(options[k] for k in keys))]


def expand_tune(suite: Suite, info_of: Callable[[str], Any]) -> list[RunSpec]:
    """The tuning runs: each tuned method x its option grid x its lr grid x tune seeds, on the dev tasks."""
    if not suite.tune:
        return []
    from benchmarks.runner.suite import resolve_method_options

    specs = []
    by_label = {m.label: m for m in suite.methods}
    for t in suite.dev_tasks:
        facts = _facts(info_of(t.name))
        for model, substituted in _models(suite, t, facts):
            for label, options in suite.tune["methods"].items():
                m = by_label[label]
                for combo in option_grid(options):
                    opts = resolve_method_options(m.method, {**m.options, **combo})
                    for lr in m.lr_grid:
                        for seed in suite.tune["seeds"]:
                            meta = _meta(suite, m, facts.family, "tune", substituted=substituted) | {
                                "tuned_keys": sorted(combo), "tuned_values": combo}
                            specs.append(RunSpec(_config(t, model, m, seed, lr, opts, facts.fingerprint, facts.family), meta))
    return specs


# ----------------------------------------------------------------------------------------------
# The lr grid that brackets the optimum (docs/protocol.md)


def _tidy(x: float) -> float:
    return float(f"{x:.6g}")  # 3 * 1e-4 is 0.00030000000000000003; grids compare exactly


def half_decade(lr: float, direction: int) -> float:
    """The next lr of the 1-3-10 sequence above (``direction`` +1) or below (-1) ``lr``.

    1e-3 -> 3e-3 -> 1e-2 upwards, 3e-4 -> 1e-4 -> 3e-5 downwards. An lr off the sequence is first read as
    its nearest sequence value (2e-4 as 3e-4: mantissas below 2 count as 1, from 2 to 6 as 3, above as 10).
    """
    e = math.floor(math.log10(lr) + 1e-9)
    m = lr / 10**e  # mantissa in [1, 10)
    if direction > 0:
        return _tidy(3 * 10**e) if m < 2 else _tidy(10 ** (e + 1)) if m < 6 else _tidy(3 * 10 ** (e + 1))
    return _tidy(3 * 10 ** (e - 1)) if m < 2 else _tidy(10**e) if m < 6 else _tidy(3 * 10**e)


def next_lr(lrs: list[float], best: float, bounds: tuple[float, float]) -> float | None:
    """The lr to add when ``best`` sits at an edge of ``lrs``: one half-decade beyond that edge, if within
    ``bounds``; None when ``best`` is interior or the bound is reached."""
    lo, hi = bounds
    if best >= max(lrs):
        up = half_decade(max(lrs), +1)
        if up <= hi * (1 + 1e-9):
            return up
    if best <= min(lrs):
        down = half_decade(min(lrs), -1)
        if down >= lo * (1 - 1e-9):
            return down
    return None


def edge_status(lrs: list[float], best: float, bounds: tuple[float, float]) -> str:
    """"interior", "at-bound" (best at an edge that the bound stops), or "edge" (extension still to run)."""
    if min(lrs) < best < max(lrs):
        return "interior"
    return "edge" if next_lr(lrs, best, bounds) is not None else "at-bound"


def finished_cells(grids: Grids, specs: list[RunSpec], stored: set[str]) -> Grids:
    """The cells of ``grids`` whose every run in ``specs`` has a stored record (its id in ``stored``): those
    ``extend_grids`` may judge while other cells' runs are still to do."""
    missing = {(s.config["model"], s.config["task"], s.config["method"]) for s in specs if s.run_id not in stored}
    return {cell: lrs for cell, lrs in grids.items() if cell not in missing}


def extend_grids(grids: Grids, records: list[dict], bounds_of: Callable[[Cell], tuple[float, float]]) -> Grids:
    """One extension round: for each cell whose validation-best lr (mean over seeds, ``ok`` runs, as
    ``select_settings``) sits at an edge of its grid, add the next half-decade lr on that side within the
    cell's bounds. Returns only the cells that grew (new lrs tagged with the next round). Deterministic:
    a rerun computes the same extensions from the same stored records.

    A cell with a run that raised (``is_failure``: OOM, a bug) is not judged: its grid is incomplete, and the
    missing seeds could move its optimum (GPU visit of 2026-12-02: 14 of a cell's 15 runs had failed for
    memory, and the lone ok run would have extended it). It is judged once those runs are rerun."""
    by_cell: dict[Cell, list[dict]] = {}
    for rec in records:
        c = rec["config"]
        by_cell.setdefault((c["model"], c["task"], c["method"]), []).append(rec)
    grown: Grids = {}
    for cell, lrs in grids.items():
        recs = [r for r in by_cell.get(cell, []) if float(r["config"]["lr"]) in lrs]
        if any(is_failure(r) for r in recs):
            continue
        sel = select_settings(recs).get(cell)
        if sel is None:
            continue  # no ok run at all: nothing says which way the optimum lies
        new = next_lr(sorted(lrs), float(sel["lr"]), bounds_of(cell))
        if new is not None and new not in lrs:
            grown[cell] = {**lrs, new: max(lrs.values()) + 1}
    return grown


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
