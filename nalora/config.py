"""``NALoRAConfig``: every option of NALORA.md, named as there, validated on construction."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from nalora.activations import SELF_GATED
from nalora.schedule import FINAL_FRAC, RHO_FINAL, WARMUP_FRAC, check_schedule

IMPORTANCE = ("jacobian", "derivative")
MASK_TARGETS = ("gate", "up", "down")
MASK_SELECTION = ("importance", "random", "static")


def _default_gammas() -> dict[str, tuple[float, float, float]]:
    # (suppressed, selecting, linear). Untuned priors: a gate step moves the selection weight s(g)
    # fastest in the selecting regime, so it is damped there; in the linear regime (k ~ 1) the channel
    # behaves like a linear unit and takes a larger step. Replace by the tuning record's values.
    prior = (1.0, 0.75, 1.25)
    return {act: prior for act in SELF_GATED}


@dataclass
class NALoRAConfig:
    """NA-LoRA options (NALORA.md).

    mask: temporal-importance mask on gate LoRA rows (mechanism 1).
    step_scaling: activation-specific step scaling of B_gate rows (mechanism 2); off by itself for
        activations without a partition (ReLU, identity, sigmoid-GLU).
    importance: "jacobian" (mean |phi'(g) u|) or "derivative" (mean |phi'(g)|).
    beta: EMA factor of the importance and regime-occupancy statistics.
    mask_interval: optimiser steps between statistics refreshes.
    warmup_frac, final_frac, rho_final: the keep-fraction schedule rho(t) (defaults in ``nalora.schedule``).
    mask_selection: which channels the mask keeps at a refresh: "importance" (top rho*d_ff of the
        importance EMA, NALORA.md), "random" (a uniform random draw at each refresh, control) or
        "static" (top rho*d_ff of the importance ranking frozen at the first refresh at/after t_w, control).
    mask_targets: what the channel mask covers: "gate" rows of B_gate; ablations add "up" rows of
        B_up and "down" input columns of A_down.
    gammas: per activation (gamma_supp, gamma_sel, gamma_lin). Hyperparameters; the defaults
        (1.0, 0.75, 1.25) are untuned priors until the tuning record says otherwise.
    regime_tol: the |k - 1| tolerance defining z_lin (NALORA.md tabulates 0.1 and 0.05).
    """

    mask: bool = True
    step_scaling: bool = True
    importance: str = "jacobian"
    beta: float = 0.9
    mask_interval: int = 10
    warmup_frac: float = WARMUP_FRAC
    final_frac: float = FINAL_FRAC
    rho_final: float = RHO_FINAL
    mask_selection: str = "importance"
    mask_targets: list[str] = field(default_factory=lambda: ["gate"])
    gammas: dict[str, tuple[float, float, float]] = field(default_factory=_default_gammas)
    regime_tol: float = 0.1

    def __post_init__(self) -> None:
        self._check_types()
        if self.importance not in IMPORTANCE:
            raise ValueError(f"importance must be one of {IMPORTANCE}, got {self.importance!r}")
        if not 0.0 <= self.beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {self.beta}")
        if self.mask_interval < 1:
            raise ValueError(f"mask_interval must be an int >= 1, got {self.mask_interval!r}")
        check_schedule(self.warmup_frac, self.final_frac, self.rho_final)
        if self.mask_selection not in MASK_SELECTION:
            raise ValueError(f"mask_selection must be one of {MASK_SELECTION}, got {self.mask_selection!r}")
        if isinstance(self.mask_targets, str):
            raise ValueError(f"mask_targets must be a list such as ['gate'], got {self.mask_targets!r}")  # noqa: TRY004
        self.mask_targets = list(self.mask_targets)
        bad = [t for t in self.mask_targets if t not in MASK_TARGETS]
        if bad or not self.mask_targets or len(set(self.mask_targets)) != len(self.mask_targets):
            raise ValueError(f"mask_targets must be distinct entries of {MASK_TARGETS}, got {self.mask_targets}")
        if not self.regime_tol > 0:
            raise ValueError(f"regime_tol must be > 0, got {self.regime_tol}")
        gammas = dict(_default_gammas())
        for act, triple in dict(self.gammas).items():
            if act not in SELF_GATED:
                raise ValueError(f"gammas: {act!r} has no regime partition; use one of {SELF_GATED}")
            triple = tuple(float(x) for x in triple)
            if len(triple) != 3 or not all(math.isfinite(x) and x > 0 for x in triple):
                raise ValueError(f"gammas[{act!r}] must be 3 finite positive numbers, got {triple}")
            gammas[act] = triple
        self.gammas = gammas

    def _check_types(self) -> None:
        """A wrongly typed scalar option is a one-line error naming it (not a TypeError deep inside)."""
        kinds = {"bool": (bool,), "str": (str,), "float": (int, float), "int": (int,)}
        for f in fields(self):
            allowed = kinds.get(str(f.type))
            value = getattr(self, f.name)
            if allowed is None:
                continue
            ok = isinstance(value, allowed) and (f.type == "bool" or not isinstance(value, bool))
            if not ok or (f.type == "float" and not math.isfinite(value)):
                raise ValueError(f"NA-LoRA option {f.name} must be a{'n' if f.type == 'int' else ''} "
                                 f"{'finite number' if f.type == 'float' else f.type}, got {value!r}")
            if f.type == "float":
                setattr(self, f.name, float(value))  # 1 and 1.0 are one configuration (one run id)

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> NALoRAConfig:
        """Build from a plain dict; unknown keys are an error."""
        options = dict(options or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown NA-LoRA option(s) {unknown}; known: {sorted(known)}")
        return cls(**options)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict of every option (for run records)."""
        d = asdict(self)
        d["gammas"] = {k: list(v) for k, v in self.gammas.items()}
        return d
