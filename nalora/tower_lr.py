"""Per-tower learning-rate multipliers: the parameters of one tower train at ``lr x scale``.

A two-tower model (vision encoder + language model) tuned at a language-model learning rate can have its
vision tower rewritten within a few steps: Adam moves every weight by about ``lr`` whatever its gradient. The
multiplier splits each parameter group the method built (LoRA+'s A / B groups, DoRA's magnitudes, NA-LoRA's
adapters, ...) by tower and scales the split-off group's lr, so every ratio a method sets inside a tower is
kept, and step hooks that act on parameters (NA-LoRA's ``StepRescaler``) see the scaled step.

A parameter's tower comes from the injection plan (the modules it adapts, each with its tower); for methods
without a plan (``full``) from discovery's tower classifier. The task's shared trainables (``Adapted.trainable``:
a VLM connector, a probe head) belong to no tower: they keep their own learning rate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from nalora.discovery import TOWERS, tower_classifier

if TYPE_CHECKING:
    from nalora.adapted import Adapted

__all__ = ["check_tower_scales", "param_towers", "scale_tower_lrs"]


def check_tower_scales(scales: Mapping[str, Any] | None) -> dict[str, float]:
    """``{tower: scale}`` validated (known tower, finite number > 0); a one-line ``ValueError`` otherwise."""
    out: dict[str, float] = {}
    for tower, scale in (scales or {}).items():
        if tower not in TOWERS:
            raise ValueError(f"tower_lr_scale: unknown tower {tower!r}; towers: {', '.join(TOWERS)}")
        ok = isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale) and scale > 0
        if not ok:
            raise ValueError(f"tower_lr_scale.{tower} must be a finite number > 0, got {scale!r}")
        out[tower] = float(scale)
    return out


def _base(model: torch.nn.Module) -> torch.nn.Module:
    # peft wraps the targeted Linears in place: the plan's module paths are paths of the base model.
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def param_towers(adapted: "Adapted") -> dict[int, str]:
    """``id(parameter) -> tower`` for every trainable tower parameter of ``adapted`` (shared trainables excluded)."""
    base = _base(adapted.model)
    shared = {id(p) for t in adapted.trainable for p in base.get_submodule(t).parameters()}
    out: dict[int, str] = {}
    if adapted.plan is not None:  # adapter methods: the adapted modules, each with the tower the plan gave it
        for target in adapted.plan.items:
            for p in base.get_submodule(target.module).parameters():
                if p.requires_grad and id(p) not in shared:
                    out[id(p)] = target.tower
        return out
    tower_of = tower_classifier(base)  # no plan (full fine-tuning): every trained module by discovery's rule
    for name, p in base.named_parameters():
        if p.requires_grad and id(p) not in shared:
            out[id(p)] = tower_of(name.rpartition(".")[0])
    return out


def scale_tower_lrs(optimizer: torch.optim.Optimizer, towers: Mapping[int, str],
                    scales: Mapping[str, float]) -> dict[str, dict[str, Any]]:
    """Split every param group of ``optimizer`` so that the parameters of a scaled tower (``towers``:
    ``id(parameter) -> tower``) sit in a copy of their group at ``lr x scale``; other options are kept.

    Call before the lr scheduler is built (a group's lr is its schedule's base). Returns, per scaled tower,
    ``{"scale", "tensors", "numel"}``: what was moved (0 tensors: the tower has no trained parameter).
    """
    scales = check_tower_scales(scales)
    summary = {t: {"scale": s, "tensors": 0, "numel": 0} for t, s in scales.items()}
    groups: list[dict[str, Any]] = []
    for group in optimizer.param_groups:
        parts: dict[str | None, list[torch.Tensor]] = {}
        for p in group["params"]:
            tower = towers.get(id(p))
            parts.setdefault(tower if tower in scales else None, []).append(p)
        for tower, params in parts.items():
            if tower is None:
                groups.append({**group, "params": params})
                continue
            s = scales[tower]
            scaled = {**group, "params": params, "lr": group["lr"] * s}
            if "initial_lr" in group:  # a scheduler already saw the group: its base moves too
                scaled["initial_lr"] = group["initial_lr"] * s
            groups.append(scaled)
            summary[tower]["tensors"] += len(params)
            summary[tower]["numel"] += sum(p.numel() for p in params)
    optimizer.param_groups[:] = groups
    return summary
