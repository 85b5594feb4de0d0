"""Several LoRA runs stepped together (benchmarks/runner/stacked.py): each run computes what it computes alone."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.test_runner import tiny_llama


def _peft_run(base, a_b: dict[str, tuple[torch.Tensor, torch.Tensor]]):
    """``base`` with plain peft LoRA (gate, up, down; rank 4, alpha 8) whose A and B are set from ``a_b``."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for path, (a, b) in a_b.items():
            layer = model.base_model.model.get_submodule(path)
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
    return model


def test_stacked_runs_get_the_gradients_and_steps_each_run_gets_alone():
    """Three runs with different adapters and lrs, each on its own rows: after two stacked AdamW steps (clipped per
    run), every run's adapters equal those of the same run trained alone through peft. Fails if rows leak between
    runs, if the loss weights runs unequally, or if one run's clip or lr reaches another."""
    from benchmarks.runner.stacked import clip_per_run, run_param_groups, stack_lora

    base = tiny_llama().double().eval()  # float64: Adam's normalised steps amplify rounding in tiny gradients
    k, lrs = 3, [1e-2, 3e-3, 3e-2]
    stacked = copy.deepcopy(base)
    layers = stack_lora(stacked, k, rank=4, alpha=8)
    paths = [n for n, m in stacked.named_modules() if m in layers]
    assert len(layers) == 6 and all(p.endswith(("gate_proj", "up_proj", "down_proj")) for p in paths)
    torch.manual_seed(5)
    with torch.no_grad():  # B nonzero, so that A gets gradients too
        for layer in layers:
            for b in layer.lora_B:
                b.normal_(0, 0.3)
    singles = [_peft_run(base, {p: (s.lora_A[i].detach(), s.lora_B[i].detach()) for p, s in zip(paths, layers)})
               for i in range(k)]
    opt = torch.optim.AdamW(run_param_groups(layers, lrs), weight_decay=0.01)
    single_opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
                   for m, lr in zip(singles, lrs)]
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        rows = [torch.randint(0, 32, (2, 8), generator=g) for _ in range(k)]
        ids = torch.cat(rows)
        # equal token counts per run: the mean over all rows times k is the sum of the runs' own mean losses
        (stacked(input_ids=ids, labels=ids).loss * k).backward()
        norms = clip_per_run(opt, 0.05)
        opt.step()
        opt.zero_grad()
        for m, o, x in zip(singles, single_opts, rows):
            m(input_ids=x, labels=x).loss.backward()
            single_norm = torch.nn.utils.clip_grad_norm_([p for p in m.parameters() if p.requires_grad], 0.05)
            o.step()
            o.zero_grad()
            assert single_norm > 0.05  # the clip acts, so per-run clipping is tested
        assert norms.shape == (k,)
    for i, m in enumerate(singles):
        for p, layer in zip(paths, layers):
            peft_layer = m.base_model.model.get_submodule(p)
            torch.testing.assert_close(layer.lora_A[i], peft_layer.lora_A["default"].weight, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(layer.lora_B[i], peft_layer.lora_B["default"].weight, rtol=1e-9, atol=1e-12)


def test_stack_lora_bad_input_is_one_line():
    from benchmarks.runner.stacked import StackedLoRALinear, stack_lora

    with pytest.raises(ValueError, match="match no gated FFN"):
        stack_lora(torch.nn.Sequential(torch.nn.Linear(4, 4)), 2)
    layer = StackedLoRALinear(torch.nn.Linear(4, 4), 3, 2, 4)
    with pytest.raises(ValueError, match="5 rows do not split into 3 runs"):
        layer(torch.zeros(5, 4))
