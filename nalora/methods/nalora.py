"""NA-LoRA and its controls. Each is plain peft LoRA on the plan (``build_lora``) plus step hooks on the
gated FFNs whose gate is targeted; every other adapted module is plain LoRA. All save a plain LoRA adapter.

* ``nalora``: temporal-importance mask + activation-specific step scaling (NALORA.md);
  ablations ``nalora_mask`` (mask only) and ``nalora_scale`` (step scaling only).
* Controls that test the mechanism: ``nalora_random_mask`` (kept channels drawn at random at each refresh),
  ``nalora_static_mask`` (importance ranking frozen at t_w), ``lora_gate_scaled`` (LoRA with B_gate's step
  times one constant: what step scaling amounts to if gamma were the same everywhere).
"""

from __future__ import annotations

from typing import Any, ClassVar

from nalora.adapted import Adapted
from nalora.config import NALoRAConfig
from nalora.controller import NALoRAController
from nalora.discovery import GatedFFN
from nalora.methods.peft_lora import ADAPTER, attach_row_guards, build_lora
from nalora.methods.registry import Method, positive_number, register_method
from nalora.plan import Target, TargetPlan
from nalora.rescale import GateStepScaler


def gate_targeted_ffns(method: str, plan: TargetPlan) -> list[GatedFFN]:
    """The gated FFNs whose gate is among the plan's targets (what the step hooks act on), or an error."""
    by_module = plan.by_module()
    ffns = [f for f in plan.ffns if "gate" in getattr(by_module.get(f.gate), "roles", ())]
    if not ffns:
        raise ValueError(f"method {method!r} needs 'gate' among the targets of a gated FFN "
                         f"(targets: {', '.join(plan.targets)})")
    return ffns


class _GateHooked(Method):
    """LoRA on the plan plus a ``StepRescaler`` on the gate-targeted FFNs (``make_controller``)."""

    needs_gated = True
    shaped_roles: ClassVar[frozenset[str]] = frozenset({"gate"})  # roles reported as this method, not "lora"

    def make_controller(self, adapted: Adapted, ffns: list[GatedFFN], options: dict[str, Any]) -> Any:
        raise NotImplementedError

    def build(self, model, plan, *, rank, alpha, dropout, trainable, options) -> Adapted:
        resolved = self.resolve_options(options)
        ffns = gate_targeted_ffns(self.name, plan)
        controlled = {f.name for f in ffns}
        shaped = self.shaped(resolved)

        def applied(t: Target) -> str:
            owner = getattr(t.owner, "name", None)
            touched = t.kind == "gated" and owner in controlled and shaped & set(t.roles)
            return self.name if touched else "lora"

        adapted = build_lora(model, plan, rank=rank, alpha=alpha, dropout=dropout, trainable=trainable,
                             lora_kwargs={}, method=self, applied=applied)
        adapted.controller = self.make_controller(adapted, ffns, resolved)
        adapted.method_config = resolved
        return adapted

    def shaped(self, resolved: dict[str, Any]) -> set[str]:
        return set(self.shaped_roles)

    def make_optimizer(self, adapted, lr, weight_decay=0.0, *, total_steps=None, **kwargs):
        """AdamW over the trainable parameters, row guards and the controller's step hooks attached."""
        opt = super().make_optimizer(adapted, lr, weight_decay, total_steps=total_steps, **kwargs)
        attach_row_guards(adapted, opt)
        adapted.controller.attach(opt, total_steps=total_steps)
        return opt


class _NALoRABase(_GateHooked):
    """Shared build / optimiser; subclasses fix ``forced`` options (the ablation and control variants)."""

    forced: ClassVar[dict[str, Any]] = {}

    def config(self, options: dict[str, Any]) -> NALoRAConfig:
        """``NALoRAConfig`` from the method options; a variant's fixed options cannot be overridden."""
        for key, value in self.forced.items():
            if key in options and options[key] != value:
                raise ValueError(f"method {self.name!r} fixes {key}={value!r}; use another NA-LoRA variant")
        return NALoRAConfig.from_options({**options, **self.forced})

    def resolve_options(self, options: dict[str, Any] | None) -> dict[str, Any]:
        """Every NA-LoRA option (``NALoRAConfig``) with this variant's fixed values."""
        return self.config(dict(options or {})).to_dict()

    def shaped(self, resolved: dict[str, Any]) -> set[str]:
        return {"gate"} | (set(resolved["mask_targets"]) if resolved["mask"] else set())

    def make_controller(self, adapted, ffns, options):
        return NALoRAController(adapted.model, ffns, NALoRAConfig.from_options(options), adapter_name=ADAPTER)

    def make_optimizer(self, adapted, lr, weight_decay=0.0, *, total_steps=None, **kwargs):
        if adapted.controller.config.mask and total_steps is None:
            raise ValueError(f"method {self.name!r} needs total_steps (optimiser steps of the run) for its "
                             "keep-fraction schedule")
        return super().make_optimizer(adapted, lr, weight_decay, total_steps=total_steps, **kwargs)


@register_method("nalora")
class NALoRA(_NALoRABase):
    """NA-LoRA: temporal-importance mask + activation-specific step scaling (NALORA.md)."""


@register_method("nalora_mask")
class NALoRAMask(_NALoRABase):
    """Ablation: the temporal-importance mask only."""

    forced: ClassVar[dict[str, Any]] = {"mask": True, "step_scaling": False}


@register_method("nalora_scale")
class NALoRAScale(_NALoRABase):
    """Ablation: the step scaling only (no mask, so no schedule)."""

    forced: ClassVar[dict[str, Any]] = {"mask": False, "step_scaling": True}


@register_method("nalora_random_mask")
class NALoRARandomMask(_NALoRABase):
    """Control: NA-LoRA whose kept channels are drawn uniformly at random at each refresh (same keep-fraction
    schedule and refresh cadence, same step scaling): does *which* channels train matter?"""

    forced: ClassVar[dict[str, Any]] = {"mask": True, "mask_selection": "random"}


@register_method("nalora_static_mask")
class NALoRAStaticMask(_NALoRABase):
    """Control: NA-LoRA whose importance ranking is frozen at the first refresh at/after t_w and never
    refreshed (kept set = top rho(t) of that ranking): does the *temporal* importance matter?"""

    forced: ClassVar[dict[str, Any]] = {"mask": True, "mask_selection": "static"}


# NA-LoRA's mean step scale measured over the committed runs (issue 9): about 92% of (token, channel) pairs
# sit in the selecting regime, so gamma averages 0.77 (0.75-0.81).
GATE_STEP_SCALE = 0.77


@register_method("lora_gate_scaled")
class LoRAGateScaled(_GateHooked):
    """Control: LoRA whose B_gate optimiser step is multiplied by one constant ``gate_step_scale``; every
    other parameter steps exactly as LoRA. Is NA-LoRA's step scaling more than a smaller gate learning rate?"""

    defaults: ClassVar[dict[str, Any]] = {"gate_step_scale": GATE_STEP_SCALE}

    def check_option(self, key, value):
        return positive_number(self.name, key, value)

    def make_controller(self, adapted, ffns, options):
        return GateStepScaler(adapted.model, ffns, options["gate_step_scale"], adapter_name=ADAPTER)
