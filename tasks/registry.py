"""The task registry: ``@register_task("name")`` plus discovery of task files and plugins.

Tasks are found three ways (``load_tasks``):

1. built in: every module under ``tasks/llm`` and ``tasks/vlm`` is imported and every ``*.yaml`` there
   is loaded;
2. a user's folders (``include_paths``, the CLI's ``--include-path DIR``): ``*.py`` and ``*.yaml`` files;
3. entry points of installed packages in the group ``nalora_bench.tasks`` (loading the entry point
   imports the module that registers its tasks; an entry point that is itself a ``Task`` subclass
   is registered under its ``name``).

A file that fails to load is recorded as a ``TaskLoadError`` (path + one-line problem) and does not
hide the other tasks. A name clash is different: a plugin that registers a built-in task's name, or two
files that register one name, would make the task that runs depend on load order, so ``load_tasks``
raises ``TaskNameClash`` naming both definitions.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import pkgutil
import sys
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TypeVar

from tasks.base import Task

ENTRY_POINT_GROUP = "nalora_bench.tasks"
BUILTIN_PACKAGES = ("tasks.llm", "tasks.vlm")

T = TypeVar("T", bound=type)


class TaskNameClash(ValueError):
    """Two different definitions registered under one task name (the message names both)."""


@dataclass(frozen=True)
class TaskLoadError:
    """A task file or plugin that could not be loaded."""

    path: str
    problem: str
    clash: bool = False
    """The file's task name is already taken by another definition: fatal at ``load_tasks``."""

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


_TASKS: dict[str, type[Task]] = {}
_SOURCES: dict[str, str] = {}  # task name -> "builtin" | "include:<path>" | "entry-point:<dist>" | "python"
_ERRORS: list[TaskLoadError] = []
_LOADED: set[str] = set()  # keys of what load_tasks already imported, so repeated calls are cheap
_current_source: list[str] = []  # source label of the file being loaded (a stack: loads may nest)


def _origin(cls: type) -> str:
    """Where ``cls`` was defined, used to tell a re-import from a real name clash."""
    if getattr(cls, "_task_file", None):  # YAML tasks: the file, not the shared builder module
        return str(cls._task_file)
    try:
        return str(Path(inspect.getfile(cls)).resolve()) + "::" + cls.__qualname__
    except (TypeError, OSError):
        return f"{cls.__module__}.{cls.__qualname__}"


def register_task(name: str, *, source: str | None = None) -> Callable[[T], T]:
    """Class decorator registering a ``Task`` subclass under ``name`` (sets ``cls.name``).

    Registering a different class under a name already taken raises ``ValueError``; re-registering the
    same class (a module imported twice) replaces the entry silently.
    """
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise ValueError(f"task name must be a non-empty string without surrounding spaces, got {name!r}")

    def decorator(cls: T) -> T:
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise ValueError(f"@register_task({name!r}) must decorate a tasks.base.Task subclass, got {cls!r}")
        old = _TASKS.get(name)
        if old is not None and _origin(old) != _origin(cls):
            new_source = source or (_current_source[-1] if _current_source else "python")
            raise TaskNameClash(
                f"task {name!r} is already registered by {_origin(old)} ({_SOURCES.get(name, '?')}); "
                f"{_origin(cls)} ({new_source}) cannot reuse the name: rename one of them"
            )
        cls.name = name
        _TASKS[name] = cls
        _SOURCES[name] = source or (_current_source[-1] if _current_source else "python")
        return cls

    return decorator


def unregister_task(name: str) -> None:
    """Remove ``name`` from the registry (tests, interactive use)."""
    _TASKS.pop(name, None)
    _SOURCES.pop(name, None)


def task_class(name: str) -> type[Task]:
    """The registered class of ``name``; loads the built-in tasks and plugins first if needed."""
    if name not in _TASKS:
        load_tasks()
    if name not in _TASKS:
        known = ", ".join(sorted(_TASKS)) or "none"
        hint = ""
        if _ERRORS:
            hint = f"; {len(_ERRORS)} task file(s) failed to load (see `nalora-bench list tasks`)"
        raise KeyError(f"unknown task {name!r}; known tasks: {known}{hint}")
    return _TASKS[name]


def get_task(name: str, **kwargs) -> Task:
    """A fresh instance of the task registered as ``name`` (``kwargs`` go to its constructor)."""
    return task_class(name)(**kwargs)


def list_tasks(family: str | None = None) -> list[str]:
    """Sorted names of the registered tasks, optionally of one family (``llm`` | ``vlm``)."""
    return sorted(n for n, c in _TASKS.items() if family is None or c.family == family)


def registered_classes() -> set[type]:
    """Every class registered under some task name."""
    return set(_TASKS.values())


def task_source(name: str) -> str:
    """Where ``name`` came from: ``builtin``, ``include:<file>``, ``entry-point:<dist>`` or ``python``."""
    return _SOURCES.get(name, "?")


def load_errors() -> list[TaskLoadError]:
    """Every task file or plugin that failed to load so far."""
    return list(_ERRORS)


def _record(path: str, err: BaseException, clash: bool = False) -> None:
    # One line: the exception type and message; the last frame in the file itself if we can find it.
    where = ""
    for frame in reversed(traceback.extract_tb(err.__traceback__)):
        if frame.filename == path:
            where = f" (line {frame.lineno})"
            break
    msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
    problem = f"{type(err).__name__}{where}: {msg}" if msg else f"{type(err).__name__}{where}"
    error = TaskLoadError(path, problem, clash)
    if error not in _ERRORS:
        _ERRORS.append(error)


def _load_yaml(path: Path, source: str) -> None:
    from tasks.yaml_task import task_class_from_yaml  # yaml + datasets only when a YAML exists

    cls = task_class_from_yaml(path)
    register_task(cls.name, source=source)(cls)


def _load_py(path: Path, source: str) -> None:
    # A unique module name per file so that two folders may both hold a "my_task.py".
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    mod_name = f"nalora_bench_user_tasks.{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(mod_name, None)
        raise


def _guarded(key: str, path: str, source: str, fn: Callable[[], None]) -> None:
    if key in _LOADED:
        return
    _current_source.append(source)
    try:
        fn()
        _LOADED.add(key)
    except Exception as err:  # noqa: BLE001 - one broken file must not hide the others
        _LOADED.add(key)
        _record(path, err, clash=isinstance(err, TaskNameClash))
    finally:
        _current_source.pop()


def _load_builtin() -> None:
    for pkg_name in BUILTIN_PACKAGES:
        try:
            pkg = importlib.import_module(pkg_name)
        except ModuleNotFoundError as err:
            if err.name == pkg_name:  # the folder does not exist (yet): nothing to load
                continue
            _record(pkg_name.replace(".", "/"), err)
            continue
        for folder in pkg.__path__:
            for info in pkgutil.walk_packages([folder], prefix=pkg_name + "."):
                mod_path = str(Path(folder, *info.name.split(".")[2:])) + ("" if info.ispkg else ".py")
                _guarded(
                    "mod:" + info.name, mod_path, "builtin",
                    lambda n=info.name: importlib.import_module(n),  # type: ignore[misc]
                )
            for yml in sorted(Path(folder).rglob("*.yaml")):
                _guarded("yaml:" + str(yml.resolve()), str(yml), "builtin", lambda p=yml: _load_yaml(p, "builtin"))


def _load_include_path(directory: str | Path) -> None:
    folder = Path(directory).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"--include-path {directory}: not a directory")
    folder = folder.resolve()
    for file in sorted(folder.iterdir()):
        if file.name.startswith((".", "_")):
            continue
        source = f"include:{file}"
        if file.suffix == ".py":
            _guarded("py:" + str(file), str(file), source, lambda f=file, s=source: _load_py(f, s))
        elif file.suffix in (".yaml", ".yml"):
            _guarded("yaml:" + str(file), str(file), source, lambda f=file, s=source: _load_yaml(f, s))


def _load_entry_points() -> None:
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(getattr(ep, "dist", None), "name", None) or "?"
        source = f"entry-point:{dist}"

        def load(ep=ep, source=source) -> None:
            obj = ep.load()
            if isinstance(obj, type) and issubclass(obj, Task):
                register_task(obj.name or ep.name, source=source)(obj)  # a taken name raises TaskNameClash

        _guarded(f"ep:{ep.name}={ep.value}", f"entry point {ep.name} = {ep.value} ({dist})", source, load)


def load_tasks(
    include_paths: Iterable[str | Path] = (), *, builtin: bool = True, entry_points: bool = True
) -> list[TaskLoadError]:
    """Register the built-in tasks, the tasks in ``include_paths`` and the installed plugins.

    Idempotent: files already loaded are skipped. Returns every load error recorded so far (a missing
    include folder raises ``FileNotFoundError`` instead, since that is a typo on the command line).
    Raises ``TaskNameClash`` while two definitions claim one task name (on every call, not just the first).
    """
    if builtin:
        _load_builtin()
    for directory in include_paths:
        _load_include_path(directory)
    if entry_points:
        _load_entry_points()
    clashes = [e for e in _ERRORS if e.clash]
    if clashes:
        more = f" (and {len(clashes) - 1} more name clash(es))" if len(clashes) > 1 else ""
        raise TaskNameClash(f"{clashes[0].path}: {clashes[0].problem.split(': ', 1)[-1]}{more}")
    return load_errors()
