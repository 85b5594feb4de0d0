"""Several LoRA runs stepped together (benchmarks/runner/stacked.py): each run computes what it computes alone."""

from __future__ import annotations

import pytest
import torch

from tests.test_runner import tiny_llama


def test_stack_runs_bad_input_is_one_line():
    from benchmarks.runner.stacked import stack_runs
    from nalora import inject

    runs = [inject(tiny_llama(), m, targets=("gate", "up"), rank=2) for m in ("lora", "dora")]
    with pytest.raises(ValueError, match="at least 2 runs"):
        stack_runs(runs[:1])
    with pytest.raises(ValueError, match="not a plain unmerged LoRA layer"):
        stack_runs(runs)


def _train(model, batches, opts, scheds):
    losses = []
    for ids, mask, labels in batches:
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        losses.append(loss.detach())
        for opt, sched in zip(opts, scheds):
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
    return losses


@pytest.mark.parametrize("method", ["lora", "nalora"])
def test_stack_runs_trains_each_run_as_it_trains_alone(method):
    """Two runs (seeds 0 and 1, different lrs) trained 8 steps through ``stack_runs`` end with the adapters, and for
    NA-LoRA the masks and statistics, that each gets when trained alone: NA-LoRA's statistics hooks see their own
    rows, its attention-mask capture its own mask, its gradient and step hooks its own parameters."""
    from transformers import get_cosine_schedule_with_warmup

    from benchmarks.runner.compiled import install_light_loss
    from benchmarks.runner.stacked import shared_copy, stack_runs, stacked_losses
    from nalora import inject

    base = tiny_llama().double().eval()  # float64: Adam's normalised steps amplify rounding in tiny gradients
    opts = {"mask_interval": 2, "warmup_frac": 0.0, "final_frac": 0.5, "rho_final": 0.25} if method == "nalora" else {}
    steps, lrs = 8, [1e-2, 3e-2]

    def runs():
        out = []
        for seed, lr in zip((0, 1), lrs):
            torch.manual_seed(seed)
            a = inject(shared_copy(base), method, targets=("gate", "up", "down"), rank=4, alpha=8,
                       method_options=dict(opts))
            opt = a.make_optimizer(lr, 0.01, total_steps=steps)
            out.append((a, opt, get_cosine_schedule_with_warmup(opt, 1, steps)))
        return out

    g = torch.Generator().manual_seed(3)
    masks = [torch.ones(2, 8, dtype=torch.long) for _ in range(2)]
    masks[0][1, -3:] = 0  # padded rows, different per run: NA-LoRA weights its statistics by each run's own mask
    masks[1][0, -1:] = 0

    def labelled(ids, m):  # loss on the unpadded tokens: the runs' token counts differ (13 and 15 per batch)
        return ids, m, ids.masked_fill(m == 0, -100)

    data = [[labelled(torch.randint(0, 32, (2, 8), generator=g), m) for _ in range(steps)] for m in masks]
    alone = runs()
    for a, _, _ in alone:  # the runner's loss (chunked over the vocabulary), as the stacked model's
        assert install_light_loss(a.model)[0] == "chunked"
    losses = [_train(a.model.train(), batches, [opt], [sched]) for (a, opt, sched), batches in zip(alone, data)]
    together = runs()
    stacked = stack_runs([a for a, _, _ in together]).train()
    per_run = []
    for step in zip(*data):
        _train(stacked, [tuple(torch.cat(x) for x in zip(*step))], [o for _, o, _ in together],
               [s for _, _, s in together])
        per_run.append(stacked_losses(stacked))
    expected = torch.stack([torch.stack(x) for x in losses]).T.double()
    torch.testing.assert_close(torch.stack(per_run).double(), expected, rtol=1e-6, atol=0)
    for (a1, _, _), (a2, _, _) in zip(alone, together):
        p1 = {n: p for n, p in a1.model.named_parameters() if p.requires_grad}
        p2 = {n: p for n, p in a2.model.named_parameters() if p.requires_grad}
        assert p1.keys() == p2.keys() and len(p1) == 12
        for n in p1:
            torch.testing.assert_close(p2[n], p1[n], rtol=1e-7, atol=1e-10)
        if method == "nalora":
            u1, u2 = a1.controller.units, a2.controller.units
            assert all(not bool(u.keep.all()) for u in u1)  # the mask has narrowed: refreshes happened
            for x, y in zip(u1, u2):
                assert torch.equal(x.keep, y.keep)
                torch.testing.assert_close(y.importance, x.importance, rtol=1e-5, atol=1e-8)
    assert not torch.equal(*(dict(a.model.named_parameters())["base_model.model.model.layers.0.mlp.gate_proj.lora_B.default.weight"]
                             for a, _, _ in together))  # the two runs did differ
