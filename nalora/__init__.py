"""NA-LoRA: nonlinearity-aware LoRA for gated Transformer FFNs, and the peft baselines beside it."""

import nalora.methods  # noqa: F401  (registers every built-in method)
from nalora.activations import normalize_activation
from nalora.adapted import Adapted
from nalora.config import NALoRAConfig
from nalora.controller import NALoRAController
from nalora.diagnostics import selection_misalignment
from nalora.discovery import GatedFFN, PlainMLP, find_gated_ffns, find_mlps
from nalora.injection import inject
from nalora.methods.registry import get_method, list_methods, register_method
from nalora.plan import Target, TargetPlan, resolve_targets

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
