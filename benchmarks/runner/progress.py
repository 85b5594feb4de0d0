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
    handle = model.register_forward_pre_hook(lambda module, args: bar.update(1))
    try:
        yield bar
    finally:
        handle.remove()
        bar.close()
