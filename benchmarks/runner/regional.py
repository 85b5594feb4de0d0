"""The repeated blocks of a model: what regional compilation compiles one at a time.

A Transformer keeps its layers in ``nn.ModuleList``s (a decoder's layers, a vision tower's blocks). Compiling
each such block instead of the whole model lets dynamo and inductor build one graph per block class and reuse
it for every instance (PyTorch's "regional compilation" recipe): the compile cost is that of one layer, not of
the whole stack, while nearly all of the step's work still runs compiled.
"""

from __future__ import annotations

import inspect
from collections import Counter
from typing import Any

import torch
from torch import nn


def repeated_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the outermost repeated blocks of ``model``, in module order.

    A repeated block is a child of an ``nn.ModuleList`` whose class occurs at least twice in that list.
    Blocks inside a block already found (a layer's own lists) are not returned: compiling the outer block
    covers them. Works through wrappers (peft, DistributedDataParallel) and over several towers.
    """
    found: list[tuple[str, nn.Module]] = []
    for name, mod in model.named_modules():  # pre-order: a list is seen before anything inside it
        if not isinstance(mod, nn.ModuleList) or any(_inside(name, block) for block, _ in found):
            continue
        counts = Counter(type(child) for child in mod)
        prefix = f"{name}." if name else ""
        found += [(f"{prefix}{i}", child) for i, child in enumerate(mod)
                  if counts[type(child)] >= 2 and not isinstance(child, (nn.ModuleList, nn.ModuleDict))]
    return found


def _inside(name: str, block: str) -> bool:
    return name.startswith(block + ".")


def drop_training_cache(model: nn.Module) -> int:
    """Pre-hooks that pass ``use_cache=False`` to every Hugging Face model (``PreTrainedModel``: they build the
    cache; their layers only use it) whose forward takes ``use_cache`` when it runs with gradients and no cache
    was asked for; returns how many modules got one (0 when already installed).

    Hugging Face models build a KV cache by default even in training, where nothing reads it; each layer then
    gets the cache and reads its own entry, and dynamo guards on that entry, so one compiled layer graph per
    layer instead of one for all. Outputs do not change (one full forward never reads the cache).
    """
    hooked = 0
    for mod in model.modules():
        if getattr(mod, "_nalora_no_train_cache", False) or not _takes_use_cache(mod):
            continue
        mod.register_forward_pre_hook(_no_cache_when_training, with_kwargs=True)
        mod._nalora_no_train_cache = True
        hooked += 1
    return hooked


def _takes_use_cache(mod: nn.Module) -> bool:
    from transformers import PreTrainedModel

    if not isinstance(mod, PreTrainedModel):
        return False
    try:
        return "use_cache" in inspect.signature(mod.forward).parameters
    except (TypeError, ValueError):
        return False


def _no_cache_when_training(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
    if not torch.is_grad_enabled() or kwargs.get("use_cache") or kwargs.get("past_key_values") is not None:
        return None
    return args, {**kwargs, "use_cache": False}
