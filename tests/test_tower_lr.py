"""Per-tower lr multipliers (``Adapted.make_optimizer(tower_lr_scale=...)``) on a tiny composed VLM."""

from __future__ import annotations

import pytest
import torch

from nalora import inject

LR, SCALE = 1e-2, 0.1
SPEC = "tiny-vit-swiglu+tiny-byte-llama"  # gated SwiGLU FFNs in both towers, so NA-LoRA acts in both


def _vlm() -> torch.nn.Module:
    from benchmarks.vlm import build_vlm

    return build_vlm(SPEC, align=False).model


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 259, (4, 12), generator=g)
    return {"pixel_values": torch.randn(4, 3, 28, 28, generator=g), "input_ids": ids, "labels": ids}


def _adapt(method: str, **kw):
    torch.manual_seed(0)
    return inject(_vlm(), method, targets=("gate", "up", "down"), rank=2, trainable=["connector"], **kw)


def _tower(name: str) -> str:
    return "vision" if ".vision_tower." in f".{name}" else "language"


def _lr_by_name(adapted, opt) -> dict[str, float]:
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    return {n: lr_of[id(p)] for n, p in adapted.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["lora", "loraplus", "dora", "pissa", "nalora"])
def test_vision_adapters_at_lr_times_scale_language_at_lr(method):
    adapted = _adapt(method)
    plain = _lr_by_name(adapted, adapted.make_optimizer(LR, total_steps=4))
    opt = adapted.make_optimizer(LR, total_steps=4, tower_lr_scale={"vision": SCALE}) if method != "nalora" else None
    if opt is None:  # NA-LoRA's controller attaches to one optimiser only: a fresh model for the scaled one
        adapted = _adapt(method)
        opt = adapted.make_optimizer(LR, total_steps=4, tower_lr_scale={"vision": SCALE})
    scaled = _lr_by_name(adapted, opt)
    assert set(scaled) == set(plain) and sum(len(g["params"]) for g in opt.param_groups) == len(scaled)
    vision = [n for n in scaled if _tower(n) == "vision" and "connector" not in n]
    assert vision and any("magnitude" in n for n in vision) == (method == "dora")
    for n, lr in scaled.items():
        want = plain[n] * (SCALE if n in vision else 1.0)  # the method's own ratios (LoRA+'s B) kept per tower
        assert lr == pytest.approx(want), n
    if method == "loraplus":
        b = {_tower(n): lr for n, lr in scaled.items() if "lora_B" in n}
        a = {_tower(n): lr for n, lr in scaled.items() if "lora_A" in n}
        assert b == pytest.approx({"vision": 16 * LR * SCALE, "language": 16 * LR}) and a["vision"] == LR * SCALE
    n_vision = sum(p.numel() for n, p in adapted.model.named_parameters() if n in vision)
    assert adapted.tower_lr == {"vision": {"scale": SCALE, "tensors": len(vision), "numel": n_vision}}
    assert {lr for n, lr in scaled.items() if "connector" in n} == {plain[n] for n in scaled if "connector" in n}


def test_first_adam_step_is_lr_times_scale_in_the_vision_tower():
    """Adam's first step moves each weight by ~lr whatever its gradient: LoRA B (zero at init) shows the lr
    each tower really trained at, so a multiplier that is dropped anywhere fails here."""
    adapted = _adapt("lora")
    opt = adapted.make_optimizer(LR, tower_lr_scale={"vision": SCALE})
    adapted.model(**_batch()).loss.backward()
    opt.step()
    step = {}
    for n, p in adapted.model.named_parameters():
        if "lora_B" in n:
            step[_tower(n)] = max(step.get(_tower(n), 0.0), p.detach().abs().max().item())
    assert step["language"] == pytest.approx(LR, rel=1e-3)
    assert step["vision"] == pytest.approx(LR * SCALE, rel=1e-3)


def test_nalora_step_hooks_act_on_the_scaled_groups():
    adapted = _adapt("nalora")
    opt = adapted.make_optimizer(LR, total_steps=4, tower_lr_scale={"vision": SCALE, "language": 0.5})
    assert adapted.tower_lr["language"]["tensors"] > 0 and adapted.tower_lr["vision"]["tensors"] > 0
    for seed in range(2):  # the controller's pre/post hooks run around the split optimiser without error
        adapted.model(**_batch(seed)).loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.isfinite(p).all() for p in adapted.model.parameters())


def test_full_fine_tuning_scales_the_vision_tower_not_the_connector():
    adapted = _adapt("full")
    lrs = _lr_by_name(adapted, adapted.make_optimizer(LR, tower_lr_scale={"vision": SCALE}))
    assert sorted({lr for n, lr in lrs.items() if n.startswith("vision_tower.")}) == pytest.approx([LR * SCALE])
    assert {lr for n, lr in lrs.items() if not n.startswith("vision_tower.")} == {LR}  # connector, LM


def test_head_has_no_tower_parameters():
    adapted = _adapt("head")
    lrs = _lr_by_name(adapted, adapted.make_optimizer(LR, tower_lr_scale={"vision": SCALE}))
    assert set(lrs.values()) == {LR} and adapted.tower_lr["vision"]["tensors"] == 0


def test_no_multiplier_leaves_the_method_groups_alone():
    adapted = _adapt("loraplus")
    groups = [(g["lr"], len(g["params"])) for g in adapted.make_optimizer(LR).param_groups]
    again = _adapt("loraplus")
    assert [(g["lr"], len(g["params"])) for g in again.make_optimizer(LR, tower_lr_scale={}).param_groups] == groups
    assert again.tower_lr == {}


@pytest.mark.parametrize("scales,needle", [
    ({"visoin": 0.1}, "unknown tower 'visoin'"),
    ({"vision": 0}, "tower_lr_scale.vision must be a finite number > 0, got 0"),
    ({"vision": float("nan")}, "must be a finite number > 0"),
    ({"vision": True}, "must be a finite number > 0"),
])
def test_bad_multiplier_is_a_one_line_error(scales, needle):
    adapted = _adapt("lora")
    with pytest.raises(ValueError, match=needle) as e:
        adapted.make_optimizer(LR, tower_lr_scale=scales)
    assert "\n" not in str(e.value)
