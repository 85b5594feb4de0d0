"""Progress of an evaluation: a tqdm bar counting the model's forward passes while a task evaluates.

Tasks own their evaluation loops (``Task.evaluate``), so the runner cannot count their batches; it counts
what every loop does, a forward pass of the model (one per batch for scoring, one per generated token for
generation), through a forward pre-hook that is removed when the evaluation ends.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


def forward_module(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose forward pre-hook sees each forward of ``model`` once: under peft its base model (peft's
    ``generate`` calls the base model, not the adapted model's forward: a hook on the adapted model never saw a
    generated token; its forward calls the base model too), else ``model``."""
    base = getattr(model, "get_base_model", None)
    inner = base() if callable(base) else None
    return inner if isinstance(inner, torch.nn.Module) else model


@contextmanager
def eval_progress(model: torch.nn.Module, desc: str, enabled: bool = True, position: int = 0) -> Iterator[Any]:
    """Show ``desc`` with a live count of ``model``'s forward passes (and their rate) while the block runs.

    ``enabled`` False (``--no-progress``, a non-main process) shows nothing and adds no hook.
    """
    if not enabled:
        yield None
        return
    from tqdm.auto import tqdm

    bar = tqdm(desc=desc, unit="fwd", leave=False, position=position, mininterval=1.0)
    # Eager even inside a compiled generation step (static cache): traced, the count would guard recompiles.
    # Returns None: a pre-hook's return value replaces the forward's arguments, and tqdm's update returns True
    # whenever it redraws (a forward called a second after the last redraw got ``(True,)`` as its input_ids).
    @torch.compiler.disable
    def count(module: torch.nn.Module, args: tuple) -> None:
        bar.update(1)

    handle = forward_module(model).register_forward_pre_hook(count)
    try:
        yield bar
    finally:
        handle.remove()
        bar.close()
