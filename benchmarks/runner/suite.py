"""Suite files: one defaults file plus small per-suite overrides (as peft's method_comparison).

A suite names models, tasks, methods, seeds, the shared adapter budget and per-method
hyperparameters. ``load_suite`` merges it over its ``extends`` parent (``defaults`` unless told
otherwise), validates every key and returns a plain, fully resolved ``Suite``. Bad input raises
``SuiteError`` (a ``ValueError``) with one line naming the file and the key.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SUITES_DIR = Path(__file__).resolve().parent.parent / "suites"

TOP_KEYS = {
    "extends", "description", "models", "tasks", "dev_tasks", "methods", "seeds", "adapter",
    "training", "lr_grid", "tune", "task_paths", "assets",
}
TRAINING_KEYS = {
    "steps", "batch_size", "grad_accum", "warmup_ratio", "weight_decay", "max_grad_norm",
    "eval_every", "eval_limit", "test_limit", "eval_batch_size", "log_every", "diag_batches",
    "mixed_precision",
}
ADAPTER_KEYS = {"targets", "towers", "rank", "alpha", "dropout"}
METHOD_KEYS = {"method", "lr_grid", "lr_grid_reason", "options", "adapter", "ablation", "families"}
TUNE_KEYS = {"methods", "options", "seeds", "apply_to"}
TASK_KEYS = {"name", "model", "models", "training"}


class SuiteError(ValueError):
    """A suite file is malformed; the message is one line naming the file and key."""


@dataclass
class MethodSpec:
    """One method entry: a label (column in tables) and the registered method it runs."""

    label: str
    method: str
    lr_grid: list[float]
    lr_grid_reason: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    adapter: dict[str, Any] = field(default_factory=dict)  # overrides of the shared budget (recorded)
    ablation: bool = False  # True: only in the ablation table, not in the main leaderboard
    families: list[str] | None = None  # restrict to task families ("llm", "vlm")


@dataclass
class TaskSpec:
    name: str
    models: list[str] | None = None  # None: the suite's models for the task family (or its default)
    training: dict[str, Any] = field(default_factory=dict)


@dataclass
class Suite:
    name: str
    path: str
    description: str
    models: dict[str, list[str]]  # family -> model names ("*" applies to every family)
    tasks: list[TaskSpec]
    dev_tasks: list[TaskSpec]
    methods: list[MethodSpec]
    seeds: list[int]
    adapter: dict[str, Any]
    training: dict[str, Any]
    tune: dict[str, Any] | None
    task_paths: list[str]
    assets: list[str]
    raw: dict[str, Any] = field(repr=False, default_factory=dict)


def deep_merge(base: dict, override: dict) -> dict:
    """``override`` merged into a copy of ``base``; nested dicts merge, everything else replaces."""
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve_path(name_or_path: str | Path) -> Path:
    """A suite name (``smoke``) from ``benchmarks/suites`` or a path to a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise SuiteError(f"suite file {p} does not exist")
        return p
    candidate = SUITES_DIR / f"{name_or_path}.yaml"
    if not candidate.exists():
        known = sorted(q.stem for q in SUITES_DIR.glob("*.yaml") if q.stem != "defaults")
        raise SuiteError(f"unknown suite {name_or_path!r}; known suites: {', '.join(known)}")
    return candidate


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise SuiteError(f"suite {path.name}:{where} is not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict):
        raise SuiteError(f"suite {path.name}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_raw(name_or_path: str | Path, _seen: tuple[Path, ...] = ()) -> tuple[dict, Path]:
    """The suite merged over its ``extends`` chain, unvalidated (``extends: none`` stops the chain)."""
    path = resolve_path(name_or_path).resolve()
    if path in _seen:
        raise SuiteError(f"suite {path.name}: 'extends' loops back to itself")
    data = _read_yaml(path)
    parent = data.pop("extends", "defaults" if path.stem != "defaults" else None)
    if parent in (None, "none"):
        return data, path
    if not isinstance(parent, str):
        raise SuiteError(f"suite {path.name}: 'extends' must be a suite name or path")
    parent_path = Path(parent) if Path(parent).suffix else (path.parent / f"{parent}.yaml")
    if not parent_path.exists():
        parent_path = resolve_path(parent)
    base, _ = load_raw(parent_path, _seen + (path,))
    # A suite's method mapping overrides entries of the defaults; its *list* selects among them.
    return _merge_suite(base, data), path


def _merge_suite(base: dict, data: dict) -> dict:
    methods = data.get("methods")
    merged = deep_merge({k: v for k, v in base.items() if k != "methods"}, {k: v for k, v in data.items() if k != "methods"})
    base_methods = base.get("methods") or {}
    if isinstance(base_methods, list):
        base_methods = {m: {} for m in base_methods}
    if methods is None:
        merged["methods"] = copy.deepcopy(base_methods)
    elif isinstance(methods, list):
        merged["methods"] = {m: copy.deepcopy(base_methods.get(m, {})) if isinstance(m, str) else m for m in methods}
    elif isinstance(methods, dict):
        # Only the named methods run; each merges over its defaults entry.
        merged["methods"] = {m: deep_merge(base_methods.get(m, {}) or {}, v or {}) for m, v in methods.items()}
    else:
        merged["methods"] = methods  # rejected by validation below
    return merged


def _err(path: Path, msg: str) -> SuiteError:
    return SuiteError(f"suite {path.name}: {msg}")


def _check_keys(path: Path, where: str, value: Any, known: set[str]) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _err(path, f"{where} must be a mapping, got {type(value).__name__}")
    unknown = sorted(set(value) - known)
    if unknown:
        raise _err(path, f"unknown key {unknown[0]!r} in {where} (known: {', '.join(sorted(known))})")
    return value


def _lr_list(path: Path, where: str, value: Any) -> list[float]:
    if not isinstance(value, list) or not value:
        raise _err(path, f"{where} must be a non-empty list of learning rates")
    out = []
    for v in value:
        try:
            f = float(v)  # YAML reads "1e-4" (no dot) as a string
        except (TypeError, ValueError):
            raise _err(path, f"{where} has {v!r}, not a number") from None
        if not f > 0:
            raise _err(path, f"{where} has {v!r}; learning rates must be > 0")
        out.append(f)
    return out


def _check_training(path: Path, where: str, value: Any) -> dict:
    t = _check_keys(path, where, value, TRAINING_KEYS)
    for key in ("steps", "batch_size", "grad_accum"):
        if key in t and (not isinstance(t[key], int) or isinstance(t[key], bool) or t[key] < 1):
            raise _err(path, f"{where}.{key} must be a positive integer, got {t[key]!r}")
    for key in ("eval_every", "log_every", "diag_batches", "eval_batch_size"):
        if key in t and (not isinstance(t[key], int) or t[key] < 0):
            raise _err(path, f"{where}.{key} must be a non-negative integer, got {t[key]!r}")
    for key in ("eval_limit", "test_limit"):
        if key in t and t[key] is not None and (not isinstance(t[key], int) or t[key] < 1):
            raise _err(path, f"{where}.{key} must be a positive integer or null, got {t[key]!r}")
    if "warmup_ratio" in t and not (isinstance(t["warmup_ratio"], (int, float)) and 0 <= t["warmup_ratio"] < 1):
        raise _err(path, f"{where}.warmup_ratio must be in [0, 1), got {t['warmup_ratio']!r}")
    if t.get("mixed_precision") is False:  # YAML 1.1 reads a bare `no` as false
        t["mixed_precision"] = "no"
    if "mixed_precision" in t and t["mixed_precision"] not in ("auto", "no", "bf16", "fp16"):
        raise _err(path, f"{where}.mixed_precision must be auto, no, bf16 or fp16")
    return t


def _check_adapter(path: Path, where: str, value: Any) -> dict:
    a = _check_keys(path, where, value, ADAPTER_KEYS)
    if "rank" in a and (not isinstance(a["rank"], int) or a["rank"] < 1):
        raise _err(path, f"{where}.rank must be a positive integer, got {a['rank']!r}")
    for key in ("targets", "towers"):
        if key in a and (not isinstance(a[key], list) or not all(isinstance(x, str) for x in a[key])):
            raise _err(path, f"{where}.{key} must be a list of names")
    return a


def _task_specs(path: Path, where: str, value: Any) -> list[TaskSpec]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _err(path, f"{where} must be a list of task names (or mappings with 'name')")
    specs = []
    for item in value:
        if isinstance(item, str):
            specs.append(TaskSpec(item))
            continue
        entry = _check_keys(path, f"{where} entry", item, TASK_KEYS)
        if not isinstance(entry.get("name"), str):
            raise _err(path, f"{where} entry {item!r} has no 'name'")
        models = entry.get("models", [entry["model"]] if "model" in entry else None)
        specs.append(TaskSpec(entry["name"], models, _check_training(path, f"{where}.{entry['name']}.training", entry.get("training"))))
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise _err(path, f"{where} lists {dup[0]!r} twice")
    return specs


def validate(raw: dict, path: Path) -> Suite:
    """Check every key of a merged suite and build the ``Suite``."""
    _check_keys(path, "top level", raw, TOP_KEYS)
    training = _check_training(path, "training", raw.get("training"))
    if "steps" not in training:
        raise _err(path, "training.steps is missing (the fixed number of optimiser steps per run)")
    adapter = _check_adapter(path, "adapter", raw.get("adapter"))
    lr_grid = _lr_list(path, "lr_grid", raw.get("lr_grid"))
    seeds = raw.get("seeds")
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise _err(path, f"seeds must be a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise _err(path, f"seeds has duplicates: {seeds}")

    models = raw.get("models") or {}
    if isinstance(models, list):
        models = {"*": models}
    if not isinstance(models, dict) or not all(isinstance(v, list) and all(isinstance(m, str) for m in v) for v in models.values()):
        raise _err(path, "models must be a list of model names or a mapping family -> list of names")

    methods_raw = raw.get("methods")
    if not isinstance(methods_raw, dict) or not methods_raw:
        raise _err(path, "methods must be a non-empty list of method names or mapping name -> overrides")
    methods = []
    for label, entry in methods_raw.items():
        if not isinstance(label, str):
            raise _err(path, f"method entry {label!r} must be a name")
        e = _check_keys(path, f"methods.{label}", entry, METHOD_KEYS)
        grid = _lr_list(path, f"methods.{label}.lr_grid", e["lr_grid"]) if "lr_grid" in e else list(lr_grid)
        if "lr_grid" in e and grid != lr_grid and not e.get("lr_grid_reason"):
            # A different grid is allowed only where the method's literature needs another scale: say why.
            raise _err(path, f"methods.{label}.lr_grid differs from the shared lr_grid but has no lr_grid_reason")
        options = e.get("options") or {}
        if not isinstance(options, dict):
            raise _err(path, f"methods.{label}.options must be a mapping")
        fams = e.get("families")
        if fams is not None and (not isinstance(fams, list) or not all(f in ("llm", "vlm") for f in fams)):
            raise _err(path, f"methods.{label}.families must be a list of 'llm' / 'vlm'")
        methods.append(MethodSpec(
            label=label, method=str(e.get("method", label)), lr_grid=grid,
            lr_grid_reason=str(e.get("lr_grid_reason", "")), options=dict(options),
            adapter=_check_adapter(path, f"methods.{label}.adapter", e.get("adapter")),
            ablation=bool(e.get("ablation", False)), families=fams,
        ))

    tasks = _task_specs(path, "tasks", raw.get("tasks"))
    if not tasks:
        raise _err(path, "tasks is empty")
    dev_tasks = _task_specs(path, "dev_tasks", raw.get("dev_tasks"))
    overlap = sorted({t.name for t in tasks} & {t.name for t in dev_tasks})
    if overlap:
        raise _err(path, f"dev task {overlap[0]!r} is also a reported task; tuning must not see reported tasks")

    tune = raw.get("tune")
    if tune is not None:
        tune = dict(_check_keys(path, "tune", tune, TUNE_KEYS))
        if not dev_tasks:
            raise _err(path, "tune needs dev_tasks (a development task that is not reported)")
        if not isinstance(tune.get("options"), dict) or not tune["options"]:
            raise _err(path, "tune.options must map option names to lists of values")
        for k, v in tune["options"].items():
            if not isinstance(v, list) or not v:
                raise _err(path, f"tune.options.{k} must be a non-empty list of values")
        labels = {m.label for m in methods}
        tune_methods = tune.get("methods") or ["nalora"]
        for m in tune_methods:
            if m not in labels:
                raise _err(path, f"tune.methods names {m!r}, which is not among the suite's methods")
        tune["methods"] = list(tune_methods)
        tune["seeds"] = list(tune.get("seeds") or seeds[:1])
        tune["apply_to"] = list(tune.get("apply_to") or [m.label for m in methods if m.method.startswith("nalora")])

    return Suite(
        name=path.stem, path=str(path), description=str(raw.get("description", "")), models=models,
        tasks=tasks, dev_tasks=dev_tasks, methods=methods, seeds=list(seeds), adapter=adapter,
        training=training, tune=tune, task_paths=list(raw.get("task_paths") or []),
        assets=list(raw.get("assets") or []), raw=raw,
    )


def load_suite(name_or_path: str | Path, *, methods: list[str] | None = None, tasks: list[str] | None = None,
               seeds: list[int] | None = None, task_paths: list[str] | None = None) -> Suite:
    """Load, merge and validate a suite; ``methods`` / ``tasks`` / ``seeds`` keep only the named entries,
    ``task_paths`` add task folders (``--include-path``) to the suite's own."""
    raw, path = load_raw(name_or_path)
    suite = validate(raw, path)
    if methods:
        unknown = sorted(set(methods) - {m.label for m in suite.methods})
        if unknown:
            raise SuiteError(f"--methods: {unknown[0]!r} is not in suite {suite.name} (has: {', '.join(m.label for m in suite.methods)})")
        suite.methods = [m for m in suite.methods if m.label in methods]
    if tasks:
        unknown = sorted(set(tasks) - {t.name for t in suite.tasks})
        if unknown:
            raise SuiteError(f"--tasks: {unknown[0]!r} is not in suite {suite.name} (has: {', '.join(t.name for t in suite.tasks)})")
        suite.tasks = [t for t in suite.tasks if t.name in tasks]
    if seeds is not None:
        unknown = sorted(set(seeds) - set(suite.seeds))
        if unknown or not seeds:
            raise SuiteError(f"--seeds: {unknown[0] if unknown else 'nothing'} is not in suite {suite.name} "
                             f"(has: {', '.join(map(str, suite.seeds))})")
        suite.seeds = [s for s in suite.seeds if s in seeds]
    if task_paths:
        suite.task_paths = list(dict.fromkeys([*suite.task_paths, *map(str, task_paths)]))
    return suite
