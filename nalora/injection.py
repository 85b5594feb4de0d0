"""``inject``: apply a registered method to a model on the targets it resolves."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from nalora.adapted import Adapted
from nalora.discovery import TOWERS
from nalora.methods import get_method
from nalora.plan import resolve_targets

__all__ = ["inject"]


def _check_hparams(rank: Any, alpha: Any, dropout: Any) -> None:
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank <= 0:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not alpha > 0:
        raise ValueError(f"alpha must be a positive number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")


def inject(
    model: nn.Module,
    method: str = "nalora",
    *,
    targets: Sequence[str] = ("gate",),
    towers: Sequence[str] = TOWERS,
    rank: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    trainable: Sequence[str] = (),
    method_options: dict[str, Any] | None = None,
    tower_of: Callable[[str], str] | None = None,
) -> Adapted:
    """Apply ``method`` to ``model`` on ``targets`` in ``towers``; return the ``Adapted`` to train.

    Non-gated towers in the plan get plain adapters (recorded per module in ``Adapted.report``);
    ``trainable`` module paths (task head, VLM connector) train with every method and are saved with
    the adapter (peft ``modules_to_save``). The caller seeds the RNG before calling.
    """
    m = get_method(method)
    _check_hparams(rank, alpha, dropout)
    if isinstance(trainable, str):
        trainable = (trainable,)
    options = dict(method_options or {})
    plan = None
    if m.uses_adapters:
        plan = resolve_targets(model, targets, towers, tower_of)
        if m.needs_gated and not plan.ffns:
            found = ", ".join(sorted({x.tower for x in plan.mlps})) or "none"
            raise ValueError(
                f"method {method!r} needs a gated FFN, but the targeted towers ({', '.join(plan.towers)}) of "
                f"{type(model).__name__} have none (non-gated MLPs in: {found}); use 'lora' there"
            )
    adapted = m.build(
        model,
        plan,
        rank=int(rank),
        alpha=float(alpha),
        dropout=float(dropout),
        trainable=list(trainable),
        options=options,
    )
    if plan is not None:
        for t in plan.towers_without_gated:
            adapted.options.setdefault("notes", []).append(
                f"tower {t!r} has no gated FFN: its MLP targets get plain {m.name if not m.needs_gated else 'lora'}"
            )
    adapted.options.setdefault(
        "hparams",
        {
            "targets": tuple(targets),
            "towers": tuple(towers),
            "rank": int(rank),
            "alpha": float(alpha),
            "dropout": float(dropout),
        },
    )
    return adapted
