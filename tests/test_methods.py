"""Every registered method: trains a tiny Llama, saves a plain artifact that reloads, merges exactly."""

from __future__ import annotations

import copy

import pytest
import tiny_models as tm
import torch
from peft import PeftModel

from nalora import get_method, inject, list_methods

STEPS = 30
# Scaling-vector methods (vera, ia3) move fewer, smaller parameters: they get a larger step.
LR = {"full": 2e-3, "vera": 1e-1, "ia3": 5e-1}
NON_ADAPTER = {"full", "head"}


def _batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    return torch.randint(0, tm.VOCAB, (4, 12), generator=g)


def _loss(model, x) -> torch.Tensor:
    return model(input_ids=x, labels=x).loss


def _logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


def _inject(method: str):
    torch.manual_seed(0)
    trainable = ["lm_head"] if method == "head" else []
    return inject(tm.llama(), method, targets=("gate",), rank=4, alpha=8, trainable=trainable)


@pytest.fixture(scope="module", params=list_methods())
def trained(request):
    method = request.param
    adapted = _inject(method)
    x = _batch()
    adapted.model.eval()
    with torch.no_grad():
        first = _loss(adapted.model, x).item()
    opt = adapted.make_optimizer(LR.get(method, 1e-2), weight_decay=0.01, total_steps=STEPS)
    adapted.model.train()
    for _ in range(STEPS):
        _loss(adapted.model, x).backward()
        opt.step()
        opt.zero_grad()
    adapted.model.eval()
    with torch.no_grad():
        last = _loss(adapted.model, x).item()
    return method, adapted, first, last


def test_training_lowers_loss(trained):
    method, adapted, first, last = trained
    assert last < first - 0.05, f"{method}: loss {first:.4f} -> {last:.4f}"
    assert adapted.num_trainable() > 0


def test_save_reload_same_logits(trained, tmp_path):
    method, adapted, _, _ = trained
    x = _batch()
    adapted.save(tmp_path)  # finalize (NA-LoRA folds its mask) then save
    after_fold = _logits(adapted.model, x)
    base = tm.llama()
    assert not torch.allclose(after_fold, _logits(base, x), atol=1e-4), "training must have changed the model"
    if method in NON_ADAPTER:
        from transformers import LlamaForCausalLM

        reloaded = LlamaForCausalLM.from_pretrained(tmp_path)
    else:
        assert (tmp_path / "adapter_config.json").exists()
        reloaded = PeftModel.from_pretrained(base, tmp_path)  # plain peft, original base weights
    torch.testing.assert_close(_logits(reloaded.eval(), x), after_fold, rtol=1e-4, atol=1e-5)


def test_merge_matches_unmerged(trained):
    method, adapted, _, _ = trained
    if method in NON_ADAPTER:
        pytest.skip("no adapter to merge")
    x = _batch()
    adapted.finalize()
    model = copy.deepcopy(adapted.model)
    before = _logits(model, x)
    merged = model.merge_and_unload()
    torch.testing.assert_close(_logits(merged, x), before, rtol=1e-4, atol=1e-5)
    n_base = sum(p.numel() for p in tm.llama().parameters())
    assert sum(p.numel() for p in merged.parameters()) == n_base


def test_same_plan_for_every_adapter_method():
    """Fair comparison: every adapter method touches exactly the same modules."""
    names = {}
    for m in list_methods():
        if m in NON_ADAPTER:
            continue
        names[m] = sorted(r["name"] for r in _inject(m).report)
    assert len({tuple(v) for v in names.values()}) == 1, names


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "nope"}, "unknown method 'nope'"),
        ({"method": "lora", "rank": 0}, "rank must be a positive int"),
        ({"method": "lora", "rank": -2}, "rank must be a positive int"),
        ({"method": "lora", "rank": 2.5}, "rank must be a positive int"),
        ({"method": "lora", "rank": True}, "rank must be a positive int"),
        ({"method": "lora", "alpha": 0}, "alpha must be a finite positive number"),
        ({"method": "lora", "alpha": float("inf")}, "alpha must be a finite positive number, got inf"),
        ({"method": "lora", "alpha": float("nan")}, "alpha must be a finite positive number, got nan"),
        ({"method": "lora", "rank": 1000}, r"rank 1000 exceeds layer model\.layers\.0\.mlp\.gate_proj \(in 32, out 48\)"),
        ({"method": "nalora", "rank": 33}, "rank 33 exceeds layer"),
        ({"method": "lora", "rank": 33, "targets": ("attn",)}, r"rank 33 exceeds layer model\.layers\.0\.self_attn"),
        ({"method": "lora_gate_scaled", "method_options": {"gate_step_scale": 0}}, "gate_step_scale must be a finite"),
        ({"method": "nalora_random_mask", "method_options": {"mask_selection": "static"}},
         "fixes mask_selection='random'"),
        ({"method": "lora", "dropout": 1.0}, "dropout must be in"),
        ({"method": "lora", "method_options": {"foo": 1}}, "unknown option 'foo' for method 'lora'"),
        ({"method": "pissa", "method_options": {"niter": 0}}, "niter must be a positive int"),
        ({"method": "loraplus", "method_options": {"loraplus_lr_ratio": -1}}, "loraplus_lr_ratio must be"),
        ({"method": "head"}, "method 'head' needs at least one trainable module"),
        ({"method": "full", "trainable": ["nope"]}, "trainable module 'nope' not found"),
    ],
)
def test_bad_input(kwargs, message):
    method = kwargs.pop("method")
    with pytest.raises(ValueError, match=message):
        inject(tm.llama(), method, **kwargs)


NALORA = [m for m in list_methods() if get_method(m).needs_gated]
assert NALORA == ["lora_gate_scaled", "nalora", "nalora_mask", "nalora_random_mask", "nalora_scale",
                  "nalora_static_mask"]


@pytest.mark.parametrize("factory", [tm.bert, tm.clip_vision])
@pytest.mark.parametrize("method", NALORA)
def test_nalora_refuses_models_without_gated_ffn(method, factory):
    with pytest.raises(ValueError, match="needs a gated FFN"):
        inject(factory(), method)


def test_head_trains_only_the_head():
    adapted = _inject("head")
    names = {n for n, p in adapted.model.named_parameters() if p.requires_grad}
    assert names == {"lm_head.weight"}


def test_package_exports():
    import nalora

    for name in (
        "find_gated_ffns",
        "find_mlps",
        "GatedFFN",
        "PlainMLP",
        "resolve_targets",
        "inject",
        "Adapted",
        "get_method",
        "list_methods",
        "register_method",
        "NALoRAConfig",
        "NALoRAController",
        "selection_misalignment",
    ):
        assert hasattr(nalora, name), name
    assert {"lora", "rslora", "loraplus", "dora", "pissa", "vera", "ia3", "full", "head", "lora_gate_scaled",
            "nalora_random_mask", "nalora_static_mask"} <= set(list_methods())


def test_ia3_ignores_rank_so_no_rank_check():
    inject(tm.llama(), "ia3", rank=1000)  # IA3 has no rank: nothing to exceed


@pytest.mark.parametrize("method", ["lora", "nalora", "full"])
def test_inject_twice_says_already_adapted(method):
    adapted = inject(tm.llama(), "lora", rank=2)
    with pytest.raises(ValueError, match="already adapted"):
        inject(adapted.model, method)
    with pytest.raises(ValueError, match=r"already adapted \(peft layer at model\.layers\.0\.mlp\.gate_proj\)"):
        inject(adapted.model.get_base_model(), method)


# ---------------------------------------------------------------- resolve_options


def test_resolve_options_fills_every_default():
    assert get_method("lora").resolve_options({}) == {}
    assert get_method("full").resolve_options(None) == {}
    assert get_method("loraplus").resolve_options({}) == {"loraplus_lr_ratio": 16.0}
    assert get_method("loraplus").resolve_options({"loraplus_lr_ratio": 4}) == {"loraplus_lr_ratio": 4.0}
    assert get_method("pissa").resolve_options({}) == {"niter": None}
    assert get_method("vera").resolve_options({}) == {"d_initial": 0.1}
    assert get_method("lora_gate_scaled").resolve_options({}) == {"gate_step_scale": 0.77}
    full = get_method("nalora").resolve_options({"rho_final": 0.25})
    assert full["rho_final"] == 0.25 and full["beta"] == 0.9 and full["mask_interval"] == 10
    assert (full["warmup_frac"], full["final_frac"], full["mask_selection"]) == (0.1, 0.7, "importance")
    assert full["gammas"]["silu"] == [1.0, 0.75, 1.25]
    assert get_method("nalora_mask").resolve_options({})["step_scaling"] is False
    assert get_method("nalora_scale").resolve_options({})["mask"] is False
    assert get_method("nalora_random_mask").resolve_options({})["mask_selection"] == "random"
    assert get_method("nalora_static_mask").resolve_options({})["mask_selection"] == "static"
    # an int and a float of one value are one configuration (one run id)
    assert get_method("nalora").resolve_options({"beta": 0}) == get_method("nalora").resolve_options({"beta": 0.0})


@pytest.mark.parametrize("method, options, message", [
    ("lora", {"r": 4}, "unknown option 'r' for method 'lora'; allowed: none"),
    ("full", {"x": 1}, "unknown option 'x' for method 'full'"),
    ("loraplus", {"loraplus_lr_ratio": "big"}, "loraplus_lr_ratio must be a finite positive number"),
    ("vera", {"d_initial": -1}, "d_initial must be a finite positive number"),
    ("pissa", {"niter": 2.5}, "niter must be a positive int"),
    ("nalora", {"beta": "x"}, "beta must be a finite number"),
    ("nalora", {"mask_interval": 2.0}, "mask_interval must be an int"),
    ("nalora", {"mask": "yes"}, "mask must be a bool"),
    ("nalora", {"mask_selection": "best"}, "mask_selection must be one of"),
    ("nalora", {"gamma": 1}, "unknown NA-LoRA option"),
    ("nalora_mask", {"step_scaling": True}, "fixes step_scaling=False"),
    ("lora_gate_scaled", {"gate_step_scale": float("nan")}, "gate_step_scale must be a finite positive number"),
])
def test_resolve_options_rejects_bad_options_in_one_line(method, options, message):
    with pytest.raises(ValueError, match=message) as e:
        get_method(method).resolve_options(options)
    assert "\n" not in str(e.value)


def test_every_method_resolves_its_defaults_and_records_them():
    for name in list_methods():
        resolved = get_method(name).resolve_options({})
        assert isinstance(resolved, dict)
        assert get_method(name).resolve_options(resolved) == resolved  # idempotent: a record re-resolves
    adapted = _inject("loraplus")
    assert adapted.method_config == {"loraplus_lr_ratio": 16.0}


# ---------------------------------------------------------------- NA-LoRA is not LoRA; the controls


def _gate_bs(adapted) -> list[torch.nn.Parameter]:
    base = adapted.model.get_base_model()
    return [base.get_submodule(f"model.layers.{i}.mlp.gate_proj").lora_B["default"].weight for i in range(2)]


def _one_step(method: str, options: dict | None = None):
    """One AdamW step from the seed-0 init on the fixed batch; returns (adapted, optimizer, params before)."""
    adapted = inject(tm.llama(), method, targets=("gate", "up"), rank=4, alpha=8, method_options=options)
    opt = adapted.make_optimizer(1e-2, weight_decay=0.01, total_steps=STEPS)
    before = {n: p.detach().clone() for n, p in adapted.model.named_parameters() if p.requires_grad}
    adapted.model.train()
    _loss(adapted.model, _batch()).backward()
    opt.step()
    return adapted, opt, before


def _deltas(adapted, before) -> dict[str, torch.Tensor]:
    return {n: p.detach() - before[n] for n, p in adapted.model.named_parameters() if n in before}


@pytest.mark.parametrize("method, options", [("nalora_scale", None), ("nalora", None), ("lora_gate_scaled", None),
                                             ("lora_gate_scaled", {"gate_step_scale": 0.5})])
def test_gate_step_is_lora_step_times_scale_and_nothing_else_moves_differently(method, options):
    lora, _, before = _one_step("lora")
    other, _, before_other = _one_step(method, options)
    for n in before:
        assert torch.equal(before[n], before_other[n]), n  # same seed: same init
    d_lora, d_other = _deltas(lora, before), _deltas(other, before_other)
    gate_names = [n for n in d_lora if "gate_proj.lora_B" in n]
    assert len(gate_names) == 2
    for i, n in enumerate(gate_names):
        if method == "lora_gate_scaled":
            scale = torch.full((48,), (options or {}).get("gate_step_scale", 0.77))
        else:
            scale = other.controller.units[i].gamma
            assert (scale - 1).abs().max() > 0.05  # NA-LoRA's steps really differ from LoRA's
        torch.testing.assert_close(d_other[n], d_lora[n] * scale[:, None], rtol=1e-5, atol=1e-9)
        assert not torch.allclose(d_other[n], d_lora[n])
    for n in d_lora:  # every other parameter (A's, up's B) bit-identical to LoRA's step
        if n not in gate_names:
            assert torch.equal(d_other[n], d_lora[n]), n


def _train_steps(adapted, opt, steps: int) -> None:
    adapted.model.train()
    for s in range(steps):
        x = torch.randint(0, tm.VOCAB, (4, 12), generator=torch.Generator().manual_seed(s))
        _loss(adapted.model, x).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("method", ["nalora", "nalora_mask", "nalora_random_mask", "nalora_static_mask"])
def test_nalora_mask_zeroes_rows_and_freezes_their_optimizer_state(method):
    """After the schedule, 1 - rho_final of every B_gate's rows are zero and neither they nor their Adam
    moments move; LoRA moves every row."""
    opts = {"mask_interval": 2, "warmup_frac": 0.0, "final_frac": 0.5, "rho_final": 0.25}
    results = {}
    for m in ("lora", method):
        torch.manual_seed(0)
        adapted = inject(tm.llama(), m, targets=("gate",), rank=4, alpha=8,
                         method_options=None if m == "lora" else opts)
        opt = adapted.make_optimizer(1e-2, weight_decay=0.01, total_steps=8)
        _train_steps(adapted, opt, 7)  # refreshes after steps 0, 2, 4, 6: rho = 0.25 from step 4 on
        bs = _gate_bs(adapted)
        b0 = [b.detach().clone() for b in bs]
        st0 = [{k: v.clone() for k, v in opt.state[b].items() if v.shape == b.shape} for b in bs]
        _train_steps(adapted, opt, 1)  # step 7: no refresh
        results[m] = (bs, b0, st0, opt)
    for m, (bs, b0, st0, opt) in results.items():
        for b, before, state in zip(bs, b0, st0):
            zero = b.detach().abs().sum(1) == 0
            moved = (b.detach() != before).any(1)
            if m == "lora":
                assert not zero.any() and moved.all()
                continue
            assert int(zero.sum()) == 48 - 12  # keep_count(0.25, 48) = 12 rows kept
            assert torch.equal(moved, ~zero)  # kept rows move, masked rows stay at exactly zero
            for k, v in opt.state[b].items():
                if v.shape == b.shape:
                    assert torch.equal(v[zero], state[k][zero]), k  # masked rows' moments frozen
                    assert not torch.equal(v[~zero], state[k][~zero]), k


# ---------------------------------------------------------------- the method guide's plugin


def test_method_guide_plugin(tmp_path):
    """docs/adding_a_method.md's plugin, loaded as `--include-path` loads files, trains and saves plain LoRA."""
    import re
    from pathlib import Path

    from nalora.methods import registry
    from tasks.registry import load_tasks

    text = (Path(__file__).resolve().parents[1] / "docs" / "adding_a_method.md").read_text()
    code = re.search(r"## A complete plugin.*?```python\n(.*?)```", text, re.DOTALL).group(1)
    (tmp_path / "lora_fa.py").write_text(code)
    assert "lora_fa" not in list_methods()
    try:
        load_tasks(include_paths=[tmp_path], builtin=False, entry_points=False)
        assert "lora_fa" in list_methods()
        m = get_method("lora_fa")
        assert m.resolve_options({}) == {"a_init": "kaiming"}
        with pytest.raises(ValueError, match="a_init must be"):
            m.resolve_options({"a_init": "zeros"})
        torch.manual_seed(0)
        adapted = inject(tm.llama(), "lora_fa", targets=("gate", "up"), rank=4, alpha=8,
                         method_options={"a_init": "gaussian"})
        assert adapted.method_config == {"a_init": "gaussian"}
        a_before = {n: p.detach().clone() for n, p in adapted.model.named_parameters() if ".lora_A." in n}
        x = _batch()
        with torch.no_grad():
            first = _loss(adapted.model, x).item()
        opt = adapted.make_optimizer(1e-2)
        adapted.model.train()
        for _ in range(10):
            _loss(adapted.model, x).backward()
            opt.step()
            opt.zero_grad()
        adapted.model.eval()
        assert _loss(adapted.model, x).item() < first - 0.05
        params = dict(adapted.model.named_parameters())
        assert a_before and all(torch.equal(params[n], v) for n, v in a_before.items())
        adapted.save(tmp_path / "out")
        reloaded = PeftModel.from_pretrained(tm.llama(), tmp_path / "out").eval()
        torch.testing.assert_close(_logits(reloaded, x), _logits(adapted.model, x), rtol=1e-4, atol=1e-5)
    finally:
        registry._METHODS.pop("lora_fa", None)
