"""The NA-LoRA budget schedule rho(t): the fraction of gate channels whose LoRA rows train."""

from __future__ import annotations


def keep_fraction(
    step: int,
    total_steps: int,
    warmup_frac: float = 0.1,
    final_frac: float = 0.7,
    rho_final: float = 0.5,
) -> float:
    """rho(step): 1 before ``t_w = warmup_frac*T``, cubic decrease to ``rho_final`` at ``t_f = final_frac*T``,
    then fixed (the cubic of AdaLoRA's budget schedule: ``rho_f + (1 - rho_f) (1 - progress)^3``)."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if not 0.0 <= warmup_frac <= final_frac <= 1.0:
        raise ValueError(f"need 0 <= warmup_frac <= final_frac <= 1, got {warmup_frac}, {final_frac}")
    if not 0.0 < rho_final <= 1.0:
        raise ValueError(f"rho_final must be in (0, 1], got {rho_final}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    t_w, t_f = warmup_frac * total_steps, final_frac * total_steps
    if step < t_w:
        return 1.0
    if step >= t_f:
        return float(rho_final)
    progress = (step - t_w) / (t_f - t_w)
    return rho_final + (1.0 - rho_final) * (1.0 - progress) ** 3


def keep_count(rho: float, d_ff: int) -> int:
    """Number of kept channels ``round(rho * d_ff)``, at least one."""
    return max(1, min(d_ff, round(rho * d_ff)))
