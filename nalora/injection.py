"""``inject``: apply a registered method to a model on the targets it resolves."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from nalora.adapted import Adapted
from nalora.discovery import TOWERS
from nalora.methods import get_method
from nalora.methods.registry import Method
from nalora.plan import TargetPlan, resolve_targets

__all__ = ["inject"]


def _check_hparams(rank: Any, alpha: Any, dropout: Any) -> None:
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank <= 0:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or not alpha > 0:
        raise ValueError(f"alpha must be a finite positive number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")


def _check_not_adapted(model: nn.Module) -> None:
    """A model that already carries peft adapters would be wrapped twice (and discovery sees no Linears)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layer = next((n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)), None)
    if layer is not None:
        if hasattr(model, "get_base_model"):  # a PeftModel: report the path inside its base model
            layer = next(n for n, m in model.get_base_model().named_modules() if isinstance(m, BaseTunerLayer))
        raise ValueError(f"{type(model).__name__} is already adapted (peft layer at {layer}); "
                         "inject into a fresh model")
    if hasattr(model, "peft_config"):
        raise ValueError(f"{type(model).__name__} is already adapted (a peft model); inject into the base model")


def _check_rank(plan: TargetPlan, rank: int) -> None:
    """A rank above min(in, out) of a layer is no low-rank adapter (a near-full fine-tune of that layer)."""
    for t in plan.items:
        if rank > min(t.out_features, t.in_features):
            raise ValueError(f"rank {rank} exceeds layer {t.module} (in {t.in_features}, out {t.out_features}); "
                             f"use rank <= {min(t.out_features, t.in_features)}")


def _plan(model: nn.Module, m: Method, targets: Sequence[str], towers: Sequence[str], rank: int,
          tower_of: Callable[[str], str] | None) -> TargetPlan:
    plan = resolve_targets(model, targets, towers, tower_of)
    if m.needs_gated and not plan.ffns:
        found = ", ".join(sorted({x.tower for x in plan.mlps})) or "none"
        raise ValueError(
            f"method {m.name!r} needs a gated FFN, but the targeted towers ({', '.join(plan.towers)}) of "
            f"{type(model).__name__} have none (non-gated MLPs in: {found}); use 'lora' there"
        )
    if m.uses_rank:
        _check_rank(plan, rank)
    return plan


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
    Bad input (unknown method or option, rank above a targeted layer's size, non-finite alpha, a model
    that is already adapted, ...) is a one-line ``ValueError`` before the model is touched.
    """
    m = get_method(method)
    _check_hparams(rank, alpha, dropout)
    options = dict(method_options or {})
    resolved = m.resolve_options(options)
    _check_not_adapted(model)
    if isinstance(trainable, str):
        trainable = (trainable,)
    plan = _plan(model, m, targets, towers, int(rank), tower_of) if m.uses_adapters else None
    adapted = m.build(model, plan, rank=int(rank), alpha=float(alpha), dropout=float(dropout),
                      trainable=list(trainable), options=options)
    adapted.method_config = resolved
    if plan is not None:
        applied = m.name if not m.needs_gated else "lora"
        adapted.notes.extend(f"tower {t!r} has no gated FFN: its MLP targets get plain {applied}"
                             for t in plan.towers_without_gated)
    adapted.hparams = adapted.hparams or {
        "targets": tuple(targets), "towers": tuple(towers), "rank": int(rank), "alpha": float(alpha),
        "dropout": float(dropout),
    }
    return adapted
