"""``Adapted``: the one object a training loop talks to, whatever the method."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from nalora.controller import NALoRAController
    from nalora.methods.registry import Method


@dataclass
class Adapted:
    """A model with a method applied.

    ``model`` is a peft ``PeftModel`` for adapter methods, the base model for ``full`` / ``head``.
    ``report`` has one row per adapted module (name, tower, role, layout, applied method), so a run
    records exactly what was touched and what fell back to plain LoRA.
    """

    model: nn.Module
    method: "Method"
    report: list[dict[str, Any]] = field(default_factory=list)
    controller: "NALoRAController | None" = None
    options: dict[str, Any] = field(default_factory=dict)

    def make_optimizer(
        self, lr: float, weight_decay: float = 0.0, *, total_steps: int | None = None, **kwargs: Any
    ) -> torch.optim.Optimizer:
        """The method's optimiser; NA-LoRA's controller attaches to it through step hooks.

        ``total_steps`` (optimiser steps of the whole run) drives NA-LoRA's budget schedule.
        """
        return self.method.make_optimizer(self, lr, weight_decay, total_steps=total_steps, **kwargs)

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
