"""Suite files: one defaults file plus small per-suite overrides (as peft's method_comparison).

A suite names models, tasks, methods, seeds, the shared adapter budget and per-method
hyperparameters. ``load_suite`` merges it over its ``extends`` parent (``defaults`` unless told
otherwise), validates types and ranges with the pydantic models of ``config.py``, loads the task folders,
checks every name (methods and their options, tasks, models) and returns a fully resolved ``Suite``.
Bad input raises ``SuiteError`` (a ``ValueError``) with one line naming the file and the key path,
before any run starts.
"""

from __future__ import annotations

import copy
import difflib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml
from pydantic import ValidationError

from benchmarks.runner.config import AdapterConfig, SuiteConfig, TaskEntry, TrainingConfig, one_line

SUITES_DIR = Path(__file__).resolve().parent.parent / "suites"

class SuiteError(ValueError):
    """A suite file is malformed; the message is one line naming the file and key."""


@dataclass
class MethodSpec:
    """One method entry: a label (column in tables) and the registered method it runs."""

    label: str
    method: str
    lr_grid: list[float]
    lr_bounds: tuple[float, float]  # the lr-extension rule stops at these (docs/protocol.md)
    seeds: list[int]
    adapter: AdapterConfig  # the shared budget with this entry's overrides
    lr_grid_reason: str = ""
    options: dict[str, Any] = field(default_factory=dict)  # as written in the suite
    resolved: dict[str, Any] | None = None  # every option, defaults filled (check_names: resolve_options)
    ablation: bool = False  # True: only in the ablation table, not in the main leaderboard
    families: list[str] | None = None  # restrict to task families ("llm", "vlm")
    tuned: bool = False  # a "<label>-tuned" entry: options chosen on dev tasks, reported apart


@dataclass
class TaskSpec:
    name: str
    training: TrainingConfig  # the suite's training with this task's overrides
    models: list[str] | None = None  # None: the suite's models for the task family (or its default)
    options: dict[str, Any] = field(default_factory=dict)  # task constructor options (get_task(name, **options))
    added: bool = False  # named by --tasks, not by the suite (it gets the suite's training settings)


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
    adapter: AdapterConfig
    training: TrainingConfig
    lr_grid: list[float]
    lr_bounds: tuple[float, float]
    tune: dict[str, Any] | None  # {"methods": {label: {option: [values]}}, "seeds": [...]}
    task_paths: list[str]
    assets: list[str]
    raw: dict[str, Any] = field(repr=False, default_factory=dict)
    declared_tasks: list[str] = field(default_factory=list)  # the file's tasks and dev tasks, before any --tasks
    # Built assets replaced by their stand-ins on this machine, {asset: stand-in}, and why: decided once per
    # grid by benchmarks.runner.built_models.resolve_built (empty: every model runs as named).
    substitutions: dict[str, str] = field(default_factory=dict)
    substitution_reason: str = ""

    def loaded_tasks(self) -> list[TaskSpec]:
        """The tasks a grid of this suite loads: the reported ones, and the dev tasks when it tunes options
        (nothing else reads them)."""
        return self.tasks + (self.dev_tasks if self.tune else [])

    def declared_models_for(self, spec: TaskSpec, family: str, default_model: str) -> list[str]:
        """The models the suite names for ``spec``: its own, else the suite's for its family, else the task's default."""
        if spec.models:
            return list(spec.models)
        if family in self.models:
            return list(self.models[family])
        if "*" in self.models:
            return list(self.models["*"])
        return [default_model]

    def models_for(self, spec: TaskSpec, family: str, default_model: str) -> list[str]:
        """The models ``spec`` runs on: ``declared_models_for`` with every substitution applied."""
        return list(dict.fromkeys(self.stand_in(m) for m in self.declared_models_for(spec, family, default_model)))

    def stand_in(self, model: str) -> str:
        """``model`` with each substituted part (``"vit-s-swiglu+smollm2-135m"``: each side of ``+``) replaced."""
        return "+".join(self.substitutions.get(part, part) for part in model.split("+"))

    def substituted(self, model: str) -> dict[str, str] | None:
        """What ran instead of the declared ``model``, for ``meta.substituted``: ``{asset: stand-in, "why": ...}``."""
        parts = {p: self.substitutions[p] for p in model.split("+") if p in self.substitutions}
        return {**parts, "why": self.substitution_reason} if parts else None


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
    if isinstance(data.get("task_paths"), list):
        # Relative task folders are relative to the suite file that names them, not to the working directory.
        data["task_paths"] = [str((path.parent / p).resolve()) if isinstance(p, str) else p for p in data["task_paths"]]
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


def _typed(path: Path, cls: type, data: Any, where: str) -> Any:
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise _err(path, one_line(err, where)) from None


def _task_specs(path: Path, where: str, entries: list, training: dict) -> list[TaskSpec]:
    specs = []
    for i, item in enumerate(entries):
        entry = TaskEntry(name=item) if isinstance(item, str) else item
        models = entry.models or ([entry.model] if entry.model else None)
        merged = deep_merge(training, entry.training)
        # Name the key where it was written: a task's own override, else the suite's training.
        try:
            TrainingConfig.model_validate(merged)
        except ValidationError as err:
            bad = str(err.errors()[0]["loc"][0])
            prefix = f"{where}.{entry.name}.training" if bad in entry.training else "training"
            raise _err(path, one_line(err, prefix)) from None
        specs.append(TaskSpec(entry.name, TrainingConfig.model_validate(merged), models, dict(entry.options)))
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise _err(path, f"{where} lists {dup[0]!r} twice")
    return specs


def _in_bounds(path: Path, where: str, grid: list[float], bounds: tuple[float, float]) -> None:
    lo, hi = bounds
    if lo > hi:
        raise _err(path, f"{where}.lr_bounds: lower bound {lo:g} is above upper bound {hi:g}")
    outside = [lr for lr in grid if not lo * (1 - 1e-9) <= lr <= hi * (1 + 1e-9)]
    if outside:
        raise _err(path, f"{where}.lr_grid has {outside[0]:g}, outside lr_bounds [{lo:g}, {hi:g}]")


def validate(raw: dict, path: Path) -> Suite:
    """Check every key and value of a merged suite (types and ranges) and build the ``Suite``.

    Names (methods, options, tasks, models) are checked by ``check_names``, once plugins are loaded.
    """
    cfg: SuiteConfig = _typed(path, SuiteConfig, raw, "")
    training = _typed(path, TrainingConfig, cfg.training, "training")
    adapter = _typed(path, AdapterConfig, cfg.adapter, "adapter")
    _in_bounds(path, "top level", cfg.lr_grid, cfg.lr_bounds)
    models = {"*": list(cfg.models)} if isinstance(cfg.models, list) else dict(cfg.models)

    methods = []
    for label, e in cfg.methods.items():
        grid = list(e.lr_grid) if e.lr_grid is not None else list(cfg.lr_grid)
        if e.lr_grid is not None and grid != list(cfg.lr_grid) and not e.lr_grid_reason:
            # A different grid is allowed only where the method's literature needs another scale: say why.
            raise _err(path, f"methods.{label}.lr_grid differs from the shared lr_grid but has no lr_grid_reason")
        bounds = tuple(e.lr_bounds) if e.lr_bounds is not None else tuple(cfg.lr_bounds)
        _in_bounds(path, f"methods.{label}", grid, bounds)
        seeds = list(e.seeds) if e.seeds is not None else list(cfg.seeds)
        if len(set(seeds)) != len(seeds):
            raise _err(path, f"methods.{label}.seeds: has duplicates, got {seeds}")
        methods.append(MethodSpec(
            label=label, method=e.method or label, lr_grid=grid, lr_bounds=bounds, seeds=seeds,
            adapter=_typed(path, AdapterConfig, deep_merge(cfg.adapter, e.adapter), f"methods.{label}.adapter"),
            lr_grid_reason=e.lr_grid_reason, options=dict(e.options), ablation=e.ablation, families=e.families,
        ))

    tasks = _task_specs(path, "tasks", cfg.tasks, cfg.training)
    dev_tasks = _task_specs(path, "dev_tasks", cfg.dev_tasks, cfg.training)
    overlap = sorted({t.name for t in tasks} & {t.name for t in dev_tasks})
    if overlap:
        raise _err(path, f"dev task {overlap[0]!r} is also a reported task; tuning must not see reported tasks")

    tune = None
    if cfg.tune is not None:
        tune = _tune(path, cfg, methods, dev_tasks)
        by_label = {m.label: m for m in methods}
        for label in tune["methods"]:
            m = by_label[label]
            # Tuned results are a separate entry, reported apart from the main table (docs/protocol.md).
            methods.append(MethodSpec(
                label=f"{label}-tuned", method=m.method, lr_grid=list(m.lr_grid), lr_bounds=m.lr_bounds,
                seeds=list(m.seeds), adapter=m.adapter, lr_grid_reason=m.lr_grid_reason, options=dict(m.options),
                ablation=True, families=m.families, tuned=True,
            ))

    return Suite(
        name=path.stem, path=str(path), description=cfg.description, models=models, tasks=tasks,
        dev_tasks=dev_tasks, methods=methods, seeds=list(cfg.seeds), adapter=adapter, training=training,
        lr_grid=list(cfg.lr_grid), lr_bounds=tuple(cfg.lr_bounds), tune=tune, task_paths=list(cfg.task_paths),
        assets=list(cfg.assets), raw=raw, declared_tasks=[t.name for t in tasks + dev_tasks],
    )


def _tune(path: Path, cfg: SuiteConfig, methods: list[MethodSpec], dev_tasks: list[TaskSpec]) -> dict:
    """The tune section: known labels, and the same number of configurations for every tuned method."""
    from benchmarks.runner.grid import option_grid

    if not dev_tasks:
        raise _err(path, "tune needs dev_tasks (a development task that is not reported)")
    labels = {m.label for m in methods}
    sizes = {}
    for label, options in cfg.tune.methods.items():
        if label not in labels:
            raise _err(path, f"tune.methods names {label!r}, which is not among the suite's methods")
        if not options:
            raise _err(path, f"tune.methods.{label}: give at least one option with a list of values")
        sizes[label] = len(option_grid(options))
    if len(set(sizes.values())) > 1:
        # Equal tuning budget: a method tuned over more configurations would win by search, not by design.
        desc = ", ".join(f"{k}: {v}" for k, v in sizes.items())
        raise _err(path, f"tune.methods: every tuned method needs the same number of configurations ({desc})")
    return {"methods": {k: dict(v) for k, v in cfg.tune.methods.items()},
            "seeds": list(cfg.tune.seeds or cfg.seeds[:1])}


def resolve_method_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """Every option of registered ``method`` with its defaults filled in; ``ValueError`` on a bad option.

    ``Method.resolve_options`` (nalora's registry) is the source; methods written before it existed
    fall back to NA-LoRA's ``config(...).to_dict()`` or to the options as given.
    """
    from nalora.methods import get_method

    m = get_method(method)
    fn = getattr(m, "resolve_options", None)
    if callable(fn):
        return dict(fn(dict(options)))
    if callable(getattr(m, "config", None)):
        return dict(m.config(dict(options)).to_dict())
    allowed = getattr(m, "options", None)
    if isinstance(allowed, (set, frozenset)):
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(f"unknown option {unknown[0]!r} for method {method!r} (known: {sorted(allowed)})")
    return dict(options)


def did_you_mean(name: str, known: list[str] | set[str]) -> str:
    """``" (did you mean a, b?)"`` for the registered names closest to a misspelt ``name``, else ``""``."""
    near = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(near)}?)" if near else ""


def check_model_name(name: str) -> None:
    """``ValueError`` for a model name that cannot exist: not an asset, a tiny test model, a hub id or a folder.

    Only cheap checks (no download, no cache access): names with ``/`` or ``hub:`` are left to the loader.
    """
    from benchmarks.assets.registry import SPECS
    from tasks.common import tiny_model_names

    tiny = set(tiny_model_names())
    for part in name.split("+"):
        if "/" in part or ":" in part or part in tiny or Path(part).expanduser().is_dir():
            continue
        spec = SPECS.get(part)
        if spec is None:
            known = sorted(n for n, s in SPECS.items() if s.kind == "model")
            raise ValueError(f"unknown model {part!r}{did_you_mean(part, known + sorted(tiny))} (asset models: "
                             f"{', '.join(known)}; test models: `nalora-bench list models`; or a hub id org/name)")
        if spec.kind != "model":
            raise ValueError(f"{part!r} is a dataset, not a model")


def check_task_options(task_cls: type, options: dict[str, Any]) -> None:
    """``ValueError`` naming the first option that ``task_cls``'s constructor does not accept."""
    try:
        params = inspect.signature(task_cls).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return  # takes **kwargs: the constructor itself judges them
    accepted = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for key in options:
        if key not in accepted:
            raise ValueError(f"{key}: not an option of task {getattr(task_cls, 'name', task_cls.__name__)!r}"
                             f"{did_you_mean(key, accepted)} (accepts: {', '.join(accepted) or 'none'})")


def _known_tasks(suite: Suite) -> list[str]:
    from tasks import registry

    return sorted(set(registry.list_tasks()) | set(suite.declared_tasks))


def check_names(suite: Suite, resolver: Callable[[str], Any]) -> None:
    """Check names against the registries (plugins loaded first): methods, their options, tasks, models.

    Fills ``MethodSpec.resolved``. Raises ``SuiteError`` (one line) on the first unknown name.
    """
    from tasks import registry

    path = Path(suite.path)
    try:
        registry.load_tasks(include_paths=suite.task_paths)  # plugin tasks and the methods they register
    except FileNotFoundError as err:
        raise _err(path, f"task_paths: {err}") from None
    for m in suite.methods:
        where = f"methods.{m.label}" if not m.tuned else f"tune.methods.{m.label[:-len('-tuned')]}"
        try:
            from nalora.methods import get_method

            get_method(m.method)
        except ValueError as err:
            raise _err(path, f"methods.{m.label}.method: {err}") from None
        try:
            m.resolved = resolve_method_options(m.method, m.options)
        except (ValueError, TypeError) as err:
            raise _err(path, f"methods.{m.label}.options: {_first_line(err)}") from None
        if m.tuned:
            from benchmarks.runner.grid import option_grid

            for combo in option_grid(suite.tune["methods"][m.label[:-len("-tuned")]]):
                try:
                    resolve_method_options(m.method, {**m.options, **combo})
                except (ValueError, TypeError) as err:
                    raise _err(path, f"{where}: {combo} is not valid: {_first_line(err)}") from None
    for where, specs in (("tasks", suite.tasks), ("dev_tasks", suite.dev_tasks)):
        for spec in specs:
            try:
                task = resolver(spec.name)
            except KeyError:
                msg = f"unknown task {spec.name!r}{did_you_mean(spec.name, _known_tasks(suite))} (`nalora-bench list tasks` lists them)"
                if spec.added:
                    raise SuiteError(f"--tasks: {msg}") from None
                raise _err(path, f"{where}: {msg}") from None
            if spec.options:
                key = f"{where}.{spec.name}.options"
                try:
                    check_task_options(type(task), spec.options)
                except ValueError as err:
                    raise _err(path, f"{key}.{err}") from None
                try:
                    task = resolver(spec.name, **spec.options)  # the constructor's own checks, before any run
                except (ValueError, TypeError) as err:
                    raise _err(path, f"{key}: {_first_line(err)}") from None
            for model in suite.models_for(spec, task.family, task.default_model):
                try:
                    check_model_name(model)
                except ValueError as err:
                    raise _err(path, f"models ({where}.{spec.name}): {err}") from None


def _first_line(err: BaseException) -> str:
    text = (err.args[0] if isinstance(err, KeyError) and err.args else str(err)).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _select_models(suite: Suite, models: list[str]) -> None:
    """``--models``: names that are all among the suite's own models keep only those, each task on its own
    family's (``--models smollm2-135m`` on ``default``: the language tasks on SmolLM2, no vision-language task);
    any other name replaces the models of every task (asset, test, hub or local models)."""
    tasks = suite.tasks + suite.dev_tasks
    own = {m for names in suite.models.values() for m in names} | {m for t in tasks for m in t.models or ()}
    if not set(models) <= own:
        suite.models = {"*": models}
        for t in tasks:
            t.models = None
        return
    # "*" too, even where the suite has none: a family it does not name falls back to "*", not to a task's default
    suite.models = {family: [m for m in names if m in models] for family, names in {"*": [], **suite.models}.items()}
    for t in tasks:
        if t.models:
            t.models = [m for m in t.models if m in models]
    # a task of its own models, none of them named, runs nowhere
    suite.tasks = [t for t in suite.tasks if t.models is None or t.models]
    suite.dev_tasks = [t for t in suite.dev_tasks if t.models is None or t.models]


def load_suite(name_or_path: str | Path, *, methods: list[str] | None = None, tasks: list[str] | None = None,
               seeds: list[int] | None = None, task_paths: list[str] | None = None,
               resolver: Callable[[str], Any] | None = None, check: bool = True,
               models: list[str] | None = None) -> Suite:
    """Load, merge and validate a suite; ``methods`` / ``seeds`` keep only the named entries,
    ``task_paths`` add task folders (``--include-path``) to the suite's own.

    ``tasks`` (``--tasks``) may name any registered task: the suite's own entries keep their settings, any
    other task gets the suite's training settings and its family's models. ``models`` (``--models``): see
    ``_select_models``.

    With ``check`` (the default) names are checked too (``check_names``), with ``resolver(task) -> Task``
    (default: the task registry with the suite's task folders loaded).
    """
    raw, path = load_raw(name_or_path)
    suite = validate(raw, path)
    for flag, given in (("--methods", methods), ("--tasks", tasks), ("--seeds", seeds), ("--models", models)):
        if given is not None and not given:
            raise SuiteError(f"{flag}: empty; leave the flag out to keep every entry of suite {suite.name}")
    if methods:
        unknown = sorted(set(methods) - {m.label for m in suite.methods})
        if unknown:
            raise SuiteError(f"--methods: {unknown[0]!r} is not in suite {suite.name} (has: {', '.join(m.label for m in suite.methods)})")
        suite.methods = [m for m in suite.methods if m.label in methods]
    if tasks:
        dev = [n for n in tasks if n in {t.name for t in suite.dev_tasks}]
        if dev:
            raise SuiteError(f"--tasks: {dev[0]!r} is a dev task of suite {suite.name}; tuning must not see reported tasks")
        own = {t.name for t in suite.tasks}
        added = [TaskSpec(n, suite.training.model_copy(deep=True), added=True) for n in dict.fromkeys(tasks) if n not in own]
        suite.tasks = [t for t in suite.tasks if t.name in tasks] + added
    if models:
        for name in models:
            try:
                check_model_name(name)
            except ValueError as err:
                raise SuiteError(f"--models: {err}") from None
        _select_models(suite, list(dict.fromkeys(models)))
    if seeds is not None:
        every = sorted({s for m in suite.methods for s in m.seeds} | set(suite.seeds))
        unknown = sorted(set(seeds) - set(every))
        if unknown:
            raise SuiteError(f"--seeds: {unknown[0]} is not in suite {suite.name} (has: {', '.join(map(str, every))})")
        suite.seeds = [s for s in suite.seeds if s in seeds]
        for m in suite.methods:
            m.seeds = [s for s in m.seeds if s in seeds]
        suite.methods = [m for m in suite.methods if m.seeds]
    if task_paths:
        suite.task_paths = list(dict.fromkeys([*suite.task_paths, *map(str, task_paths)]))
    if check:
        if resolver is None:
            from benchmarks.runner.execute import make_resolver

            resolver = make_resolver(suite.task_paths)
        check_names(suite, resolver)
    return suite
