"""Target planning and injection: errors, towers, plain-LoRA fallback, packed-row exactness, trainable."""

from __future__ import annotations

import pytest
import tiny_models as tm
import torch
from safetensors.torch import load_file
from torch import nn

from nalora import inject, resolve_targets
from nalora.methods import registry
from nalora.methods.peft_lora import LoRA


def _lora_modules(adapted) -> list[str]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = adapted.model.get_base_model()
    return [n for n, m in base.named_modules() if isinstance(m, BaseTunerLayer)]


# ---------------------------------------------------------------- target / tower errors


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"targets": ()}, "targets is empty"),
        ({"targets": ("gates",)}, "unknown target 'gates'"),
        ({"towers": ("audio",)}, "unknown tower 'audio'"),
        ({"towers": ()}, "towers is empty"),
        ({"towers": ("vision",)}, "towers vision match nothing in LlamaForCausalLM"),
    ],
)
def test_plan_errors_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        resolve_targets(tm.llama(), **kwargs)


def test_target_matching_nothing():
    model = nn.Sequential()
    from timm.layers import GluMlp

    model.add_module("mlp", GluMlp(8, 12, act_layer=nn.SiLU))
    with pytest.raises(ValueError, match="target 'attn' matches nothing"):
        resolve_targets(model, targets=("gate", "attn"))


def test_error_is_one_line():
    with pytest.raises(ValueError) as e:
        inject(tm.llama(), "lora", targets=("gate", "nope"))
    assert "\n" not in str(e.value)


def test_plan_records_absent_tower_without_error():
    plan = resolve_targets(tm.llama(), ("gate", "up", "down", "attn"))
    assert plan.notes == ["tower 'vision' not present in the model"]
    assert len(plan.items) == 2 * 3 + 2 * 4
    assert {t.kind for t in plan.items} == {"gated", "attn"}


# ---------------------------------------------------------------- towers


@pytest.mark.parametrize(
    "tower, prefix", [("vision", "model.visual."), ("language", "model.language_model.")]
)
def test_qwen2_5_vl_towers_kept_apart(tower, prefix):
    adapted = inject(tm.qwen2_5_vl(), "lora", targets=("gate", "up", "down"), towers=(tower,), rank=2)
    names = _lora_modules(adapted)
    assert len(names) == 6
    assert all(n.startswith(prefix) for n in names), names
    assert {r["tower"] for r in adapted.report} == {tower}


def test_attn_targets_follow_towers():
    plan = resolve_targets(tm.qwen2_5_vl(), ("attn",), ("vision",))
    assert [t.module for t in plan.items] == [
        "model.visual.blocks.0.attn.qkv",
        "model.visual.blocks.0.attn.proj",
        "model.visual.blocks.1.attn.qkv",
        "model.visual.blocks.1.attn.proj",
    ]


# ---------------------------------------------------------------- non-gated towers


def test_non_gated_tower_gets_plain_lora_and_report_says_so():
    adapted = inject(tm.open_clip_eva02(), "lora", targets=("gate", "down"), rank=2)
    plan = adapted.plan
    assert plan.towers_without_gated == ["language"]
    plain = [r for r in adapted.report if r["kind"] == "plain_mlp"]
    gated = [r for r in adapted.report if r["kind"] == "gated"]
    assert {r["name"] for r in plain} == {
        "text.transformer.resblocks.0.mlp.c_fc",
        "text.transformer.resblocks.0.mlp.c_proj",
    }
    assert all("non-gated MLP" in r["note"] and r["tower"] == "language" for r in plain)
    assert len(gated) == 4 and {r["tower"] for r in gated} == {"vision"}
    assert any("'language' has no gated FFN" in n for n in adapted.notes)


@pytest.fixture
def gated_only_method():
    """A throwaway method with ``needs_gated`` (NA-LoRA's contract) to test inject's guard."""

    class Probe(LoRA):
        needs_gated = True

    registry._METHODS["_probe_gated"] = Probe
    Probe.name = "_probe_gated"
    yield "_probe_gated"
    del registry._METHODS["_probe_gated"]


@pytest.mark.parametrize("factory", [tm.bert, tm.clip_vision])
def test_gated_method_refused_without_gated_ffn(gated_only_method, factory):
    with pytest.raises(ValueError, match="needs a gated FFN"):
        inject(factory(), gated_only_method)


def test_gated_method_refused_when_only_non_gated_tower_targeted(gated_only_method):
    with pytest.raises(ValueError, match=r"targeted towers \(language\)"):
        inject(tm.open_clip_eva02(), gated_only_method, towers=("language",))
    inject(tm.open_clip_eva02(), gated_only_method, towers=("language", "vision"))  # mixed: allowed


# ---------------------------------------------------------------- packed exactness


def _train(adapted, batches, steps=5, lr=5e-2, wd=0.1):
    opt = adapted.make_optimizer(lr, weight_decay=wd)
    adapted.model.train()
    for i in range(steps):
        out = adapted.model(batches[i % len(batches)])
        for key in ("logits", "last_hidden_state"):
            out = getattr(out, key, out)
        loss = out.float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    adapted.model.eval()


def _packed_case(name):
    if name == "phi3":
        return tm.phi3, [torch.randint(0, tm.VOCAB, (2, 6))], 32
    if name == "eva02_tiny_packed":
        return tm.eva02_tiny_packed, [torch.randn(2, 3, 28, 28)], 32
    return tm.dinov2_swiglu, [torch.randn(2, 3, 28, 28)], 32


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


PACKED_CASES = [
    (m, n) for m in ("lora", "dora", "pissa") for n in ("phi3", "eva02_tiny_packed", "dinov2_swiglu")
]
PACKED_CASES += [("rslora", "phi3"), ("vera", "phi3"), ("ia3", "phi3")]


@pytest.mark.parametrize("method, model_name", PACKED_CASES)
def test_packed_gate_only_is_exact(method, model_name):
    factory, batches, d_in = _packed_case(model_name)
    base = factory()
    adapted = inject(factory(), method, targets=("gate",), rank=2)
    frozen = adapted.frozen_rows
    assert frozen, "packed targets must record held rows"
    _train(adapted, batches)
    peft_base = adapted.model.get_base_model()
    x = torch.randn(4, d_in)
    changed = False
    for path, rows in frozen.items():
        layer = peft_base.get_submodule(path)
        ((lo, hi),) = [(s.start, s.stop) for s in rows]
        if hasattr(layer, "lora_B"):
            assert torch.count_nonzero(layer.lora_B["default"].weight[lo:hi]) == 0
        with torch.no_grad():
            out, ref = layer(x), base.get_submodule(path)(x)
        if method == "pissa":  # residual + folded delta: equal up to float rounding
            assert _rel(out[:, lo:hi], ref[:, lo:hi]) < 1e-5
        else:
            assert torch.equal(out[:, lo:hi], ref[:, lo:hi])
        trained = [i for i in range(out.shape[1]) if not lo <= i < hi]
        changed |= _rel(out[:, trained], ref[:, trained]) > 1e-6
    assert changed, "the targeted rows must have trained"


def test_dora_magnitude_rows_held_under_weight_decay():
    adapted = inject(tm.phi3(), "dora", targets=("gate",), rank=2)
    guards = [g for g in adapted.row_guards if g.param_name == "lora_magnitude_vector"]
    assert len(guards) == 2  # one per Phi-3 layer
    before = [g.param.detach().clone() for g in guards]
    _train(adapted, [torch.randint(0, tm.VOCAB, (2, 6))], wd=0.5)
    for g, b in zip(guards, before):
        held = g.index
        assert torch.equal(g.param.detach()[held], b[held])
        free = torch.tensor([i for i in range(b.shape[0]) if i not in set(held.tolist())])
        assert not torch.equal(g.param.detach()[free], b[free])


def test_packed_gate_and_up_has_no_held_rows():
    adapted = inject(tm.phi3(), "lora", targets=("gate", "up"), rank=2)
    assert adapted.frozen_rows == {}
    assert {r["role"] for r in adapted.report} == {"gate+up"}


def test_eva_fused_qkv_adapter_is_applied():
    """timm EVA's biased fused qkv bypasses the module; injection must route through it."""
    model = tm.eva02_tiny_packed()
    adapted = inject(model, "lora", targets=("attn",), rank=2)
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        ref = adapted.model(x)
        for n, p in adapted.model.named_parameters():
            if "qkv.lora_B" in n:
                p.fill_(0.5)
        assert _rel(adapted.model(x), ref) > 1e-3
    assert any("qkv_bias_separate" in n for n in adapted.notes)


# ---------------------------------------------------------------- trainable modules


def test_trainable_modules_train_and_are_saved(tmp_path):
    adapted = inject(tm.llama(), "lora", targets=("gate",), rank=2, trainable=["lm_head"])
    head = [n for n, p in adapted.model.named_parameters() if "lm_head" in n and p.requires_grad]
    assert head, "lm_head must be trainable"
    adapted.save(tmp_path)
    keys = load_file(str(tmp_path / "adapter_model.safetensors")).keys()
    assert any("lm_head" in k for k in keys)
    assert any("lora_A" in k for k in keys)


def test_trainable_errors():
    with pytest.raises(ValueError, match="trainable module 'nohead' not found"):
        inject(tm.llama(), "lora", trainable=["nohead"])
    wrapper = nn.Module()
    wrapper.encoder = tm.eva02_tiny_packed()  # has encoder.head (Linear, 5 classes)
    wrapper.head = nn.Linear(5, 2)
    with pytest.raises(ValueError, match="trainable module 'head' is ambiguous"):
        inject(wrapper, "lora", trainable=["head"])
    wrapper.encoder.reset_classifier(0)  # encoder.head -> Identity: peft's suffix match is then harmless
    adapted = inject(wrapper, "lora", trainable=["head"])
    assert {n for n, p in adapted.model.named_parameters() if p.requires_grad and "lora" not in n} == {
        "base_model.model.head.modules_to_save.default.weight",
        "base_model.model.head.modules_to_save.default.bias",
    }


def test_packed_save_reload_on_timm_model(tmp_path):
    """Non-HF model, packed gate-only adapter: the saved artifact is plain peft and reloads exactly."""
    from peft import PeftModel

    adapted = inject(tm.eva02_tiny_packed(), "lora", targets=("gate",), rank=2)
    x = torch.randn(2, 3, 28, 28)
    _train(adapted, [x])
    adapted.save(tmp_path)
    reloaded = PeftModel.from_pretrained(tm.eva02_tiny_packed(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), adapted.model(x), rtol=1e-5, atol=1e-6)


def test_multihead_attention_is_adapted_as_one_module():
    """open_clip text blocks use nn.MultiheadAttention, whose out_proj Linear is never called."""
    adapted = inject(tm.open_clip_eva02(), "lora", targets=("attn",), towers=("language",), rank=2)
    assert [r["name"] for r in adapted.report] == ["text.transformer.resblocks.0.attn"]
    assert adapted.report[0]["layout"] == "mha"
    text = torch.randint(0, tm.VOCAB, (2, 8))
    with torch.no_grad():
        ref = adapted.model.encode_text(text)
        for n, p in adapted.model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.5)
        assert _rel(adapted.model.encode_text(text), ref) > 1e-3


@pytest.mark.parametrize("method", ["dora", "pissa", "vera", "ia3"])
def test_unsupported_multihead_attention_is_a_clear_error(method):
    with pytest.raises(ValueError, match=rf"method '{method}' cannot adapt nn.MultiheadAttention \(text\."):
        inject(tm.open_clip_eva02(), method, targets=("attn",), towers=("language",), rank=2)


# ---------------------------------------------------------------- one discovery, typed Adapted


def test_resolve_targets_runs_discovery_once(monkeypatch):
    import nalora.plan as plan_mod

    calls = []
    real = plan_mod.discover
    monkeypatch.setattr(plan_mod, "discover", lambda *a, **k: calls.append(1) or real(*a, **k))
    plan = resolve_targets(tm.qwen2_5_vl(), ("gate", "attn"))
    assert len(calls) == 1
    assert {t.kind for t in plan.items} == {"gated", "attn"}


def test_adapted_typed_fields_and_read_only_options_view():
    adapted = inject(tm.phi3(), "nalora", targets=("gate",), rank=2, method_options={"rho_final": 0.25})
    assert adapted.plan is not None and [f.name for f in adapted.plan.ffns] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert adapted.method_config["rho_final"] == 0.25 and adapted.method_config["beta"] == 0.9
    assert len(adapted.row_guards) == 2 and set(adapted.frozen_rows) == {f.gate for f in adapted.plan.ffns}
    assert adapted.hparams["rank"] == 2
    # the old untyped dict still reads (plugins written before the typed fields) ...
    assert adapted.options["plan"] is adapted.plan and adapted.options["row_guards"] is adapted.row_guards
    assert adapted.options["nalora_config"] == adapted.method_config
    # ... but typed keys are not written through it; other keys land in extras
    with pytest.raises(TypeError, match="read-only"):
        adapted.options["plan"] = None
    adapted.options["my_state"] = 1
    assert adapted.extras == {"my_state": 1}


def test_legacy_adapted_options_constructor():
    from nalora import Adapted
    from nalora.methods import get_method

    a = Adapted(model=nn.Linear(2, 2), method=get_method("full"), report=[],
                options={"trainable": ["x"], "notes": ["n"], "custom": 3})
    assert a.trainable == ["x"] and a.notes == ["n"] and a.extras == {"custom": 3}
