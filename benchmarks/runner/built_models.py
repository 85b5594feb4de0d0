"""Models a grid builds rather than downloads (issue 13: the distilled gated ViT ``vit-s-swiglu``).

``resolve_built`` decides once per grid, before it starts, for every built asset its models name
(``benchmarks.vlm.distill.STAND_INS``):

- cached: used as it is, on any machine;
- not cached, a GPU here: built once, now (``fetch``, which runs the asset's converter: one line says it
  builds and roughly how long, then the build's progress bar);
- not cached, no GPU: its random tiny stand-in runs instead, said on one line. The model name changes, so
  the run ids do too (a different model is a different run), and every affected run records
  ``meta.substituted`` (``{"vit-s-swiglu": "tiny-vit-swiglu", "why": ...}``), which the report's findings list.

The decision is kept on the suite (``Suite.substitutions``) and applied by ``Suite.models_for``, where a
grid's models are resolved, so ``nalora-bench run``, ``run_all.sh`` and ``assets_needed`` agree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from benchmarks.runner.suite import Suite

NO_GPU_REASON = ("{asset} is not in the asset cache and this machine has no GPU to build it ({estimate}); "
                 "a random {stand_in} (not distilled) runs in its place")


@dataclass
class BuiltPlan:
    """What ``resolve_built`` decided: cached names, names to build here, names replaced by a stand-in."""

    cached: list[str] = field(default_factory=list)
    build: list[str] = field(default_factory=list)
    substituted: dict[str, str] = field(default_factory=dict)

    def inputs(self) -> list[str]:
        """The cached assets the builds read (teacher, image sets), to fetch before them."""
        from benchmarks.vlm.distill import build_inputs

        return build_inputs() if self.build else []


def built_assets(suite: Suite, info_of: Callable[[str], Any]) -> list[str]:
    """The built assets (``STAND_INS``) named by a model of the tasks ``suite`` loads (``Suite.loaded_tasks``).

    ``info_of(task) -> TaskFacts`` (family and default model; ``benchmarks.runner.grid``)."""
    from benchmarks.vlm.distill import STAND_INS

    names: set[str] = set()
    for t in suite.loaded_tasks():
        facts = info_of(t.name)
        for model in suite.declared_models_for(t, facts.family, facts.default_model):
            names |= {part for part in model.split("+") if part in STAND_INS}
    return sorted(names)


def resolve_built(suite: Suite, info_of: Callable[[str], Any], *, build: bool = True,
                  cache_dir: str | None = None, log: Callable[[str], None] = print) -> BuiltPlan:
    """Decide (and with ``build``, on a GPU, build) every built asset ``suite`` names; set ``suite.substitutions``.

    ``build=False`` (a dry run, ``assets_needed``) decides without building: what would be built is listed
    in the plan and said in one line."""
    import torch

    from benchmarks.assets import Cache
    from benchmarks.vlm.distill import BUILD_ESTIMATE, STAND_INS

    plan = BuiltPlan()
    cache = Cache(cache_dir)
    for name in built_assets(suite, info_of):
        if cache.has(name):
            plan.cached.append(name)
        elif torch.cuda.is_available():
            plan.build.append(name)
        else:
            plan.substituted[name] = STAND_INS[name]
    if plan.substituted:
        suite.substitutions = dict(plan.substituted)
        suite.substitution_reason = "; ".join(
            NO_GPU_REASON.format(asset=a, stand_in=s, estimate=BUILD_ESTIMATE) for a, s in plan.substituted.items())
        log(f"note: {suite.substitution_reason}; those runs have their own ids and record meta.substituted")
    if plan.build and not build:
        log(f"would build {', '.join(plan.build)} before the grid ({BUILD_ESTIMATE})")
    elif plan.build:
        _fetch(plan.inputs() + plan.build, cache_dir)
    return plan


def _fetch(names: list[str], cache_dir: str | None) -> None:
    """Fetch (build) ``names`` into the asset cache; a seam the tests replace."""
    from benchmarks.assets import fetch
    from benchmarks.progress_env import progress_enabled

    fetch(names, cache_dir=cache_dir, progress=progress_enabled())
