"""Several LoRA runs of one model stepped together: one base forward for all, each run its own adapters.

The lever issue 12 names for host-bound steps (``results/perf/README.md``): a small model's step launches about
2,000 tiny kernels, so K runs stepped one after another cost K times the launches, while K runs stacked along the
batch cost about the launches of one. Row block ``k`` of a stacked batch (``K x batch_size`` rows) goes through
run ``k``'s adapters only; the frozen weights are shared. Each run keeps its own parameters, optimiser (its lr, its
gradient clipping), scheduler and loss (its own mean), so what run ``k`` computes is what it computes alone, up to
the order of floating-point additions (``tests/test_stacked.py`` checks LoRA's and NA-LoRA's runs against the same
runs trained alone). Runs are built as usual (``inject``: their own seeds, optimisers, schedulers, NA-LoRA
controllers) and may share the frozen base tensors (``shared_copy``); ``stack_runs`` builds the one model they train
through.

Used by ``nalora-bench steptime --stack K`` (the step alone) and ``run --stack K`` (``train.train_stacked``: whole runs,
each evaluated and recorded on its own model).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with its own modules (``inject`` wraps them in place) and ``model``'s tensors: K runs
    built on K shared copies hold one set of frozen weights."""
    import copy

    return copy.deepcopy(model, memo={id(t): t for t in [*model.parameters(), *model.buffers()]})


class NotStackable(ValueError):
    """These runs cannot train through one stacked model (method, task or layout): train them one by one."""


def _rows(t: Any, k: int, i: int, rows: int | None = None) -> Any:
    """Block ``i`` of ``k`` along the leading dimension of a tensor of ``rows`` rows (None: any multiple of ``k``);
    other values as they are."""
    if torch.is_tensor(t) and t.dim() >= 1 and t.shape[0] % k == 0 and (rows is None or t.shape[0] == rows):
        n = t.shape[0] // k
        return t[i * n:(i + 1) * n]
    return t


class StackedPeftLinear(nn.Module):
    """One frozen base Linear and the same-path peft LoRA layers of ``k`` runs: row block ``i`` of the input goes
    through run ``i``'s adapter (its own parameters, dropout and scaling), and run ``i``'s forward hooks on its
    layer (NA-LoRA's statistics) see block ``i`` of the output, as they would see the run's own forward."""

    def __init__(self, base_layer: nn.Linear, runs: list[nn.Module], adapter: str) -> None:
        super().__init__()
        for r in runs:
            if getattr(r, "merged", False) or adapter not in r.lora_A or r.use_dora.get(adapter, False) \
                    or getattr(r, "lora_bias", {}).get(adapter, False):
                raise NotStackable(f"stacking: {type(r).__name__} is not a plain unmerged LoRA layer ({adapter!r})")
        self.base_layer, self.adapter = base_layer, adapter
        self._runs = list(runs)  # a plain list: the runs' parameters stay theirs, not this module's
        self.register_buffer("scaling", torch.tensor([float(r.scaling[adapter]) for r in runs],
                                                     device=base_layer.weight.device).view(-1, 1, 1),
                             persistent=False)
        self._dropout = any(not isinstance(r.lora_dropout[adapter], nn.Identity) for r in runs)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        k, n = len(self._runs), self.adapter
        y = self.base_layer(x, *args, **kwargs)
        a = torch.stack([r.lora_A[n].weight for r in self._runs]).transpose(1, 2)  # [k, in, r]
        b = torch.stack([r.lora_B[n].weight for r in self._runs]).transpose(1, 2)  # [k, r, out]
        xs = x.to(a.dtype)
        if self._dropout:
            xs = torch.cat([r.lora_dropout[n](_rows(xs, k, i)) for i, r in enumerate(self._runs)])
        xs = xs.reshape(k, -1, x.shape[-1])
        delta = torch.bmm(torch.bmm(xs, a), b) * self.scaling.to(xs.dtype)
        y = y + delta.reshape(y.shape).to(y.dtype)
        for i, r in enumerate(self._runs):
            for hook in r._forward_hooks.values():
                hook(r, (_rows(x, k, i),), _rows(y, k, i))
        return y


class StackedRows(nn.Module):
    """The same-path trained modules of ``k`` runs (peft's ``modules_to_save`` copies: the VLM connector): row
    block ``i`` of the first argument goes through run ``i``'s module (other arguments of the same row count are
    split alike), and the outputs are concatenated back along the rows."""

    def __init__(self, runs: list[nn.Module]) -> None:
        super().__init__()
        self._runs = list(runs)  # a plain list: the runs' parameters stay theirs

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        k, rows = len(self._runs), x.shape[0]
        if rows % k:
            raise NotStackable(f"stacking: {rows} rows do not split into {k} runs' blocks")
        outs = [r(_rows(x, k, i), *(_rows(a, k, i, rows) for a in args),
                  **{n: _rows(v, k, i, rows) for n, v in kwargs.items()}) for i, r in enumerate(self._runs)]
        if not all(torch.is_tensor(o) for o in outs):
            raise NotStackable(f"stacking: {type(self._runs[0]).__name__} returns {type(outs[0]).__name__}, not a tensor")
        return torch.cat(outs)


def stack_runs(runs: list[Any], adapter: str = "default") -> nn.Module:
    """One model that trains the adapted runs ``runs`` (``Adapted``, same model and targets, different seeds, lrs
    or method options) together: a copy of ``runs[0].model`` sharing its tensors, each peft LoRA layer replaced by
    a ``StackedPeftLinear`` over the runs' layers at that path. Its input is the runs' batches concatenated along
    the batch (equal sizes); each run's model-level forward pre-hooks (NA-LoRA's attention-mask capture) get their
    block of the arguments. Each run keeps its optimiser, scheduler and controller; their step hooks and the
    parameters' gradient hooks act on the runs' own parameters, which the stacked model trains. The loss of a
    forward with ``labels`` is the sum of each run's own mean loss (the chunked loss, ``install_light_loss``, split
    by run); ``stacked_losses(model)`` gives those means.
    A task's trained modules (the VLM connector) are each run's own peft ``modules_to_save`` copy: row block ``k``
    goes through run ``k``'s (``StackedRows``). A model that computes its own loss (the composed VLM) stacks when it
    can split that loss by row block (``loss_blocks``).
    Methods whose adapter is more than peft LoRA on the base weights (DoRA, PiSSA's residual base) are refused."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    from benchmarks.runner.compiled import install_light_loss
    from nalora.controller import compile_ready

    if len(runs) < 2:
        raise NotStackable(f"stack_runs needs at least 2 runs, got {len(runs)}")
    first = runs[0].model
    for r in runs:
        name = getattr(r.method, "name", type(r.method).__name__)  # a plugin injector's method may have no name
        if name in ("pissa", "full", "head"):
            raise NotStackable(f"stacking: method {name!r} trains more than adapters on one shared base model")
    # a task's trained modules (the composed VLM's connector) are each run's own copy under peft's modules_to_save;
    # other models with trained modules (a hub VLM's projector, a task head) are not known to split by row block
    saved = [n for n, m in first.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    base = first.get_base_model() if hasattr(first, "get_base_model") else first
    if any(getattr(r, "trainable", None) for r in runs) and not (saved and hasattr(base, "loss_blocks")):
        raise NotStackable(f"stacking: trainable modules {list(runs[0].trainable)} of a {type(base).__name__}: only "
                           "the composed VLM's connector stacks")
    stacked = shared_copy(first)
    for m in stacked.modules():  # the copy must not call run 0's hooks on every run's rows
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
    layers = [name for name, m in first.named_modules() if isinstance(m, LoraLayer)]
    if not layers:
        raise NotStackable("stacking: the runs' models have no peft LoRA layers")
    other = [n for n in layers if type(first.get_submodule(n)) is not LoraLinear]
    if other:
        raise NotStackable(f"stacking: {other[0]} is a {type(first.get_submodule(other[0])).__name__}, not a LoRA Linear")
    for name in layers:
        per_run = [r.model.get_submodule(name) for r in runs]
        parent, _, leaf = name.rpartition(".")
        owner = stacked.get_submodule(parent) if parent else stacked
        setattr(owner, leaf, StackedPeftLinear(getattr(owner, leaf).base_layer, per_run, adapter))
    for name in saved:
        parent, _, leaf = name.rpartition(".")
        owner = stacked.get_submodule(parent) if parent else stacked
        setattr(owner, leaf, StackedRows([r.model.get_submodule(name) for r in runs]))
    k = len(runs)

    def pre_hooks(module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        rows = ids.shape[0] if torch.is_tensor(ids) else None  # only the batch's tensors are split by run
        for i, r in enumerate(runs):
            for hid, hook in r.model._forward_pre_hooks.items():
                a = tuple(_rows(v, k, i, rows) for v in args)
                kw = {key: _rows(v, k, i, rows) for key, v in kwargs.items()}
                if hid in r.model._forward_pre_hooks_with_kwargs:
                    hook(r.model, a, kw)
                else:
                    hook(r.model, a)

    stacked.register_forward_pre_hook(pre_hooks, with_kwargs=True)
    kind, why = install_light_loss(stacked)
    lm = stacked.get_base_model() if hasattr(stacked, "get_base_model") else stacked
    if kind != "model":
        lm._nalora_light_loss.blocks = k  # the loss is the sum of the runs' own means (their token counts may differ)
    elif hasattr(lm, "loss_blocks"):  # a model computing its own loss, able to split it by row block (ComposedVLM)
        lm.loss_blocks = k
    else:
        raise NotStackable(f"stacking needs each run's loss on its own rows: {why}")
    for r in runs:  # statistics hooks stay installed (refresh steps decide at run time): no graph per state
        compile_ready(r.model)
    return stacked


def stacked_losses(model: nn.Module) -> torch.Tensor | None:
    """The mean loss of each stacked run in the training forward since the last call (detached), taken: ``None``
    when no forward computed them (a task whose loss does not come from the model's ``labels``)."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hooks = getattr(lm, "_nalora_light_loss", None)
    if hooks is None and getattr(lm, "loss_blocks", 1) > 1:
        hooks = lm  # computes its own loss, split by block (``loss_blocks``, ``block_losses``)
    if hooks is None:
        return None
    out, hooks.block_losses = hooks.block_losses, None
    return out
