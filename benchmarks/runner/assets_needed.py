"""Print the offline assets a suite needs (models and task datasets), space-separated, for ``fetch``.

``python -m benchmarks.runner.assets_needed SUITE [--tasks a,b] [--models m] [--missing] [...]`` (other flags are
ignored); ``--missing`` prints only those not yet in the asset cache (what a fetch would download).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable


def assets_needed(suite_name: str, tasks: list[str] | None = None, resolver=None,
                  include_paths: list[str] | None = None, models: list[str] | None = None) -> list[str]:
    """Asset-cache names of the tasks a grid of the suite loads (``Suite.loaded_tasks``; ``Task.assets``: models,
    datasets, what a composed VLM's connector is aligned on), without hub-only tasks and names the cache does not
    know (tiny test models). Built assets follow ``resolve_built``'s decision: on a machine that cannot build
    them their stand-in's assets are listed; a build to come is listed last, after what it reads."""
    from benchmarks.runner.execute import make_resolver
    from benchmarks.runner.suite import load_suite

    suite = load_suite(suite_name, tasks=tasks, task_paths=include_paths, models=models)
    needed, build = suite_assets(suite, resolver or make_resolver(suite.task_paths))
    return needed + build


def suite_assets(suite: Any, resolver: Callable[[str], Any]) -> tuple[list[str], list[str]]:
    """(the cached assets a loaded suite reads, the built assets it would build first): see ``assets_needed``."""
    from benchmarks.assets import SPECS
    from benchmarks.runner.built_models import resolve_built
    from benchmarks.runner.execute import resolve_task
    from benchmarks.runner.grid import TaskFacts

    specs = {s.name: s for s in suite.loaded_tasks()}
    found = {n: resolve_task(resolver, {"task": n, "task_options": s.options}) for n, s in specs.items()}
    # Silent: `nalora-bench run` says what it substitutes or builds, once, when the grid starts.
    plan = resolve_built(suite, lambda n: TaskFacts(found[n].family, found[n].default_model), build=False,
                         log=lambda line: None)
    names: list[str] = list(suite.assets) + plan.inputs()
    for name, task in found.items():
        if getattr(task, "requires_network", False) or not callable(getattr(task, "assets", None)):
            continue
        for model in suite.models_for(specs[name], task.family, task.default_model):
            names += task.assets(model)
    return sorted({n for n in names if n in SPECS} - set(plan.build)), list(plan.build)


def check_cached(suite: Any, resolver: Callable[[str], Any]) -> None:
    """Raise ``AssetError`` (one line) when an asset the suite reads is not in the asset cache.

    Before any run starts: a missing dataset would otherwise give every run of its task another id (its data
    identity is unknown) and a ``failed`` record each."""
    from benchmarks.assets import Cache
    from benchmarks.assets.cache import AssetError
    from benchmarks.vlm.distill import build_inputs

    cache = Cache()
    needed, build = suite_assets(suite, resolver)
    fetched = set(build_inputs()) if build else set()  # a build fetches what it reads before it starts
    missing = [n for n in needed if not cache.has(n) and n not in fetched]
    if missing:
        raise AssetError(f"suite {suite.name} needs asset(s) not in the cache {cache.root}: {', '.join(missing)}; "
                         f"run `nalora-bench fetch {' '.join(missing)}`")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("suite")
    p.add_argument("--tasks", default=None)
    p.add_argument("--models", default=None)
    p.add_argument("--include-path", action="append", default=[])
    p.add_argument("--missing", action="store_true")
    args, _ = p.parse_known_args(argv)
    try:
        names = assets_needed(args.suite, [t for t in (args.tasks or "").split(",") if t] or None,
                              include_paths=args.include_path,
                              models=[m for m in (args.models or "").split(",") if m] or None)
        if args.missing:
            from benchmarks.assets import Cache

            cache = Cache()
            names = [n for n in names if not cache.has(n)]
    except (ValueError, KeyError) as err:
        print(f"run_all.sh: error: {err}", file=sys.stderr)
        return 2
    print(" ".join(names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
