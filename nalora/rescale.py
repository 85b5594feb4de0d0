"""Exact per-row correction of ``optimizer.step()`` on a few adapter parameters, through step hooks.

A ``Slot`` is one adapter parameter whose rows (or columns) are kept or frozen (``keep``) and whose
step is multiplied per row (``scale``). ``StepRescaler`` snapshots the slots before ``optimizer.step()``
and rewrites them after it: a frozen row and its optimiser state (Adam moments, momentum) get back their
values exactly, and each kept row's change is multiplied by its scale. NA-LoRA's controller (mask + step
scaling) and the ``lora_gate_scaled`` control (one constant scale, nothing else) both ride on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class Slot:
    """One masked / scaled adapter parameter; ``entries`` map channels of units to its rows or columns."""

    param: nn.Parameter
    dim: int
    name: str  # the FFN it belongs to (for messages)
    entries: list[tuple[Any, torch.Tensor, bool, bool]]  # (unit, index, masked, scaled): NA-LoRA's bookkeeping
    keep: torch.Tensor  # bool along ``dim``
    scale: torch.Tensor  # float along ``dim``: gamma on scaled rows, 1 elsewhere
    stash: torch.Tensor | None = None
    full: bool = True  # python mirror: every entry keeps every channel
    scaled: bool = False  # python: some entry is step-scaled
    prev: torch.Tensor | None = None  # snapshot before optimizer.step() (preallocated)
    prev_state: dict[str, torch.Tensor] = field(default_factory=dict)  # same for optimiser state
    step_weight: torch.Tensor | None = None  # param-shaped keep * gamma: the lerp weight of the step
    keep_weight: torch.Tensor | None = None  # param-shaped keep (0/1): the lerp weight of the state

    @classmethod
    def new(cls, p: nn.Parameter, dim: int, name: str) -> Slot:
        """A slot that keeps every row at scale 1 until entries say otherwise."""
        n = p.shape[dim]
        return cls(param=p, dim=dim, name=name, entries=[], keep=torch.ones(n, dtype=torch.bool, device=p.device),
                   scale=torch.ones(n, dtype=torch.float32, device=p.device))

    def view(self, v: torch.Tensor) -> torch.Tensor:
        shape = [1] * self.param.ndim
        shape[self.dim] = -1
        return v.view(shape)

    @property
    def active(self) -> bool:
        """Whether optimizer.step() must be corrected on this parameter (python-side, no sync)."""
        return self.scaled or not self.full

    def rebuild_weights(self) -> None:
        """Param-shaped weights for the step hooks, rebuilt only when the mask or gamma changes."""
        p = self.param
        keep = self.view(self.keep).to(p.dtype).expand_as(p)
        self.keep_weight = keep.contiguous()
        self.step_weight = (keep * self.view(self.scale).to(p.dtype)).contiguous()
        if self.prev is None:
            self.prev = torch.empty_like(p.detach())


def lora_weight(module: nn.Module, adapter: str, what: str, where: str) -> nn.Parameter:
    """The weight of ``module.lora_A/B[adapter]`` or a clear error."""
    holder = getattr(module, what, None)
    if holder is None or adapter not in holder:
        raise ValueError(f"{where} is not a LoRA layer with adapter {adapter!r} (type {type(module).__name__})")
    return holder[adapter].weight


def row_index(rows: slice | None, d_ff: int, where: str) -> torch.Tensor:
    """Row indices of a gate (or up) part: all ``d_ff`` rows, or those of a packed matrix's slice."""
    if rows is None:
        return torch.arange(d_ff)
    idx = torch.arange(rows.stop)[rows]
    if idx.numel() != d_ff:
        raise ValueError(f"{where}: row slice {rows} has {idx.numel()} rows, expected d_ff={d_ff}")
    return idx


class StepRescaler:
    """Step pre/post hooks that apply the slots' keep masks and scales to every ``optimizer.step()``."""

    def __init__(self, slots: list[Slot]) -> None:
        self.slots = slots
        self._handles: list[Any] = []
        self._optimizer: torch.optim.Optimizer | None = None
        self._active: list[Slot] = []  # slots corrected around the current optimizer.step()
        self._masked: list[Slot] = []
        self._snapshot: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.folded = False

    def _before_attach(self, total_steps: int | None) -> None:
        """Subclasses check what they need from the run (NA-LoRA's schedule needs ``total_steps``)."""

    def attach(self, optimizer: torch.optim.Optimizer, total_steps: int | None = None) -> torch.optim.Optimizer:
        """Hook ``optimizer.step()``; every slot's parameter must be one of its parameters."""
        if self.folded:
            raise ValueError(f"{type(self).__name__} was folded; build a new one to keep training")
        if self._optimizer is not None:
            raise ValueError(f"{type(self).__name__} is already attached to an optimiser")
        self._before_attach(total_steps)
        owned = {id(p) for grp in optimizer.param_groups for p in grp["params"]}
        for s in self.slots:
            if id(s.param) not in owned:
                raise ValueError(f"an adapter parameter of {s.name} is not in the optimiser")
        self._optimizer = optimizer
        # look the methods up at call time so that tests can wrap them
        self._handles.append(optimizer.register_step_pre_hook(lambda o, a, k: self._pre_step()))
        self._handles.append(optimizer.register_step_post_hook(lambda o, a, k: self._post_step()))
        return optimizer

    def _state_triples(self, slots: list[Slot]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(snapshot buffer, optimiser-state tensor, keep weight) for the param-shaped state of ``slots``."""
        state = self._optimizer.state if self._optimizer is not None else {}
        out = []
        for s in slots:
            for k, v in state.get(s.param, {}).items():
                if torch.is_tensor(v) and v.shape == s.param.shape:
                    if k not in s.prev_state:
                        s.prev_state[k] = torch.empty_like(v)  # allocated once per state entry
                    out.append((s.prev_state[k], v, s.keep_weight.to(v.dtype)))
        return out

    @torch.no_grad()
    def _pre_step(self) -> None:
        # multi-tensor copies over all slots: a few kernel launches per step, whatever the depth
        self._active = [s for s in self.slots if s.active]
        if not self._active:
            return
        # under no_grad the parameters are used as they are (a detach() per slot is one more op per step)
        torch._foreach_copy_([s.prev for s in self._active], [s.param for s in self._active])
        self._masked = [s for s in self._active if not s.full]
        self._snapshot = self._state_triples(self._masked)
        if self._snapshot:
            torch._foreach_copy_([b for b, _, _ in self._snapshot], [v for _, v, _ in self._snapshot])

    @torch.no_grad()
    def _correct_step(self) -> None:
        """Rewrite the step just taken: each kept row's change times its scale, frozen rows and state restored."""
        if self._active:
            params = [s.param for s in self._active]
            prevs = [s.prev for s in self._active]
            # lerp(prev, new, w) is prev exactly at w = 0 (masked row), new exactly at w = 1, and
            # prev + w (new - prev) otherwise: each row's step multiplied by keep * scale
            torch._foreach_lerp_(prevs, params, [s.step_weight for s in self._active])
            torch._foreach_copy_(params, prevs)
            if self._snapshot:  # masked rows of Adam moments / momentum back to their values before the step
                bufs, vals, weights = (list(x) for x in zip(*self._snapshot))
                torch._foreach_lerp_(bufs, vals, weights)
                torch._foreach_copy_(vals, bufs)
            state = self._optimizer.state if self._optimizer is not None else {}
            for s in self._masked:  # state created by this very step has no snapshot: masked rows start at 0
                for k, v in state.get(s.param, {}).items():
                    if torch.is_tensor(v) and v.shape == s.param.shape and k not in s.prev_state:
                        v.mul_(s.keep_weight.to(v.dtype))
        self._active, self._masked, self._snapshot = [], [], []

    def _post_step(self) -> None:
        self._correct_step()

    def history(self) -> dict[str, Any]:
        """What to log about the run (subclasses add their dynamics)."""
        return {}

    def remove(self) -> None:
        """Remove every hook."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._optimizer = None

    def fold(self) -> None:
        """End of training: hooks removed; the adapter is a plain peft LoRA adapter."""
        self.remove()
        self.folded = True


class GateStepScaler(StepRescaler):
    """``lora_gate_scaled``: the optimiser step of every ``B_gate`` row times one constant ``scale``.

    No mask, no statistics, no forward hooks; every other parameter steps exactly as plain LoRA.
    ``ffns``: gated FFN records (paths relative to the base model) whose gate carries LoRA ``adapter_name``.
    """

    def __init__(self, peft_model: nn.Module, ffns: Sequence[Any], scale: float, *,
                 adapter_name: str = "default") -> None:
        if not ffns:
            raise ValueError("GateStepScaler needs at least one gated FFN")
        base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
        slots: dict[int, Slot] = {}
        for f in ffns:
            b = lora_weight(base.get_submodule(f.gate), adapter_name, "lora_B", f"gate {f.gate}")
            s = slots.setdefault(id(b), Slot.new(b, 0, f.name))
            rows = f.gate_rows if f.layout == "packed" else None
            s.scale[row_index(rows, int(f.d_ff), f.gate).to(b.device)] = float(scale)
            s.scaled = True
        for s in slots.values():
            s.rebuild_weights()
        super().__init__(list(slots.values()))
        self.scale = float(scale)
        self.layers = [f.name for f in ffns]

    def history(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "gate_step_scale": self.scale}
