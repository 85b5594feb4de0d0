"""The repeated blocks of a model: what regional compilation compiles one at a time.

A Transformer keeps its layers in ``nn.ModuleList``s (a decoder's layers, a vision tower's blocks). Compiling
each such block instead of the whole model lets dynamo and inductor build one graph per block class and reuse
it for every instance (PyTorch's "regional compilation" recipe): the compile cost is that of one layer, not of
the whole stack, while nearly all of the step's work still runs compiled.
"""

from __future__ import annotations

from collections import Counter

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
