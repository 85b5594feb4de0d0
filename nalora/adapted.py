"""``Adapted``: the one object a training loop talks to, whatever the method."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from nalora.tower_lr import check_tower_scales, param_towers, scale_tower_lrs

if TYPE_CHECKING:
    from nalora.methods.peft_lora import RowGuard
    from nalora.methods.registry import Method
    from nalora.plan import TargetPlan
    from nalora.rescale import StepRescaler

# Keys of the old untyped ``Adapted.options`` dict that are typed fields now (key -> attribute).
_TYPED_KEYS = {
    "plan": "plan",
    "row_guards": "row_guards",
    "notes": "notes",
    "trainable": "trainable",
    "hparams": "hparams",
    "nalora_config": "method_config",
    "frozen_rows": "frozen_rows",
}


@dataclass(init=False)
class Adapted:
    """A model with a method applied.

    ``model`` is a peft ``PeftModel`` for adapter methods, the base model for ``full`` / ``head``.
    ``report`` has one row per adapted module (name, tower, role, layout, applied method), so a run
    records exactly what was touched and what fell back to plain LoRA.
    ``plan``: the resolved ``TargetPlan`` (``None`` for ``full`` / ``head``); ``plan.ffns`` are the gated
    FFNs of the targeted towers, so nobody needs to run discovery again.
    ``row_guards``: the held rows of packed matrices. ``notes``: what the plan and the method had to say.
    ``method_config``: every option of the method with its defaults filled in (``Method.resolve_options``).
    ``hparams``: targets, towers, rank, alpha, dropout as injected. ``trainable``: non-adapter modules trained.
    ``controller``: the step hooks of NA-LoRA (``NALoRAController``) or of ``lora_gate_scaled``.
    ``extras``: a method's private state (e.g. PiSSA's initial adapter).
    ``tower_lr``: what ``make_optimizer(tower_lr_scale=...)`` did, per scaled tower (``nalora.tower_lr``).
    """

    model: nn.Module
    method: "Method"
    report: list[dict[str, Any]] = field(default_factory=list)
    controller: "StepRescaler | None" = None
    plan: "TargetPlan | None" = None
    row_guards: "list[RowGuard]" = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    method_config: dict[str, Any] = field(default_factory=dict)
    hparams: dict[str, Any] = field(default_factory=dict)
    trainable: list[str] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)
    tower_lr: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __init__(
        self,
        model: nn.Module,
        method: "Method",
        report: list[dict[str, Any]] | None = None,
        controller: "StepRescaler | None" = None,
        *,
        plan: "TargetPlan | None" = None,
        row_guards: "list[RowGuard] | None" = None,
        notes: list[str] | None = None,
        method_config: dict[str, Any] | None = None,
        hparams: dict[str, Any] | None = None,
        trainable: list[str] | None = None,
        extras: dict[str, Any] | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        """``options``: the old untyped dict (plugins written before the typed fields); its known keys fill
        the typed fields, the rest goes to ``extras``."""
        self.model, self.method, self.report, self.controller = model, method, list(report or []), controller
        self.plan = plan
        self.row_guards = list(row_guards or [])
        self.notes = list(notes or [])
        self.method_config = dict(method_config or {})
        self.hparams = dict(hparams or {})
        self.trainable = list(trainable or [])
        self.extras = dict(extras or {})
        self.tower_lr = {}
        for key, value in (options or {}).items():
            attr = _TYPED_KEYS.get(key)
            if attr == "frozen_rows":
                continue  # derived from the plan
            if attr is None:
                self.extras[key] = value
            else:
                setattr(self, attr, value)

    @property
    def frozen_rows(self) -> dict[str, list[slice]]:
        """Packed targets' held rows, by module path."""
        if self.plan is None:
            return {}
        return {t.module: list(t.frozen_rows) for t in self.plan.items if t.frozen_rows}

    @property
    def options(self) -> MutableMapping[str, Any]:
        """Deprecated view of the old untyped dict: typed keys read their fields (and cannot be set here);
        other keys read and write ``extras``. Use the typed fields."""
        return _OptionsView(self)

    def make_optimizer(
        self, lr: float, weight_decay: float = 0.0, *, total_steps: int | None = None,
        tower_lr_scale: Mapping[str, float] | None = None, **kwargs: Any
    ) -> torch.optim.Optimizer:
        """The method's optimiser; NA-LoRA's controller attaches to it through step hooks.

        ``total_steps`` (optimiser steps of the whole run) drives NA-LoRA's budget schedule.
        ``tower_lr_scale`` (``{"vision": 0.1}``): the trained parameters of a tower at ``lr x scale``, on top of
        the method's own groups (``nalora.tower_lr``); recorded in ``self.tower_lr``.
        """
        scales = check_tower_scales(tower_lr_scale)  # before any work: a bad value is a one-line error
        opt = self.method.make_optimizer(self, lr, weight_decay, total_steps=total_steps, **kwargs)
        self.tower_lr = scale_tower_lrs(opt, param_towers(self), scales) if scales else {}
        return opt

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def finalize(self) -> None:
        """End of training: NA-LoRA folds its mask into B, leaving a plain LoRA adapter."""
        if self.controller is not None:
            self.controller.fold()

    def save(self, path: str | Path) -> None:
        """Finalize, then save a plain peft adapter (or the full model for ``full``)."""
        self.finalize()
        self.method.save(self, path)


class _OptionsView(MutableMapping):
    """``Adapted.options`` for code written before the typed fields."""

    def __init__(self, adapted: Adapted) -> None:
        self._a = adapted

    def _typed(self) -> dict[str, Any]:
        a = self._a
        out = {"plan": a.plan, "row_guards": a.row_guards, "notes": a.notes, "trainable": a.trainable,
               "hparams": a.hparams, "frozen_rows": a.frozen_rows}
        if getattr(a.controller, "config", None) is not None:  # NA-LoRA's controller carries its config
            out["nalora_config"] = a.method_config
        return out

    def __getitem__(self, key: str) -> Any:
        typed = self._typed()
        return typed[key] if key in typed else self._a.extras[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if key in _TYPED_KEYS:
            raise TypeError(f"Adapted.options[{key!r}] is read-only; set Adapted.{_TYPED_KEYS[key]}")
        self._a.extras[key] = value

    def __delitem__(self, key: str) -> None:
        if key in _TYPED_KEYS:
            raise TypeError(f"Adapted.options[{key!r}] is read-only")
        del self._a.extras[key]

    def __iter__(self) -> Iterator[str]:
        return iter({**self._typed(), **self._a.extras})

    def __len__(self) -> int:
        return len({**self._typed(), **self._a.extras})
