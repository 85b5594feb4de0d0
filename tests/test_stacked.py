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


SUITE = """\
tasks: [fake]
methods: {METHOD: {}}
seeds: [0, 1]
lr_grid: [1.0e-3, 3.0e-3]
lr_bounds: [1.0e-3, 3.0e-3]
adapter: {targets: [gate, up], towers: [language], rank: 2, alpha: 4, dropout: 0.0}
training: {steps: 4, batch_size: 4, eval_every: 2, eval_limit: 8, test_limit: 8, log_every: 1, diag_batches: 0}
"""


def _specs(tmp_path, method):
    from benchmarks.runner.grid import expand
    from tests.test_runner import load, write_suite

    suite = load(write_suite(tmp_path / "s.yaml", SUITE.replace("METHOD", method)))
    return expand(suite, lambda n: ("llm", "tiny-llama"))


@pytest.mark.parametrize("method", ["lora", "nalora"])
def test_train_stacked_records_what_each_run_records_alone(tmp_path, method):
    """Runs of different seeds and lrs trained by ``train_stacked`` get the results ``train_run`` gives each: the
    same train losses, learning-rate schedule, curve and final metrics, NA-LoRA's mask history; perf says stacked."""
    from benchmarks.runner.train import stack_key, train_run, train_stacked
    from tests.test_runner import FakeTask

    specs = _specs(tmp_path, method)
    assert len(specs) == 4 and len({stack_key(s.config) for s in specs}) == 1
    picked = [specs[0].config, specs[3].config]  # seed and lr both differ
    assert (picked[0]["seed"], picked[0]["lr"]) != (picked[1]["seed"], picked[1]["lr"])
    together = train_stacked(picked, FakeTask(), progress=False)
    for config, got in zip(picked, together):
        alone = train_run(config, FakeTask(), progress=False)
        assert isinstance(got, dict) and got["status"] == alone["status"]
        assert got["perf"]["stacked"]["runs"] == 2
        for key in ("train_loss", "lr"):
            steps = [s for s, _ in alone["history"][key]]
            assert [s for s, _ in got["history"][key]] == steps == [1, 2, 3, 4]
            assert [v for _, v in got["history"][key]] == pytest.approx([v for _, v in alone["history"][key]], rel=1e-5)
        assert [s for s, _ in got["history"]["validation"]] == [2, 4]
        assert got["metrics"] == alone["metrics"]
        if method == "nalora":
            assert got["nalora"]["history"].keys() == alone["nalora"]["history"].keys()
    assert together[0]["history"]["train_loss"] != together[1]["history"]["train_loss"]


def test_train_stacked_refuses_runs_that_differ_in_more_than_seed_and_lr(tmp_path):
    from benchmarks.runner.train import train_stacked
    from tests.test_runner import FakeTask

    a = _specs(tmp_path, "lora")[0].config
    b = {**a, "training": {**a["training"], "steps": 5}}
    with pytest.raises(ValueError, match="differ only in seed and lr"):
        train_stacked([a, b], FakeTask(), progress=False)


def test_train_stacked_reports_each_diverged_run(tmp_path):
    from benchmarks.runner.train import Diverged, train_stacked
    from tests.test_runner import NanTask

    specs = _specs(tmp_path, "lora")
    out = train_stacked([specs[0].config, specs[1].config], NanTask(), progress=False)
    assert all(isinstance(e, Diverged) and "non-finite gradient" in str(e) for e in out)


@pytest.mark.parametrize("workers", [0, 1])
def test_run_stack_records_every_run_and_falls_back_when_runs_cannot_stack(tmp_path, workers):
    """``run --stack 4``: a cell's four runs (two seeds x two lrs) train as one stack, each with its own ok record
    that says so; in a worker process too. DoRA's runs cannot stack: they run one by one, recorded as usual. A
    second invocation finds everything done."""
    from tests.test_runner import run, runs, write_suite

    suite = write_suite(tmp_path / "s.yaml", SUITE.replace("METHOD", "lora"))
    assert run(suite, tmp_path / "stacked", injector=None, stack=4, workers=workers) == 0
    recs = runs(tmp_path / "stacked")
    assert len(recs) == 4 and {r["status"] for r in recs.values()} == {"ok"}
    assert [r["perf"]["stacked"]["runs"] for r in recs.values()] == [4] * 4
    assert sorted(r["perf"]["stacked"]["index"] for r in recs.values()) == [0, 1, 2, 3]
    assert all(r["perf"]["peak_gpu_mem_mib"] is None for r in recs.values())  # a stack's peak is no run's
    # the start of the stack: building its runs, then its first step (a compile where the step compiles)
    assert all(0 < r["perf"]["setup_s"] and 0 < r["perf"]["first_step_s"] <= r["perf"]["train_s"] for r in recs.values())
    assert run(suite, tmp_path / "stacked", injector=None, stack=4, workers=workers) == 0
    assert runs(tmp_path / "stacked").keys() == recs.keys()
    if workers == 0:
        dora = write_suite(tmp_path / "d.yaml", SUITE.replace("METHOD", "dora"))  # DoRA's layers do not stack
        assert run(dora, tmp_path / "fallback", injector=None, stack=4) == 0
        alone = runs(tmp_path / "fallback")
        assert len(alone) == 4 and {r["status"] for r in alone.values()} == {"ok"}
        assert all("stacked" not in r["perf"] for r in alone.values())


def test_group_stacks_keeps_cells_apart():
    from benchmarks.runner.grid import RunSpec, StackSpec, group_stacks

    def spec(method, seed, lr):
        return RunSpec({"model": "m", "task": "t", "method": method, "seed": seed, "lr": lr})

    specs = [spec("lora", s, lr) for s in (0, 1) for lr in (1e-3, 3e-3)] + [spec("dora", 0, 1e-3)]
    out = group_stacks(specs, 3)  # four runs of a cell, at most three a stack: two pairs
    assert [type(x) for x in out] == [StackSpec, StackSpec, RunSpec]
    assert [[s.run_id for s in x.specs] for x in out[:2]] == [[s.run_id for s in specs[:2]],
                                                                 [s.run_id for s in specs[2:4]]]
    assert out[2] is specs[4]
    assert group_stacks(specs, 1) == specs


def test_budgets_count_a_stack_as_its_runs(tmp_path):
    """A stacked record's time and memory are its stack's: the budgets take its share, and expect a stack to need
    at most its runs' time one after another and their peaks added up."""
    from benchmarks.runner.budget import MEM_PER_PROCESS_MIB, MEM_SLACK, MemoryBudget, TimeBudget
    from benchmarks.runner.grid import RunSpec, StackSpec

    config = {"model": "m", "task": "t", "method": "lora", "seed": 0, "lr": 1e-3}
    rec = {"status": "ok", "config": config,
           "perf": {"wall_s": 400.0, "peak_gpu_mem_mib": None, "stacked": {"runs": 4, "peak_gpu_mem_mib": 2000.0}}}
    memory = MemoryBudget(str(tmp_path), "main", records=[rec])
    one, stack = RunSpec(config), StackSpec((RunSpec(config), RunSpec({**config, "seed": 1})))
    assert memory.need(one) == pytest.approx(MEM_SLACK * 500 + MEM_PER_PROCESS_MIB)
    assert memory.need(stack) == pytest.approx(2 * MEM_SLACK * 500 + MEM_PER_PROCESS_MIB)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "a.json").write_text(__import__("json").dumps(rec))
    budget = TimeBudget(str(tmp_path), "main", 60.0).load(str(tmp_path), "main")
    assert budget.expected(one) == pytest.approx(100.0) and budget.expected(stack) == pytest.approx(200.0)


def test_a_task_whose_loss_is_not_the_models_labels_loss_does_not_stack(tmp_path):
    """A plugin task computing its loss from the logits cannot be split by run: ``train_stacked`` says so before any
    step (``NotStackable``), and ``run --stack`` trains its runs one by one."""
    import torch.nn.functional as F

    from benchmarks.runner.stacked import NotStackable
    from benchmarks.runner.train import train_stacked
    from tests.test_runner import FakeTask, run, runs, write_suite

    class LogitsLossTask(FakeTask):
        name = "fake"

        def loss(self, setup, model, batch):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["input_ids"][:, 1:].flatten())

    specs = _specs(tmp_path, "lora")
    with pytest.raises(NotStackable, match="cannot be split by run"):
        train_stacked([specs[0].config, specs[1].config], LogitsLossTask(), progress=False)
    suite = write_suite(tmp_path / "s2.yaml", SUITE.replace("METHOD", "lora"))
    assert run(suite, tmp_path / "out", injector=None, stack=2, resolver=lambda name, **kw: LogitsLossTask()) == 0
    recs = runs(tmp_path / "out")
    assert len(recs) == 4 and all(r["status"] == "ok" and "stacked" not in r["perf"] for r in recs.values())


def test_group_stacks_fills_the_workers_with_even_stacks():
    """Stacks shrink (not below two runs) while workers would be idle, and a cell's runs split into stacks of
    nearly equal size: the call lasts as long as its largest stack."""
    from benchmarks.runner.grid import RunSpec, StackSpec, group_stacks

    def spec(method, seed, lr):
        return RunSpec({"model": "m", "task": "t", "method": method, "seed": seed, "lr": lr})

    specs = [spec(m, s, lr) for m in ("lora", "nalora") for lr in (1e-4, 3e-4, 1e-3) for s in range(5)]
    sizes = lambda out: sorted(len(x.specs) if isinstance(x, StackSpec) else 1 for x in out)  # noqa: E731
    assert sizes(group_stacks(specs, 8)) == [7, 7, 8, 8]
    assert sizes(group_stacks(specs, 8, slots=6)) == [5] * 6
    assert sizes(group_stacks(specs, 8, slots=100)) == [1] * 2 + [2] * 14  # 15 runs a cell: seven pairs and one
    assert sizes(group_stacks(specs[:17], 8)) == [2, 7, 8]
    assert [s.run_id for x in group_stacks(specs, 8, slots=6) for s in x.specs] == [s.run_id for s in specs]


def test_the_summary_counts_runs_not_stacks(tmp_path):
    """'already done' counts the runs finished before the invocation, not the stacks the others are trained in."""
    from tests.test_runner import run, write_suite

    suite = write_suite(tmp_path / "s.yaml", SUITE.replace("METHOD", "lora"))
    assert run(suite, tmp_path / "r", injector=None, stack=4) == 0
    for f in sorted((tmp_path / "r" / "runs").glob("*.json"))[:2]:  # two of the four records gone
        f.unlink()
    lines: list[str] = []
    assert run(suite, tmp_path / "r", injector=None, stack=4, log=lines.append) == 0
    assert any("4 runs: 2 already done, 2 ok, 0 failed" in line for line in lines), lines


def test_a_workers_next_stack_keeps_the_compiled_graphs(tmp_path, monkeypatch):
    """A worker's second stack (other runs, new model objects) compiles no graph and trains as the same stack
    uncompiled: the compile is paid once per worker, and the kept graphs read the new runs' adapters."""
    from benchmarks.runner import compiled as C
    from benchmarks.runner.train import train_stacked
    from tests.test_runner import FakeTask

    monkeypatch.setenv("NALORA_COMPILE_BACKEND", "aot_eager")
    specs = _specs(tmp_path, "nalora")

    def configs(compile_: bool) -> list[dict]:
        return [dict(s.config, training={**s.config["training"], "compile": compile_}) for s in specs]

    C.forget_compiled()
    try:
        first = train_stacked(configs(True)[:2], FakeTask(), progress=False)
        second = train_stacked(configs(True)[2:], FakeTask(), progress=False)
    finally:
        C.forget_compiled()
    eager = train_stacked(configs(False)[2:], FakeTask(), progress=False)
    assert [r["perf"]["step"]["graphs_kept"] for r in first + second] == [False, False, True, True]
    assert first[0]["perf"]["step"]["graphs_built"] > 0 and second[0]["perf"]["step"]["graphs_built"] == 0
    for got, want in zip(second, eager):
        torch.testing.assert_close(torch.tensor([v for _, v in got["history"]["train_loss"]]),
                                   torch.tensor([v for _, v in want["history"]["train_loss"]]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "nalora"])
def test_vlm_runs_stack_with_their_own_connectors(tmp_path, method):
    """A VLM task's runs (the connector trained by each run, its loss computed by the VLM itself, adapters in both
    towers) train stacked as each trains alone: the same losses and metrics; each run's connector is its own."""
    from datasets import DatasetDict

    from benchmarks.runner.grid import TaskFacts, expand
    from benchmarks.runner.suite import load_suite
    from benchmarks.runner.train import train_run, train_stacked
    from tasks.registry import get_task
    from tests.test_vlm_tasks import _split

    spec = "tiny-vit-swiglu+tiny-byte-llama"
    (tmp_path / "s.yaml").write_text(
        f"tasks: [{{name: fashion-mnist, model: {spec}}}]\nmethods: {{{method}: {{}}}}\nseeds: [0, 1]\n"
        "lr_grid: [1.0e-3, 3.0e-3]\nlr_bounds: [1.0e-3, 3.0e-3]\n"
        "adapter: {targets: [gate, up], towers: [language, vision], rank: 2, alpha: 4, dropout: 0.0}\n"
        "training: {steps: 4, batch_size: 4, eval_every: 2, eval_limit: 4, test_limit: 4, log_every: 1,"
        " diag_batches: 0}\n")
    runs = expand(load_suite(tmp_path / "s.yaml"), lambda n: TaskFacts("vlm", spec))
    picked = [runs[0].config, runs[3].config]  # seed and lr both differ
    splits = DatasetDict(train=_split(24, 0), validation=_split(8, 1), test=_split(8, 2))

    def task():  # a connector lr that moves the loss within four steps: a shared connector would show
        return get_task("fashion-mnist", splits=DatasetDict(dict(splits)), align=False, connector_lr=3e-2)

    together = train_stacked(picked, task(), progress=False)
    for config, got in zip(picked, together):
        alone = train_run(config, task(), progress=False)
        assert isinstance(got, dict) and got["perf"]["stacked"]["runs"] == 2 and got["status"] == alone["status"]
        assert [v for _, v in got["history"]["train_loss"]] == pytest.approx(
            [v for _, v in alone["history"]["train_loss"]], rel=1e-5)
        assert got["metrics"] == alone["metrics"]
    assert together[0]["history"]["train_loss"] != together[1]["history"]["train_loss"]
