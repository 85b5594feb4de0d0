"""One registry of adaptation methods, selectable by name (in the spirit of peft's tuner registry).

Adding a method is one entry: subclass ``Method`` and decorate it with ``@register_method("name")``
in a module imported by ``nalora.methods``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, ClassVar

if TYPE_CHECKING:
    import torch
    from torch import nn

    from nalora.adapted import Adapted
    from nalora.plan import TargetPlan

_METHODS: dict[str, type["Method"]] = {}


class Method:
    """How one method adapts a model and builds its optimiser.

    ``build`` receives the resolved ``TargetPlan`` (the same for every method with the same targets,
    towers and rank) and returns an ``Adapted``; ``make_optimizer`` builds the optimiser for it.
    """

    name: str = ""
    needs_gated: bool = False  # True: refuse plans whose targeted towers have no gated FFN
    uses_adapters: bool = True  # False for "full" and "head": no target plan needed
    uses_rank: bool = True  # False where ``rank`` is ignored (IA3): no rank-vs-layer-size check
    defaults: ClassVar[dict[str, Any]] = {}  # every option the method takes, with its default

    def check_option(self, key: str, value: Any) -> Any:
        """Validate one option value (a one-line ``ValueError`` naming it); return it normalised."""
        return value

    def resolve_options(self, options: dict[str, Any] | None) -> dict[str, Any]:
        """Every option of the method with defaults filled in, validated without a model.

        What a run record stores and hashes: change a default, get a new run id. An unknown option or a bad
        value is a one-line ``ValueError`` naming it.
        """
        options = dict(options or {})
        bad = sorted(set(options) - set(self.defaults))
        if bad:
            raise ValueError(f"unknown option {bad[0]!r} for method {self.name!r}; "
                             f"allowed: {', '.join(sorted(self.defaults)) or 'none'}")
        return {k: self.check_option(k, v) for k, v in {**self.defaults, **options}.items()}

    def build(
        self,
        model: "nn.Module",
        plan: "TargetPlan",
        *,
        rank: int,
        alpha: float,
        dropout: float,
        trainable: list[str],
        options: dict[str, Any],
    ) -> "Adapted":
        raise NotImplementedError

    def make_optimizer(
        self,
        adapted: "Adapted",
        lr: float,
        weight_decay: float = 0.0,
        *,
        total_steps: int | None = None,
        **kwargs: Any,
    ) -> "torch.optim.Optimizer":
        """AdamW over the trainable parameters. ``total_steps`` lets schedule-aware methods plan."""
        import torch

        params = [p for p in adapted.model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **kwargs)

    def save(self, adapted: "Adapted", path: Any) -> None:
        """Write the artifact (``Adapted.save`` calls it after ``finalize``); default: plain peft adapter."""
        adapted.model.save_pretrained(str(path))


def positive_number(method: str, key: str, value: Any) -> float:
    """``value`` as a float if it is a finite number > 0, else a one-line ``ValueError`` naming the option."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{method} option {key} must be a finite positive number, got {value!r}")
    return float(value)


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: make ``cls`` selectable as ``name``."""

    def wrap(cls: type[Method]) -> type[Method]:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is already registered by {_METHODS[name].__qualname__}")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return wrap


def get_method(name: str) -> Method:
    """An instance of the method registered as ``name``; a clear error for unknown names."""
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]()


def list_methods() -> list[str]:
    return sorted(_METHODS)
