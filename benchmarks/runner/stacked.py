"""Several LoRA runs of one model stepped together: one base forward for all, each run its own adapters.

The lever issue 12 names for host-bound steps (``results/perf/README.md``): a small model's step launches about
2,000 tiny kernels, so K runs stepped one after another cost K times the launches, while K runs stacked along the
batch cost about the launches of one. Row block ``k`` of a stacked batch (``K x batch_size`` rows) goes through
run ``k``'s adapters only; the frozen weights are shared. Each run keeps its own parameters (one optimiser param
group per run: its own lr, its own gradient clipping), so what run ``k`` computes is what it computes alone, up to
the order of floating-point additions (``tests/test_stacked.py`` checks the gradients).

Today this is a measurement (``nalora-bench steptime --stack K``) for plain LoRA: the runner does not stack yet, and
NA-LoRA's controller (per-run statistics and masks) is not stacked.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class StackedLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus ``k`` LoRA adapters (peft's init and scaling: A Kaiming-uniform, B zero,
    ``alpha / rank``); the input's leading rows are ``k`` equal blocks, block ``i`` adapted by adapter ``i``."""

    def __init__(self, base: nn.Linear, k: int, rank: int, alpha: float) -> None:
        super().__init__()
        if k < 1 or rank < 1:
            raise ValueError(f"stacked LoRA needs k >= 1 and rank >= 1, got k={k}, rank={rank}")
        self.base = base.requires_grad_(False)
        self.k, self.scaling = k, alpha / rank
        self.lora_A = nn.ParameterList(nn.Parameter(torch.empty(rank, base.in_features)) for _ in range(k))
        self.lora_B = nn.ParameterList(nn.Parameter(torch.zeros(base.out_features, rank)) for _ in range(k))
        for a in self.lora_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def run_parameters(self, i: int) -> list[nn.Parameter]:
        """Adapter ``i``'s parameters."""
        return [self.lora_A[i], self.lora_B[i]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if x.shape[0] % self.k:
            raise ValueError(f"stacked LoRA: {x.shape[0]} rows do not split into {self.k} runs")
        a = torch.stack(tuple(self.lora_A)).transpose(1, 2)  # [k, in, r]
        b = torch.stack(tuple(self.lora_B)).transpose(1, 2)  # [k, r, out]
        xs = x.to(a.dtype).reshape(self.k, -1, x.shape[-1])  # rows of run i are contiguous: block i
        delta = torch.bmm(torch.bmm(xs, a), b) * self.scaling
        return y + delta.reshape(y.shape).to(y.dtype)


def stack_lora(model: nn.Module, k: int, *, targets: tuple[str, ...] = ("gate", "up", "down"), rank: int = 8,
               alpha: float = 16.0) -> list[StackedLoRALinear]:
    """Freeze ``model`` and replace the ``targets`` roles of its gated FFNs by ``StackedLoRALinear`` (in place);
    returns the stacked layers. A target matching nothing is a one-line error."""
    from nalora.discovery import find_gated_ffns

    model.requires_grad_(False)
    paths = [getattr(f, t) for f in find_gated_ffns(model) for t in targets]
    if not paths:
        raise ValueError(f"stack_lora: targets {', '.join(targets)} match no gated FFN of {type(model).__name__}")
    layers = []
    for path in paths:
        parent, _, name = path.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        base = getattr(owner, name)
        if type(base) is not nn.Linear:
            raise ValueError(f"stack_lora: {path} is a {type(base).__name__}, not an nn.Linear")
        layer = StackedLoRALinear(base, k, rank, alpha).to(base.weight.device, base.weight.dtype)
        setattr(owner, name, layer)
        layers.append(layer)
    return layers


def run_param_groups(layers: list[StackedLoRALinear], lrs: list[float]) -> list[dict]:
    """One optimiser param group per run (``lrs[i]``: run ``i``'s learning rate)."""
    if not layers or len(lrs) != layers[0].k:
        raise ValueError(f"run_param_groups: {len(lrs)} learning rates for {layers[0].k if layers else 0} runs")
    return [{"params": [p for layer in layers for p in layer.run_parameters(i)], "lr": lr} for i, lr in enumerate(lrs)]


def clip_per_run(optimizer: torch.optim.Optimizer, max_norm: float) -> torch.Tensor:
    """Clip each run's gradients (one param group each) to ``max_norm`` on its own; returns the ``k`` total norms
    (on the device: no host sync)."""
    return torch.stack([torch.nn.utils.clip_grad_norm_(g["params"], max_norm) for g in optimizer.param_groups])
