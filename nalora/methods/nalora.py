"""NA-LoRA methods: ``nalora`` (mask + step scaling), ``nalora_mask`` (mask only), ``nalora_scale``
(step scaling only). Each is plain peft LoRA on the plan (``build_lora``) plus a ``NALoRAController``
on the gated FFNs whose gate is targeted; every other adapted module is plain LoRA."""

from __future__ import annotations

from typing import Any, ClassVar

from nalora.adapted import Adapted
from nalora.config import NALoRAConfig
from nalora.controller import NALoRAController
from nalora.methods.peft_lora import ADAPTER, attach_row_guards, build_lora
from nalora.methods.registry import Method, register_method


class _NALoRABase(Method):
    """Shared build / optimiser; subclasses fix ``forced`` options (the ablation variants)."""

    needs_gated = True
    forced: ClassVar[dict[str, Any]] = {}

    def config(self, options: dict[str, Any]) -> NALoRAConfig:
        """``NALoRAConfig`` from the method options; a variant's fixed options cannot be overridden."""
        for key, value in self.forced.items():
            if key in options and options[key] != value:
                raise ValueError(f"method {self.name!r} fixes {key}={value}; use another NA-LoRA variant")
        return NALoRAConfig.from_options({**options, **self.forced})

    def build(self, model, plan, *, rank, alpha, dropout, trainable, options) -> Adapted:
        cfg = self.config(options)
        by_module = plan.by_module()
        ffns = [f for f in plan.ffns if "gate" in getattr(by_module.get(f.gate), "roles", ())]
        if not ffns:
            raise ValueError(f"method {self.name!r} needs 'gate' among the targets of a gated FFN "
                             f"(targets: {', '.join(plan.targets)})")
        controlled = {f.name for f in ffns}

        shaped = {"gate"} | (set(cfg.mask_targets) if cfg.mask else set())

        def applied(t) -> str:
            owner = getattr(t.owner, "name", None)
            touched = t.kind == "gated" and owner in controlled and shaped & set(t.roles)
            return self.name if touched else "lora"

        adapted = build_lora(model, plan, rank=rank, alpha=alpha, dropout=dropout, trainable=trainable,
                             lora_kwargs={}, method=self, applied=applied)
        adapted.controller = NALoRAController(adapted.model, ffns, cfg, adapter_name=ADAPTER)
        adapted.options["nalora_config"] = cfg.to_dict()
        return adapted

    def make_optimizer(self, adapted, lr, weight_decay=0.0, *, total_steps=None, **kwargs):
        """AdamW over the trainable parameters, row guards and the controller's step hooks attached."""
        opt = super().make_optimizer(adapted, lr, weight_decay, total_steps=total_steps, **kwargs)
        attach_row_guards(adapted, opt)
        if adapted.controller.config.mask and total_steps is None:
            raise ValueError(f"method {self.name!r} needs total_steps (optimiser steps of the run) for its "
                             "keep-fraction schedule")
        adapted.controller.attach(opt, total_steps=total_steps)
        return opt


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
