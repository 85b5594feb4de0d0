"""The runner's fast-step helpers (benchmarks/runner/compiled.py) and ``nalora-bench steptime`` on CPU.

GPU figures come from the commands in docs/gpu_visits.md (results/perf/); here every helper is
checked for being *exact*: same loss, same gradients, same trained parameters as the plain eager step.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import os
import shutil
import weakref

import pytest
import torch
import torch.nn.functional as F

from benchmarks.runner import compiled as C
from tasks.common import tiny_llama

# ---------------------------------------------------------------------------------------------
# chunked cross-entropy


@pytest.mark.parametrize("n_chunks", [1, 3, 7])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_chunked_ce_matches_cross_entropy(n_chunks, reduction):
    g = torch.Generator().manual_seed(n_chunks)
    N, d, V = 37, 16, 50
    h = torch.randn(N, d, generator=g, requires_grad=True)
    w = torch.randn(V, d, generator=g, requires_grad=True)
    b = torch.randn(V, generator=g, requires_grad=True)
    t = torch.randint(0, V, (N,), generator=g)
    t[::4] = C.IGNORE_INDEX
    ref = F.cross_entropy(h @ w.t() + b, t, ignore_index=C.IGNORE_INDEX, reduction=reduction)
    ref_grads = torch.autograd.grad(ref, (h, w, b))
    got = C.linear_cross_entropy(h, w, t, bias=b, reduction=reduction, n_chunks=n_chunks)
    grads = torch.autograd.grad(got, (h, w, b))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


def test_chunked_ce_softcap_frozen_head_and_all_ignored():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 9, 8, generator=g, requires_grad=True)  # (B, T, d): flattened inside
    w = torch.randn(30, 8, generator=g)  # frozen head: no weight gradient computed
    t = torch.randint(0, 30, (2, 9), generator=g)
    cap = 3.0
    ref = F.cross_entropy((torch.tanh(h @ w.t() / cap) * cap).reshape(-1, 30), t.reshape(-1))
    got = C.linear_cross_entropy(h, w, t, softcap=cap, chunk_tokens=5)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.autograd.grad(got, h)[0], torch.autograd.grad(ref, h)[0], rtol=1e-5, atol=1e-5)
    none = torch.full((2, 9), C.IGNORE_INDEX)
    assert torch.isnan(C.linear_cross_entropy(h, w, none)) == torch.isnan(F.cross_entropy(h.reshape(-1, 8) @ w.t(), none.reshape(-1)))
    with pytest.raises(ValueError, match="reduction"):
        C.linear_cross_entropy(h, w, t, reduction="none")


@pytest.fixture(autouse=True)
def _no_kept_graphs():
    """Each test compiles from nothing (the runner keeps graphs between a process's runs: compiled._keep_graphs)."""
    C.forget_compiled()
    yield


def _lora(model, targets=("gate_proj", "up_proj", "down_proj")):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False)
    return get_peft_model(model, cfg)


def _batch(seed=0, B=3, T=21, V=257):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -5:] = 0  # a right-padded row
    labels = ids.clone()
    labels[:, :4] = C.IGNORE_INDEX  # prompt tokens
    labels[mask == 0] = C.IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_light_loss_equals_model_loss_and_grads():
    base, _ = tiny_llama()
    ref_model = _lora(copy.deepcopy(base)).train()
    model = _lora(copy.deepcopy(base)).train()
    kind, why = C.install_light_loss(model, impl="torch")
    assert (kind, why) == ("chunked", "")
    batch = _batch()
    ref = ref_model(**batch).loss
    ref.backward()
    out = model(**batch)
    out.loss.backward()
    assert out.logits.shape[1] == 1  # only the last position's logits were computed
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    g_ref, g = _lora_grads(ref_model), _lora_grads(model)
    assert g_ref.keys() == g.keys()
    for k in g:
        torch.testing.assert_close(g[k], g_ref[k], rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # evaluation: the model's own path, full logits
        assert model(**batch).logits.shape == (3, 21, base.config.vocab_size)


def test_light_loss_declines_unsupported_models():
    kind, why = C.install_light_loss(torch.nn.Linear(3, 3))
    assert kind == "model" and "not a Hugging Face causal LM" in why


# ---------------------------------------------------------------------------------------------
# bf16 frozen weights


def _autocast_step(model, batch):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    return loss.detach()


def test_bf16_frozen_is_exact_under_autocast():
    base, _ = tiny_llama()
    ref_model = _lora(copy.deepcopy(base)).train()
    model = _lora(copy.deepcopy(base)).train()
    n, why = C.cast_frozen_to_bf16(model, method="lora", autocast_bf16=True)
    # q,k,v,o + gate,up,down base weights of 2 layers; lm_head is tied to the embedding and stays fp32
    assert n == 2 * 7 and why == ""
    assert model.get_base_model().lm_head.weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    batch = _batch(1)
    assert torch.equal(_autocast_step(model, batch), _autocast_step(ref_model, batch))
    g_ref, g = _lora_grads(ref_model), _lora_grads(model)
    for k in g:
        assert torch.equal(g[k], g_ref[k]), k


def test_bf16_frozen_refused_where_not_exact():
    base, _ = tiny_llama()
    assert C.cast_frozen_to_bf16(copy.deepcopy(base).requires_grad_(True), method="full")[0] == 0
    assert C.cast_frozen_to_bf16(_lora(copy.deepcopy(base)), method="lora", autocast_bf16=False)[0] == 0
    from peft import LoraConfig, get_peft_model

    dora = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["gate_proj"], use_dora=True))
    n, why = C.cast_frozen_to_bf16(dora, method="dora")
    assert n == 0 and "DoRA" in why


# ---------------------------------------------------------------------------------------------
# buckets


def test_pad_to_bucket_keeps_the_loss():
    base, _ = tiny_llama()
    batch = _batch(2, T=21)
    padded = C.pad_to_bucket(batch, multiple=16, pad_id=256)
    assert padded["input_ids"].shape == (3, 32) and (padded["labels"][:, 21:] == C.IGNORE_INDEX).all()
    assert (padded["attention_mask"][:, 21:] == 0).all() and (padded["input_ids"][:, 21:] == 256).all()
    with torch.no_grad():
        torch.testing.assert_close(base(**padded).loss, base(**batch).loss, rtol=1e-5, atol=1e-6)
    assert C.pad_to_bucket(padded, multiple=16) is padded
    assert C.bucket_length(1, 64) == 64 and C.bucket_length(128, 64) == 128
    with pytest.raises(ValueError):
        C.bucket_length(3, 0)


# ---------------------------------------------------------------------------------------------
# compile


@pytest.mark.parametrize("scope", ["regional", "model"])
def test_compile_falls_back_to_eager_with_a_reason(scope):
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no compiler here")

    base, _ = tiny_llama()
    model = _lora(copy.deepcopy(base)).train()
    ref = _lora(copy.deepcopy(base)).train()
    logs = []
    prep = C.prepare_model(model, compile=True, bf16_frozen=False, light_loss=False, backend=broken_backend,
                           compile_scope=scope, log=logs.append)
    assert prep.compiled and prep.model is model and prep.compile_scope == scope
    batch = _batch(3)
    torch.testing.assert_close(model(**batch).loss, ref(**batch).loss)
    assert not prep.compiled and "no compiler here" in prep.compile_reason
    assert any("training eagerly" in line for line in logs)
    # every compiled module (each block, for regional) is eager for good
    assert all(getattr(m, "_compiled_call_impl", None) is None for m in model.modules())
    assert prep.to_dict()["compile_reason"] == prep.compile_reason and "eager" in prep.line()


class _CountingBackend:
    """A torch.compile backend that runs the captured graph eagerly and counts the graphs it was given."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def test_repeated_blocks_are_the_outermost_repeated_list_children():
    from benchmarks.runner.regional import repeated_blocks

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)])  # repeated, but inside

    class TwoTowers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vision = torch.nn.ModuleList([Block(), Block(), Block()])
            self.language = torch.nn.ModuleDict({"layers": torch.nn.ModuleList([Block(), Block()])})
            self.misc = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.ReLU()])  # nothing repeats

    names = [n for n, _ in repeated_blocks(TwoTowers())]
    assert names == ["vision.0", "vision.1", "vision.2", "language.layers.0", "language.layers.1"]
    peft_names = [n for n, _ in repeated_blocks(_lora(tiny_llama()[0]))]
    assert peft_names == ["base_model.model.model.layers.0", "base_model.model.model.layers.1"]
    assert repeated_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2))) == []


def test_regional_compile_matches_eager_and_new_buckets_do_not_recompile():
    """Each decoder layer compiled on its own, sequence length dynamic from the start: the loss and gradients
    of eager, and no new graph when the bucketed length changes (a whole-model compile recompiles there).
    Four layers: a graph per layer (the KV cache's per-layer entry once made one) would show."""
    base, _ = tiny_llama(layers=4)
    ref = _lora(copy.deepcopy(base)).train()
    model = _lora(copy.deepcopy(base)).train()
    backend = _CountingBackend()
    prep = C.prepare_model(model, compile=True, bf16_frozen=False, light_loss=True, backend=backend)
    assert (prep.compile_scope, prep.compiled_blocks) == ("regional", 4) and "regional" in prep.line()
    assert prep.to_dict()["compile_scope"] == "regional"
    graphs = []
    for i, T in enumerate((16, 32, 48, 16)):
        batch = _batch(i, B=2, T=T)
        out = model(**batch).loss
        out.backward()
        expected = ref(**batch).loss
        expected.backward()
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        g, g_ref = _lora_grads(model), _lora_grads(ref)
        for k in g:
            torch.testing.assert_close(g[k], g_ref[k], rtol=1e-4, atol=1e-6)
        model.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        graphs.append(backend.graphs)
    assert prep.compiled, prep.compile_reason
    # one graph reused by every layer after the first, one for the first (its input needs no gradient)
    assert graphs == [2, 2, 2, 2], graphs
    with C.eager_mode(model):  # evaluation: no block runs compiled, nothing new is compiled
        assert all(getattr(m, "_compiled_call_impl", None) is None for m in model.modules())
        with torch.no_grad():
            model(**_batch(9, B=3, T=23))
    assert backend.graphs == 2 and sum(m._compiled_call_impl is not None for m in model.modules()) == 4


def test_training_forwards_build_no_kv_cache():
    from benchmarks.runner.regional import drop_training_cache

    model, _ = tiny_llama()
    seen = []
    model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw.get("past_key_values")), with_kwargs=True)
    assert model.config.use_cache and drop_training_cache(model) == 2  # LlamaForCausalLM and LlamaModel
    assert drop_training_cache(model) == 0  # installed once
    batch = _batch(0)
    model(**batch).loss.backward()
    assert seen == [None]
    with torch.no_grad():  # evaluation and generation keep their cache
        model(**batch)
    assert seen[-1] is not None


def test_regional_compile_without_repeated_blocks_compiles_the_whole_model():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU())
    prep = C.prepare_model(model, compile=True, backend=_CountingBackend())
    assert prep.compiled and (prep.compile_scope, prep.compiled_blocks) == ("model", 1)
    assert model._compiled_call_impl is not None and "no repeated blocks" in prep.notes[0]
    with pytest.raises(ValueError, match="compile scope"):
        C.prepare_model(model, compile_scope="layers")


def test_compile_auto_compiles_on_a_gpu_only():
    # The H200 measurement (results/perf/h200/throughput.md, eager-v3 against improved-v3): compiled whole runs won.
    assert C.auto_compile_reason(torch.device("cuda", 0)) == ""
    assert "cpu" in C.auto_compile_reason(torch.device("cpu"))


def test_prepare_model_auto_on_cpu_is_eager_and_flags_validated():
    base, _ = tiny_llama()
    prep = C.prepare_model(_lora(copy.deepcopy(base)), mixed_precision="no")
    assert not prep.compiled and "cpu" in prep.compile_reason
    assert prep.bf16_frozen_params == 0 and "autocast" in prep.bf16_reason
    assert prep.loss == "chunked"
    with pytest.raises(ValueError, match="compile"):
        C.prepare_model(base, compile="yes")


def _nalora_train(model_base, *, compiled: str | None, steps: int = 9, light_loss: bool = False,
                  scope: str = "regional"):
    """Train NA-LoRA (mask refresh every 2 steps, schedule over ``steps``) on fixed batches; the params."""
    from nalora import inject

    torch.manual_seed(0)
    adapted = inject(copy.deepcopy(model_base), "nalora", targets=("gate", "up", "down"), rank=4, alpha=8,
                     method_options={"mask_interval": 2, "warmup_frac": 0.2, "final_frac": 0.6, "rho_final": 0.5})
    opt = adapted.make_optimizer(1e-2, total_steps=steps)
    model = adapted.model.train()
    prep = None
    if compiled:
        prep = C.prepare_model(model, compile=True, bf16_frozen=False, light_loss=light_loss, backend=compiled,
                               compile_scope=scope)
        assert prep.compile_scope == scope
    for step in range(steps):
        loss = model(**_batch(step, B=2, T=16)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if prep is not None:
        assert prep.compiled, prep.compile_reason
    ctrl = adapted.controller
    return ({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
            ctrl.stat_calls, [u.k for u in ctrl.units], ctrl.history())


@pytest.mark.parametrize("scope", ["regional", "model"])
def test_nalora_hooks_work_under_compile(scope):
    """The controller's statistics hooks (added on refresh steps, removed after; inside the compiled layers
    for the regional scope), its gradient mask and its optimiser-step scaling give the same parameters
    compiled as eager. Backend aot_eager: the same Dynamo graph capture and AOT autograd as inductor, without
    the C compiler (the inductor test is below)."""
    base, _ = tiny_llama()
    eager, eager_calls, eager_k, hist = _nalora_train(base, compiled=None)
    comp, comp_calls, comp_k, comp_hist = _nalora_train(base, compiled="aot_eager", scope=scope)
    assert eager_calls == comp_calls > 0  # statistics gathered on exactly the refresh steps
    assert eager_k == comp_k and min(eager_k) < 64  # the mask shrank (d_ff=64)
    assert comp_hist["step"] == hist["step"]
    for k in eager:
        torch.testing.assert_close(comp[k], eager[k], rtol=1e-4, atol=1e-5)


def test_nalora_light_loss_under_compile_matches_eager():
    base, _ = tiny_llama()
    eager, *_ = _nalora_train(base, compiled=None, steps=5)
    comp, *_ = _nalora_train(base, compiled="aot_eager", steps=5, light_loss=True)
    for k in eager:
        torch.testing.assert_close(comp[k], eager[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scope", ["regional", "model"])
def test_nalora_compiled_graphs_bounded_over_many_steps(scope):
    """Compiled NA-LoRA over 36 steps with a refresh every 3 (12 refreshes through warm-up, the cubic decrease
    and the final budget) compiles a fixed number of graphs: one with the statistics hooks, one without (for
    the regional scope each twice: the first layer, whose input needs no gradient, and the others; and the
    bucketed sequence length changes too, as in real runs).
    A value that changes per step and is read in the forward (it once was a refresh counter) is a Dynamo guard
    and recompiled the model on every refresh, minutes each on a GPU, until the recompile limit (8)."""
    from torch._dynamo.utils import counters

    from nalora import inject

    base, _ = tiny_llama(layers=4 if scope == "regional" else 2)  # regional: four layers share the graphs
    steps = 36
    torch.manual_seed(0)
    adapted = inject(copy.deepcopy(base), "nalora", targets=("gate", "up", "down"), rank=4, alpha=8,
                     method_options={"mask_interval": 3, "warmup_frac": 0.2, "final_frac": 0.6})
    opt = adapted.make_optimizer(1e-2, total_steps=steps)
    model = adapted.model.train()
    prep = C.prepare_model(model, compile=True, bf16_frozen=False, light_loss=True, backend="aot_eager",
                           compile_scope=scope)
    counters.clear()
    graphs = []
    for step in range(steps):
        length = 16 if scope == "model" or step < 12 else (32 if step < 24 else 48)
        model(**_batch(step % 2, B=2, T=length)).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        graphs.append(counters["stats"]["unique_graphs"])
    assert prep.compiled, prep.compile_reason
    assert adapted.controller.units[0].k < adapted.controller.units[0].d_ff  # the schedule really moved
    assert adapted.controller.stat_calls == 12 * len(adapted.controller.units)  # counted outside the graph
    assert graphs[-1] == graphs[2] <= (4 if scope == "regional" else 3), graphs  # nothing new after the first cycle


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None,
                    reason="torch.compile's inductor backend needs a C compiler on CPU (GPU figure: results/perf)")
def test_inductor_compile_trains_like_eager():
    """The default backend on CPU: about a minute of compilation on two shared cores."""
    base, _ = tiny_llama()
    eager, *_ = _nalora_train(base, compiled=None, steps=3)
    comp, *_ = _nalora_train(base, compiled="inductor", steps=3)
    for k in eager:
        torch.testing.assert_close(comp[k], eager[k], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# nalora-bench steptime


def _steptime_args(out, **kw):
    import argparse

    from benchmarks.perf import step_time

    p = argparse.ArgumentParser()
    step_time.add_arguments(p)
    argv = ["--model", "tiny-llama", "--methods", "lora,nalora", "--rounds", "9", "--steps", "2", "--warmup", "1",
            "--batch-size", "2", "--seq-len", "16", "--compile-backend", "aot_eager", "--out", str(out)]
    for k, v in kw.items():
        argv += [f"--{k}"] + ([] if v is True else [str(v)])
    return p.parse_args(argv)


@pytest.mark.slow  # compiles three tiny models (aot_eager) and runs HF Trainer nine times: about a minute
def test_steptime_reference_on_cpu(tmp_path):
    import json

    from benchmarks.perf import step_time

    assert step_time.main(_steptime_args(tmp_path, variants="eager,lean,compiled,compiled_model", reference=True)) == 0
    r = json.loads((tmp_path / "steptime.json").read_text())
    names = set(r["candidates"])
    assert {"lora", "nalora", "lora+lean", "nalora+compiled", "peft", "peft+compile", "hf_trainer+peft"} <= names
    for c in r["candidates"].values():
        assert len(c["step_s"]) == 9 and all(s > 0 for s in c["step_s"])
        assert c["step_ms"]["iqr"][0] <= c["step_ms"]["median"] <= c["step_ms"]["iqr"][1]
    assert r["candidates"]["nalora+compiled"]["prepare"]["compiled"] is True
    # the steptime variant "compiled" is what runs use (prepare_model's default scope); the whole model beside it
    assert r["candidates"]["nalora+compiled"]["prepare"]["compile_scope"] == "regional"
    assert r["candidates"]["nalora+compiled_model"]["prepare"]["compile_scope"] == "model"
    assert r["candidates"]["lora+compiled"]["graphs"] > 0 == r["candidates"]["lora"]["graphs"]
    assert all(c["build_s"] > 0 for c in r["candidates"].values())
    ratio = r["ratios"]["nalora+compiled / lora+compiled"]["time"]
    assert ratio["n"] == 9 and ratio["min"] <= ratio["median"] <= ratio["max"]
    assert "hf_trainer+peft / lora+compiled" in r["ratios"]
    md = (tmp_path / "steptime.md").read_text()
    assert "| nalora+compiled |" in md and "IQR" in md
    assert r["timer"] == "perf_counter"


def test_steptime_stack_times_k_lora_runs_per_step(tmp_path):
    """--stack K: K runs stepped together, eager and compiled, with the per-run ratio to one run's step."""
    import json

    from benchmarks.perf import step_time

    args = _steptime_args(tmp_path, methods="lora,nalora", variants="eager,compiled", rounds=3, stack="2,3")
    assert step_time.main(args) == 0
    r = json.loads((tmp_path / "steptime.json").read_text())
    for name, k in (("lora+stack2", 2), ("lora+compiled+stack3", 3), ("nalora+compiled+stack2", 2)):
        c = r["candidates"][name]
        assert c["group"] == "stacked" and c["runs_per_step"] == k and len(c["step_s"]) == 3
        assert c["per_run_step_ms"]["median"] == pytest.approx(c["step_ms"]["median"] / k)
    assert r["candidates"]["lora+compiled+stack3"]["prepare"]["compiled"] is True
    ratio = r["ratios"]["lora+compiled / (lora+compiled+stack3 per run)"]["time"]
    assert ratio["n"] == 3 and ratio["median"] > 0
    assert "nalora / (nalora+stack3 per run)" in r["ratios"]
    assert "3 runs per step" in (tmp_path / "steptime.md").read_text()
    with pytest.raises(ValueError, match="--stack: each K must be >= 2"):
        step_time.main(_steptime_args(tmp_path, stack="1"))


def test_steptime_profile_counts_each_steps_operators(tmp_path):
    """--profile N: N more steps per candidate under torch.profiler. On a CPU only the operator count is there
    (the GPU fields are None); NA-LoRA's step dispatches more operators than LoRA's (its statistics and step
    rescaling run eagerly beside the optimiser)."""
    import json

    from benchmarks.perf import step_time

    assert step_time.main(_steptime_args(tmp_path, variants="eager", rounds=1, profile=3)) == 0
    r = json.loads((tmp_path / "steptime.json").read_text())
    lora, nal = (r["candidates"][m]["profile"] for m in ("lora", "nalora"))
    assert lora["steps"] == 3 and lora["wall_ms"] > 0 and lora["aten_ops"] > 50
    assert (lora["gpu_busy_ms"], lora["gpu_busy_share"], lora["gpu_ops"]) == (None, None, None)
    assert nal["aten_ops"] > lora["aten_ops"]
    top = lora["top_self_cpu"]  # where the host time goes: heaviest first, per step, at most 12
    assert 0 < len(top) <= 12 and top[0]["self_cpu_ms"] >= top[-1]["self_cpu_ms"] > 0
    assert sum(op["self_cpu_ms"] for op in top) <= lora["wall_ms"] and all(op["calls"] > 0 for op in top)
    md = (tmp_path / "steptime.md").read_text()
    assert "Profiled steps (3 per candidate" in md and "| lora | " in md.split("Profiled steps")[1]
    assert f"| lora | `{top[0]['name']}` |" in md.split("most self CPU time")[1]
    with pytest.raises(ValueError, match="--profile must be >= 0"):
        step_time.main(_steptime_args(tmp_path, variants="eager", profile=-1))


def test_time_limit_interrupts_a_stuck_block():
    import time

    from benchmarks.perf import step_time

    t0 = time.perf_counter()
    with pytest.raises(step_time.CandidateTimeout):
        with step_time.time_limit(0.2):
            while True:
                time.sleep(0.01)
    assert time.perf_counter() - t0 < 5
    with step_time.time_limit(0):  # no limit
        time.sleep(0.05)


def test_steptime_records_a_stuck_candidate_and_finishes(tmp_path, monkeypatch):
    """One candidate that hangs in its rounds is recorded as timed out; the command ends with the others."""
    import json
    import time

    from benchmarks.perf import step_time

    def fake(method, variant, *a, **kw):
        def build():
            def run(warmup, steps, timer):
                timer.start()
                while method == "nalora" and warmup > 1:  # the build's own step passes, the rounds hang
                    time.sleep(0.01)
                timer.stop()
            return run
        return step_time.Candidate(name=method, group="runner", method=method, variant=variant, build=build)

    monkeypatch.setattr(step_time, "_runner_candidate", fake)
    args = _steptime_args(tmp_path, variants="eager", rounds=3, warmup=2, **{"candidate-timeout": 0.3})
    assert step_time.main(args) == 0
    r = json.loads((tmp_path / "steptime.json").read_text())
    assert r["candidates"]["nalora"]["timed_out"] == "round 0" and r["candidates"]["nalora"]["step_s"] == []
    assert len(r["candidates"]["lora"]["step_s"]) == 3 and "timed_out" not in r["candidates"]["lora"]
    assert r["candidates"]["lora"]["build_s"] >= 0 and r["candidates"]["lora"]["graphs"] == 0
    assert r["ratios"] == {} and r["rounds"] == 3
    assert "| nalora | timed out (round 0) |" in (tmp_path / "steptime.md").read_text()


def test_steptime_rejects_bad_input(tmp_path):
    from benchmarks.perf import step_time

    with pytest.raises(ValueError, match="--variants"):
        step_time.main(_steptime_args(tmp_path, variants="fast"))
    with pytest.raises(ValueError, match="unknown method"):
        step_time.main(_steptime_args(tmp_path, methods="nope"))
    with pytest.raises(ValueError, match="--candidate-timeout"):
        step_time.main(_steptime_args(tmp_path, **{"candidate-timeout": -1}))


def test_spread_and_paired_ratios():
    from benchmarks.perf.step_time import Candidate, _ratios, spread

    s = spread([5.0, 1.0, 3.0, 2.0, 4.0])
    assert s["median"] == 3.0 and s["iqr"] == [2.0, 4.0] and (s["min"], s["max"]) == (1.0, 5.0)
    a = Candidate("lora", "runner", "lora", "eager", build=lambda: None, step_s=[1.0, 2.0, 4.0])
    b = Candidate("nalora", "runner", "nalora", "eager", build=lambda: None, step_s=[1.1, 2.2, 4.4])
    r = _ratios({"lora": a, "nalora": b})
    # paired per round: drift common to both (here a factor of 4 across rounds) cancels
    assert r["nalora / lora"]["time"]["max"] - r["nalora / lora"]["time"]["min"] < 1e-12


def test_step_options_from_config_and_environment():
    assert C.step_options({}, {}) == {"compile": "auto", "bf16_frozen": "auto", "light_loss": "auto",
                                      "compile_scope": "regional", "backend": "inductor", "mode": None,
                                      "generation_cache": "auto"}
    assert C.step_options({"compile": False}, {"NALORA_LIGHT_LOSS": "0", "NALORA_COMPILE_SCOPE": "model",
                                               "NALORA_COMPILE_BACKEND": "aot_eager"}) == \
        {"compile": False, "bf16_frozen": "auto", "light_loss": False, "compile_scope": "model", "backend": "aot_eager",
         "mode": None, "generation_cache": "auto"}
    assert C.step_options({}, {"NALORA_COMPILE_MODE": "max-autotune-no-cudagraphs"})["mode"] == "max-autotune-no-cudagraphs"
    assert C.step_options({}, {"NALORA_COMPILE_MODE": "reduce-overhead", "NALORA_COMPILE_SCOPE": "model"})["mode"] == \
        "reduce-overhead"
    with pytest.raises(ValueError, match="needs the inductor backend"):
        C.step_options({}, {"NALORA_COMPILE_MODE": "max-autotune-no-cudagraphs", "NALORA_COMPILE_BACKEND": "aot_eager"})
    with pytest.raises(ValueError, match="uses CUDA graphs, which crashed the process"):  # CUDA graphs by blocks: a segfault
        C.step_options({}, {"NALORA_COMPILE_MODE": "reduce-overhead"})
    line = C.Prepared(model=None, compiled=True, compile_scope="regional", compiled_blocks=2,
                      compile_mode="reduce-overhead").line()
    assert "compiled (regional, mode reduce-overhead, 2 modules)" in line
    with pytest.raises(ValueError, match="NALORA_COMPILE_MODE"):
        C.step_options({}, {"NALORA_COMPILE_MODE": "fast"})
    with pytest.raises(ValueError, match="NALORA_COMPILE_SCOPE"):
        C.step_options({}, {"NALORA_COMPILE_SCOPE": "layers"})
    eager = C.step_options({"compile": True}, {"NALORA_EAGER": "1"})
    assert {k: v for k, v in eager.items() if k not in ("compile_scope", "backend", "mode")} == \
        {**dict.fromkeys(("compile", "bf16_frozen", "light_loss"), False), "generation_cache": "dynamic"}
    with pytest.raises(ValueError, match="NALORA_COMPILE"):
        C.step_options({}, {"NALORA_COMPILE": "maybe"})
    with pytest.raises(ValueError, match="training.bf16_frozen"):
        C.step_options({"bf16_frozen": "yes"}, {})


# ---------------------------------------------------------------------------------------------
# whole-run throughput summary


def test_throughput_summary_of_two_result_folders(tmp_path):
    import json

    from test_runner import BASE_SUITE, run, write_suite

    from benchmarks.perf import throughput

    suite = write_suite(tmp_path / "s.yaml", BASE_SUITE.replace("lr_grid: [1.0e-3]", "lr_grid: [1.0e-3, 3.0e-3]").replace(
        "lr_bounds: [1.0e-3, 1.0e-3]", "lr_bounds: [1.0e-3, 3.0e-3]"))
    for name, wall in (("eager", 40.0), ("improved", 10.0)):
        assert run(suite, tmp_path / name) == 0
        (tmp_path / name / "wall.json").write_text(json.dumps({"wall_s": wall, "gpus": 1, "device": "cpu"}))
    assert throughput.main([f"eager={tmp_path / 'eager'}", f"improved={tmp_path / 'improved'}",
                            "--out", str(tmp_path / "tp.json")]) == 0
    rows = json.loads((tmp_path / "tp.json").read_text())
    assert rows["eager"]["runs"] == 2 and rows["eager"]["runs_per_gpu_hour"] == pytest.approx(2 / (40 / 3600))
    assert rows["improved"]["runs_per_gpu_hour"] / rows["eager"]["runs_per_gpu_hour"] == pytest.approx(4.0)
    assert 0 < rows["eager"]["eval_share"] < 1
    assert (rows["eager"]["compiled_runs"], rows["eager"]["graphs_kept_runs"]) == (0, 0)  # compile: auto on a CPU
    assert "| 0 (0) |" in (tmp_path / "tp.md").read_text()
    assert "| improved | cpu | 1 | off | 2 | 10.0 |" in (tmp_path / "tp.md").read_text()
    # eager runs compile nothing: every run is the steady state
    assert rows["eager"]["runs_no_compile"] == 2
    assert rows["eager"]["median_train_s_no_compile"] == rows["eager"]["median_train_s"]
    # each record names the process that ran it and how many runs that process had started before
    import os

    from benchmarks.runner.store import ResultStore

    workers = sorted((r["perf"]["worker"]["earlier_runs"], r["perf"]["worker"]["pid"])
                     for r in ResultStore(tmp_path / "eager", "main").records())
    assert workers[1][0] == workers[0][0] + 1 and {w[1] for w in workers} == {os.getpid()}
    with pytest.raises(ValueError, match="wall.json"):
        throughput.summarise(tmp_path)


def test_compile_check_matches_eager_with_bounded_graphs():
    """The pre-flight check (benchmarks/perf/compile_check.py) on a 4-layer model: the regional compiled step
    trains exactly as eager over changing lengths and a midway evaluation, with a graph count independent of
    the number of layers and lengths."""
    from benchmarks.perf.compile_check import check

    base, _ = tiny_llama(layers=4)
    for method in ("lora", "nalora"):
        r = check("tiny-llama", method, [16, 32, 48, 64], steps=8, base=base)
        assert r["max_abs_loss_diff"] == 0.0 and len(r["compiled_losses"]) == 8
        assert r["step"]["compile_scope"] == "regional" and r["step"]["compiled_blocks"] == 4
        assert 1 <= r["graphs"] <= 6, r["graphs"]


def test_a_workers_next_run_keeps_the_compiled_graphs():
    """A pool worker trains run after run in one process: the next run of the same model and method, on a fresh
    model object, compiles no graph (dynamo's guards pass) and trains exactly as the first and as eager; a run
    of another method (other adapted modules) resets dynamo and compiles its own."""
    from torch._dynamo.utils import counters

    base, _ = tiny_llama(layers=3)
    backend = _CountingBackend()

    models = []  # weak references: kept graphs must not keep earlier runs' models (and their GPU memory) alive

    def run(targets=("gate_proj", "up_proj", "down_proj"), compile=True):
        model = _lora(copy.deepcopy(base), targets).train()
        models.append(weakref.ref(model))
        prep = C.prepare_model(model, compile=compile, bf16_frozen=False, light_loss=True, backend=backend)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-1)
        losses = []
        for i, T in enumerate((16, 32, 16, 48)):
            loss = model(**_batch(i, B=2, T=T)).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        assert prep.compiled or not compile, prep.compile_reason
        return prep, losses

    first, l1 = run()
    built = backend.graphs
    second, l2 = run()
    assert not first.graphs_kept and second.graphs_kept and "graphs of an earlier run kept" in second.line()
    del first
    gc.collect()
    assert models[0]() is None  # the first run's model is gone although its graphs serve the second
    assert backend.graphs == built > 0 and l2 == l1
    _, eager = run(compile=False)
    torch.testing.assert_close(torch.tensor(l1), torch.tensor(eager), rtol=1e-5, atol=1e-6)
    other, _ = run(targets=("gate_proj", "up_proj"))
    assert not other.graphs_kept and backend.graphs > built

    # NA-LoRA's statistics hooks (installed for good under compile, nalora::tap) do not stop its second run keeping
    # the first run's graphs
    counters.clear()
    p1, *_ = _nalora_train(base, compiled="aot_eager")
    n1 = counters["stats"]["unique_graphs"]
    p2, *_ = _nalora_train(base, compiled="aot_eager")
    assert counters["stats"]["unique_graphs"] == n1 > 0
    for k in p1:
        assert torch.equal(p1[k], p2[k]), k


def test_nalora_compiled_step_builds_no_more_graphs_than_lora():
    """Regional compile, refresh every 2 steps, two micro-batches per step: NA-LoRA compiles the graphs of plain
    LoRA (one for the first layer, whose input needs no gradient, one for the others). Its statistics hooks stay
    installed under compile and reach the eager statistics through one opaque op each (nalora::tap), so
    neither hooks that came and went on refresh steps nor statistics state read in the graph (``u.acc`` under
    gradient accumulation) are guards any more: these once built 4 and 6 graphs. Trains exactly as eager."""
    from torch._dynamo.utils import counters

    from nalora import inject

    base, _ = tiny_llama(layers=3)
    steps, ga = 5, 2

    def train(method, compiled):
        C.forget_compiled()
        torch.manual_seed(0)
        if method == "lora":
            model = _lora(copy.deepcopy(base)).train()
            opt, ctrl = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2), None
        else:
            adapted = inject(copy.deepcopy(base), "nalora", targets=("gate", "up", "down"), rank=4, alpha=8,
                             method_options={"mask_interval": 2, "warmup_frac": 0.2, "final_frac": 0.6})
            opt, model, ctrl = adapted.make_optimizer(1e-2, total_steps=steps), adapted.model.train(), adapted.controller
        if compiled:
            prep = C.prepare_model(model, compile=True, bf16_frozen=False, light_loss=True, backend="aot_eager")
        counters.clear()
        for step in range(steps):
            for micro in range(ga):
                (model(**_batch(step * ga + micro, B=2, T=16)).loss / ga).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if compiled:
            assert prep.compiled, prep.compile_reason
        params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        return params, counters["stats"]["unique_graphs"], ctrl

    _, lora_graphs, _ = train("lora", compiled=True)
    eager, _, eager_ctrl = train("nalora", compiled=False)
    comp, nalora_graphs, ctrl = train("nalora", compiled=True)
    assert nalora_graphs <= lora_graphs == 2, (nalora_graphs, lora_graphs)
    assert ctrl.stat_calls == eager_ctrl.stat_calls == 3 * ga * len(ctrl.units)  # refreshes at steps 0, 2, 4
    assert [u.k for u in ctrl.units] == [u.k for u in eager_ctrl.units] and ctrl.units[0].k < ctrl.units[0].d_ff
    for a, b in zip(ctrl.units, eager_ctrl.units):
        torch.testing.assert_close(a.importance, b.importance, rtol=1e-5, atol=1e-6)
    for k in eager:
        torch.testing.assert_close(comp[k], eager[k], rtol=1e-4, atol=1e-5)


def test_whole_compiled_runs_keep_their_graphs_through_evaluation_and_diagnostics(tmp_path, monkeypatch):
    """Two whole runs (train, periodic and final evaluation, the misalignment diagnostic) of one model and method
    in one process, compiled by blocks: every forward outside training runs eagerly, so the first run builds the
    training graphs only (not one per layer: a forward with a KV cache guards on each layer's cache entry) and the
    second builds none. On an H200 the diagnostic's forwards sent every run over dynamo's recompile limit, and
    the next run reset dynamo and compiled again."""
    from test_runner import BASE_SUITE, run, runs, write_suite
    from torch._dynamo.utils import counters

    monkeypatch.setenv("NALORA_COMPILE", "1")
    monkeypatch.setenv("NALORA_COMPILE_BACKEND", "aot_eager")
    monkeypatch.setenv("NALORA_BF16_FROZEN", "0")
    suite = write_suite(tmp_path / "s.yaml", BASE_SUITE.replace("seeds: [0]", "seeds: [0, 1]").replace(
        "diag_batches: 0", "diag_batches: 2"))
    C.forget_compiled()
    counters.clear()
    try:
        assert run(suite, tmp_path / "r") == 0
        graphs = counters["stats"]["unique_graphs"]
    finally:
        C.forget_compiled()
    recs = sorted(runs(tmp_path / "r").values(), key=lambda r: r["config"]["seed"])
    assert [r["status"] for r in recs] == ["ok", "ok"]
    assert all(r["perf"]["step"]["compiled"] and r["diagnostics"]["selection_misalignment"] for r in recs)
    assert [r["perf"]["step"]["graphs_kept"] for r in recs] == [False, True]
    assert 1 <= graphs <= 2, graphs  # the first layer's graph (its input needs no gradient) and the others'
    assert [r["perf"]["step"]["graphs_built"] for r in recs] == [graphs, 0]


def test_throughput_steady_state_is_the_runs_that_compiled_nothing():
    from benchmarks.perf.throughput import compiled_nothing

    eager = {"step": {"compiled": False}}
    kept = {"step": {"compiled": True, "graphs_kept": True, "graphs_built": 0}}
    topped_up = {"step": {"compiled": True, "graphs_kept": True, "graphs_built": 2}}  # kept, but built more
    cold = {"step": {"compiled": True, "graphs_kept": False, "graphs_built": 4}}
    older = {"step": {"compiled": True, "graphs_kept": True}}  # before graphs_built: unknown, counted as compiling
    assert compiled_nothing([eager, kept, topped_up, cold, older, {}]) == [eager, kept, {}]


def test_throughput_start_cost_is_each_workers_first_run():
    from benchmarks.perf.throughput import workers_first_runs

    first = {"worker": {"pid": 1, "earlier_runs": 0}, "train_s": 110.0}
    later = {"worker": {"pid": 1, "earlier_runs": 1}, "train_s": 30.0}
    other_first = {"worker": {"pid": 2, "earlier_runs": 0}, "train_s": 90.0}
    older = {"train_s": 50.0}  # a record from before perf.worker: unknown
    assert workers_first_runs([first, later, other_first, older]) == [first, other_first]


def test_throughput_after_the_first_wave_leaves_out_the_start():
    """Four workers: the first four finishes (model loads, a cold compile) are the start; the rate is the runs
    after them over the time from the fourth finish to the last."""
    from benchmarks.perf.throughput import after_first_wave

    def rec(second: int) -> dict:
        return {"provenance": {"finished_at": f"2026-12-01T05:00:{second:02d}+00:00"}}

    recs = [rec(s) for s in (40, 41, 42, 44, 50, 52, 56, 59, 59)]  # the first wave ends at :44
    assert after_first_wave(recs, 4) == pytest.approx(5 / (15 / 3600))
    assert after_first_wave(recs, 2, gpus=2) == after_first_wave(recs, 4)  # workers per GPU x GPUs
    assert after_first_wave(recs, None) is None and after_first_wave(recs[:4], 4) is None


def test_throughput_counts_a_stack_as_one_work_item_and_its_runs_by_their_share():
    """``run --stack``: a stack's runs share its wall and training time (each run's share), and the first wave is
    the first stacks to finish, not their first runs."""
    from benchmarks.perf.throughput import after_first_wave, run_shares

    def rec(pid: int, k: int, wall: float, second: int) -> dict:
        return {"perf": {"worker": {"pid": pid, "earlier_runs": 0}, "stacked": {"runs": k, "index": 0},
                         "wall_s": wall, "train_s": 80.0},
                "provenance": {"finished_at": f"2026-12-01T05:00:{second:02d}+00:00"}}

    a = [rec(1, 2, w, s) for w, s in ((90.0, 10), (100.0, 12))]  # pid 1's stack of two ends at :12
    b = [rec(2, 4, w, s) for w, s in ((150.0, 20), (160.0, 30), (170.0, 40), (180.0, 50))]
    shares = run_shares([r["perf"] for r in a + b])
    assert [p["wall_s"] for p in shares] == [50.0, 50.0, 45.0, 45.0, 45.0, 45.0]  # the stack's last wall / its runs
    assert [p["train_s"] for p in shares] == [40.0] * 2 + [20.0] * 4
    assert shares[0]["stack_wall_s"] == 90.0 and "stacked" not in run_shares([{"wall_s": 3.0}])[0]
    lone = [{"stacked": {"runs": 2}, "wall_s": w, "train_s": 8.0} for w in (10.0, 30.0)]  # no worker: each its own
    assert [p["wall_s"] for p in run_shares(lone)] == [5.0, 15.0]
    # one worker: the first item is pid 1's stack (ends :12), then pid 2's four runs over 38 s
    assert after_first_wave(a + b, 1) == pytest.approx(4 / (38 / 3600))
    assert after_first_wave(a + b, 2) is None  # both stacks are the first wave


# ---------------------------------------------------------------------------------------------
# generation cache


def test_generation_cache_follows_the_step_and_its_flag():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    compiled, eager = C.Prepared(model=None, compiled=True), C.Prepared(model=None)
    assert C._generation_cache("auto", compiled, cuda) == \
        ("dynamic", "auto: static decoding changes predictions (84% the same as dynamic, gsm8k, H100)")
    assert C._generation_cache("auto", eager, cuda) == ("dynamic", "auto: the step runs eagerly")
    assert C._generation_cache("auto", compiled, cpu) == ("dynamic", "auto: cpu (static on CUDA only)")
    assert C._generation_cache("static", eager, cpu) == ("static", "")
    assert C._generation_cache("dynamic", compiled, cuda) == ("dynamic", "off (flag)")
    assert C.step_options({}, {"NALORA_GENERATION_CACHE": "static"})["generation_cache"] == "static"
    assert C.step_options({}, {"NALORA_GENERATION_CACHE": "static", "NALORA_EAGER": "1"})["generation_cache"] == "dynamic"
    with pytest.raises(ValueError, match="NALORA_GENERATION_CACHE='paged': expected dynamic, static, static-eager or auto"):
        C.step_options({}, {"NALORA_GENERATION_CACHE": "paged"})


def test_a_generation_run_decodes_with_the_static_cache_and_records_it(tmp_path, monkeypatch):
    """Whole runs of the offline gsm8k fixture: the static cache (asked for by flag) predicts exactly what the dynamic cache does, and the record says which decoded; a static cache
    that fails mid-run decodes dynamically from there, with the same predictions, and the record says why."""
    from pathlib import Path

    from test_runner import BASE_SUITE, load, write_suite

    import tasks.llm.lm as lm
    from benchmarks.runner.grid import expand
    from benchmarks.runner.train import train_run
    from tasks.registry import get_task, load_tasks

    load_tasks()
    task = get_task("gsm8k", data_dir=Path(__file__).resolve().parent / "fixtures" / "tasks" / "gsm8k")
    suite = load(write_suite(tmp_path / "s.yaml", BASE_SUITE.replace("eval_limit: 8, test_limit: 8",
                                                                     "eval_limit: 4, test_limit: 4")))
    (spec,) = expand(suite, lambda n: ("llm", "tiny-llama"))
    real = lm.greedy_generate
    calls: list[str] = []

    def counted(*a, cache="dynamic", **kw):
        calls.append(cache)
        if cache == "static" and os.environ.get("FAIL_STATIC") and len(calls) > 1:
            raise RuntimeError("graph capture failed")
        return real(*a, cache=cache, **kw)

    monkeypatch.setattr(lm, "greedy_generate", counted)
    out = {}
    for label, cache, fail in (("dynamic", "dynamic", ""), ("static", "static", ""), ("fallback", "static", "1")):
        monkeypatch.setenv("NALORA_GENERATION_CACHE", cache)
        monkeypatch.setenv("FAIL_STATIC", fail)
        calls.clear()
        with pytest.warns(UserWarning, match="static cache failed") if fail else contextlib.nullcontext():
            out[label] = train_run(spec.config, task, progress=False)
        out[label]["calls"] = list(calls)
    step = {k: (r["perf"]["step"]["generation_cache"], r["perf"]["step"]["generation_cache_reason"]) for k, r in out.items()}
    assert step == {"dynamic": ("dynamic", "off (flag)"), "static": ("static", ""),
                    "fallback": ("dynamic", "static cache failed, dynamic from here: RuntimeError: graph capture failed")}
    # a periodic evaluation, then validation and test: the fallback's second call failed, the rest decoded dynamically
    assert out["static"]["calls"] == ["static"] * 3
    assert out["fallback"]["calls"] == ["static", "static", "dynamic", "dynamic"]
    for k in ("static", "fallback"):
        assert out[k]["metrics"] == out["dynamic"]["metrics"] and out[k]["per_example"] == out["dynamic"]["per_example"]
        assert out[k]["history"]["validation"] == out["dynamic"]["history"]["validation"]
