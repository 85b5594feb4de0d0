"""Keep-fraction schedule rho(t) and the NALoRAConfig options."""

from __future__ import annotations

import itertools

import pytest

from nalora.config import NALoRAConfig
from nalora.schedule import keep_count, keep_fraction


def test_warmup_cubic_and_final_values():
    # T=100: t_w=10, t_f=70, rho_final=0.5
    assert keep_fraction(0, 100) == 1.0
    assert keep_fraction(9, 100) == 1.0
    assert keep_fraction(10, 100) == pytest.approx(1.0)
    # halfway through the decrease: 0.5 + 0.5 * (1 - 0.5)^3
    assert keep_fraction(40, 100) == pytest.approx(0.5 + 0.5 * 0.125)
    assert keep_fraction(25, 100) == pytest.approx(0.5 + 0.5 * 0.75**3)
    assert keep_fraction(70, 100) == 0.5
    assert keep_fraction(99, 100) == 0.5
    assert keep_fraction(500, 100, rho_final=0.25) == 0.25


def test_monotone_and_options():
    vals = [keep_fraction(t, 50, warmup_frac=0.2, final_frac=0.6, rho_final=0.25) for t in range(50)]
    assert all(a >= b for a, b in itertools.pairwise(vals))
    assert vals[0] == 1.0 and vals[-1] == 0.25 and vals[9] == 1.0 and vals[10] == 1.0 and vals[11] < 1.0
    # warm-up == final: a step down, no division by zero
    assert keep_fraction(5, 10, warmup_frac=0.5, final_frac=0.5, rho_final=0.75) == 0.75


@pytest.mark.parametrize("kw,msg", [
    ({"total_steps": 0}, "total_steps"),
    ({"warmup_frac": 0.8, "final_frac": 0.5}, "warmup_frac"),
    ({"rho_final": 0.0}, "rho_final"),
])
def test_schedule_errors(kw, msg):
    args = {"step": 1, "total_steps": 10} | kw
    with pytest.raises(ValueError, match=msg):
        keep_fraction(**args)


def test_keep_count():
    assert keep_count(0.5, 48) == 24
    assert keep_count(1.0, 48) == 48
    assert keep_count(0.001, 48) == 1


def test_config_defaults_and_validation():
    c = NALoRAConfig()
    assert (c.mask, c.step_scaling, c.importance, c.beta, c.mask_interval) == (True, True, "jacobian", 0.9, 10)
    assert (c.warmup_frac, c.final_frac, c.rho_final, c.mask_targets) == (0.1, 0.7, 0.5, ["gate"])
    assert {"silu", "gelu", "gelu_tanh"} <= set(c.gammas)
    assert all(0.5 <= g <= 2 for t in c.gammas.values() for g in t)
    assert NALoRAConfig(gammas={"silu": (1, 2, 3)}).gammas["silu"] == (1.0, 2.0, 3.0)
    for bad, msg in [
        ({"importance": "hessian"}, "importance"),
        ({"beta": 1.0}, "beta"),
        ({"mask_interval": 0}, "mask_interval"),
        ({"mask_targets": ["gate", "attn"]}, "mask_targets"),
        ({"mask_targets": "gate"}, "mask_targets"),
        ({"gammas": {"relu": (1, 1, 1)}}, "relu"),
        ({"gammas": {"silu": (1, 1)}}, "gammas"),
        ({"rho_final": 1.5}, "rho_final"),
    ]:
        with pytest.raises(ValueError, match=msg):
            NALoRAConfig(**bad)
    with pytest.raises(ValueError, match="unknown NA-LoRA option"):
        NALoRAConfig.from_options({"rank": 4})
    assert NALoRAConfig.from_options({"rho_final": 0.25}).to_dict()["rho_final"] == 0.25
