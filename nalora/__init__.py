"""NA-LoRA: nonlinearity-aware LoRA for gated Transformer FFNs, and the peft baselines beside it."""

import sys
import types
from pathlib import Path

from nalora.adapted import Adapted
from nalora.discovery import GatedFFN, PlainMLP, find_gated_ffns, find_mlps, normalize_activation
from nalora.plan import Target, TargetPlan, resolve_targets

if not (Path(__file__).parent / "methods" / "nalora.py").exists():  # pragma: no cover
    # Only while NA-LoRA's method module is not written yet: an empty stand-in registers nothing
    # ("nalora" stays an unknown method), so the baselines remain importable.
    sys.modules.setdefault("nalora.methods.nalora", types.ModuleType("nalora.methods.nalora"))
import nalora.methods  # noqa: F401  (registers every built-in method)
from nalora.injection import inject
from nalora.methods.registry import get_method, list_methods, register_method

try:
    from nalora.config import NALoRAConfig
    from nalora.controller import NALoRAController
    from nalora.diagnostics import selection_misalignment
except ModuleNotFoundError as e:  # pragma: no cover - B's modules not written yet
    if not (e.name or "").startswith("nalora."):
        raise

__all__ = [
    "Adapted",
    "GatedFFN",
    "NALoRAConfig",
    "NALoRAController",
    "PlainMLP",
    "Target",
    "TargetPlan",
    "find_gated_ffns",
    "find_mlps",
    "get_method",
    "inject",
    "list_methods",
    "normalize_activation",
    "register_method",
    "resolve_targets",
    "selection_misalignment",
]
