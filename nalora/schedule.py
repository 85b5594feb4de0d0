"""The NA-LoRA budget schedule rho(t): the fraction of gate channels whose LoRA rows train.

The schedule's defaults live here and only here (``NALoRAConfig`` takes them from this module).
"""

from __future__ import annotations

WARMUP_FRAC = 0.1  # t_w = WARMUP_FRAC * T: full budget before it
FINAL_FRAC = 0.7  # t_f = FINAL_FRAC * T: rho reaches RHO_FINAL there
RHO_FINAL = 0.5


def check_schedule(warmup_frac: float, final_frac: float, rho_final: float) -> None:
    """One-line ``ValueError`` unless ``0 <= warmup_frac <= final_frac <= 1`` and ``0 < rho_final <= 1``."""
    if not 0.0 <= warmup_frac <= final_frac <= 1.0:
        raise ValueError(f"need 0 <= warmup_frac <= final_frac <= 1, got {warmup_frac}, {final_frac}")
    if not 0.0 < rho_final <= 1.0:
        raise ValueError(f"rho_final must be in (0, 1], got {rho_final}")


def keep_fraction(
    step: int,
    total_steps: int,
    warmup_frac: float = WARMUP_FRAC,
    final_frac: float = FINAL_FRAC,
    rho_final: float = RHO_FINAL,
) -> float:
    """rho(step): 1 before ``t_w = warmup_frac*T``, cubic decrease to ``rho_final`` at ``t_f = final_frac*T``,
    then fixed (the cubic of AdaLoRA's budget schedule: ``rho_f + (1 - rho_f) (1 - progress)^3``)."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    check_schedule(warmup_frac, final_frac, rho_final)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if not warmup_over(step, total_steps, warmup_frac):
        return 1.0
    t_w, t_f = warmup_frac * total_steps, final_frac * total_steps
    if step >= t_f:
        return float(rho_final)
    progress = (step - t_w) / (t_f - t_w)
    return rho_final + (1.0 - rho_final) * (1.0 - progress) ** 3


def warmup_over(step: int, total_steps: int, warmup_frac: float = WARMUP_FRAC) -> bool:
    """Whether ``step`` is at or after ``t_w = warmup_frac*T`` (where the static mask freezes its ranking)."""
    return step >= warmup_frac * total_steps


def keep_count(rho: float, d_ff: int) -> int:
    """Number of kept channels ``round(rho * d_ff)``, at least one."""
    return max(1, min(d_ff, round(rho * d_ff)))
