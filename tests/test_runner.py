"""Runner tests on CPU with a fake tiny task (random 2-layer Llama) and a stand-in injector.

The stand-in keeps these tests independent of the method library's progress; one test uses the
real ``nalora.inject`` when it imports.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from tasks.base import Task, TaskSetup

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# ---------------------------------------------------------------------------------------------
# Fakes


def tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1234)  # the base model is the same for every run; only the adapter seed varies
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg)


def _examples(seed: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, 32, (n, 8), generator=g)
    x[:, -1] = x[:, 0]  # learnable: the last token copies the first
    return x


class FakeTask(Task):
    """Copy task: predict the last token (= the first). Accuracy at the last position."""

    name = "fake"
    family = "llm"
    metrics = {"acc": True}
    protocol = "fake: argmax of the last-position logits"
    default_model = "tiny-llama"
    sleep = 0.0
    nan = False

    def load_splits(self):  # pragma: no cover - not used by the runner
        return {}

    def setup(self, model_name, device="cpu"):
        return TaskSetup(model=tiny_llama().to(device))

    def train_batches(self, setup, batch_size, seed):
        g = torch.Generator().manual_seed(seed)
        while True:
            x = torch.randint(1, 32, (batch_size, 8), generator=g)
            x[:, -1] = x[:, 0]
            yield {"input_ids": x, "attention_mask": torch.ones_like(x)}

    def loss(self, setup, model, batch):
        if self.sleep:
            time.sleep(self.sleep)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["input_ids"])
        return out.loss * float("nan") if self.nan else out.loss

    def evaluate(self, setup, model, split, limit=None, batch_size=16):
        x = _examples(1 if split == "validation" else 2, limit or 16).to(next(model.parameters()).device)
        logits = model(input_ids=x).logits
        return {"acc": float((logits[:, -2].argmax(-1) == x[:, -1]).float().mean())}


class NanTask(FakeTask):
    name = "fake-nan"
    nan = True


class SlowTask(FakeTask):
    name = "fake-slow"
    sleep = 0.15


class DevTask(FakeTask):
    name = "fake-dev"


class SlowEvalTask(FakeTask):
    """Fast training, an evaluation of many slow generation steps (peft's generate calls its base model, not the
    adapted model's own forward)."""

    name = "fake-slow-eval"

    def evaluate(self, setup, model, split, limit=None, batch_size=16):
        x = _examples(1, 4).to(next(model.parameters()).device)
        for _ in range(150):
            time.sleep(0.1)
            model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=1, do_sample=False,
                           pad_token_id=0)
        return {"acc": 0.0}


class BrokenTask(FakeTask):
    """Raises while setting up: a run that fails with an exception (not a result)."""

    name = "fake-broken"

    def setup(self, model_name, device="cpu"):
        raise RuntimeError("boom: cannot set up")


TASKS = {c.name: c for c in (FakeTask, NanTask, SlowTask, DevTask, BrokenTask, SlowEvalTask)}


def fake_resolver(name: str) -> Task:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}")
    return TASKS[name]()


@dataclass
class _StandInMethod:
    def make_optimizer(self, adapted, lr, weight_decay=0.0, *, total_steps=None, **kw):
        return torch.optim.AdamW([p for p in adapted.model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)


@dataclass
class StandInAdapted:
    model: torch.nn.Module
    method: Any = field(default_factory=_StandInMethod)
    report: list = field(default_factory=list)
    controller: Any = None

    def make_optimizer(self, lr, weight_decay=0.0, *, total_steps=None, **kw):
        return self.method.make_optimizer(self, lr, weight_decay, total_steps=total_steps)

    def num_trainable(self):
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def finalize(self):
        pass


ROLE = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj", "attn": "q_proj"}


def stand_in_inject(model, method="lora", *, targets=("gate",), towers=(), rank=8, alpha=16, dropout=0.0,
                    trainable=(), method_options=None):
    """Plain peft LoRA (or full FT); ``method_options={"raise": ...}`` raises like a bad config."""
    from peft import LoraConfig, get_peft_model

    if (method_options or {}).get("raise"):
        raise ValueError(f"bad option for {method}: {method_options['raise']}")
    if method == "full":
        model.requires_grad_(True)
        return StandInAdapted(model)
    if method not in ("lora", "nalora"):
        raise ValueError(f"unknown method {method!r}")
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=[ROLE[t] for t in targets])
    return StandInAdapted(get_peft_model(model, cfg), report=[{"name": t, "applied": "lora"} for t in targets])


def write_suite(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


# Extends benchmarks/suites/defaults.yaml (the one home of defaults); lr_bounds = the grid: no lr extension.
BASE_SUITE = """\
tasks: [fake]
methods: {lora: {}}
seeds: [0]
lr_grid: [1.0e-3]
lr_bounds: [1.0e-3, 1.0e-3]
adapter: {targets: [gate, up], towers: [language], rank: 2, alpha: 4, dropout: 0.0}
training: {steps: 3, batch_size: 4, eval_every: 2, eval_limit: 8, test_limit: 8, log_every: 1, diag_batches: 0}
"""


def run(suite: Path, out: Path, **kw) -> int:
    from benchmarks.runner.cli import run_suite

    kw.setdefault("resolver", fake_resolver)
    kw.setdefault("injector", stand_in_inject)
    kw.setdefault("log", lambda s: None)
    return run_suite(str(suite), out, progress=False, **kw)


def load(path, **kw):
    """``load_suite`` with the fake tasks known."""
    from benchmarks.runner.suite import load_suite

    return load_suite(path, resolver=fake_resolver, **kw)


def runs(out: Path, phase: str = "runs") -> dict[str, dict]:
    """run id -> the whole record (side file attached)."""
    from benchmarks.runner.sidefile import read_full

    d = out / phase
    return {p.stem: read_full(p) for p in sorted(d.glob("*.json"))}


# ---------------------------------------------------------------------------------------------
# Suites


def test_defaults_override_merge(tmp_path):
    write_suite(tmp_path / "base.yaml", """\
        seeds: [0, 1]
        lr_grid: [1.0e-4, 1.0e-3]
        adapter: {targets: [gate], rank: 8, alpha: 16}
        training: {steps: 100, batch_size: 8}
        methods:
          lora: {}
          full: {lr_grid: [1.0e-5], lr_grid_reason: "full FT needs small lr"}
          nalora: {options: {rho_final: 0.5, beta: 0.9}}
        """)
    s = load(write_suite(tmp_path / "child.yaml", """\
        extends: base
        tasks: [fake]
        training: {steps: 5}
        adapter: {rank: 4}
        methods:
          full: {}
          nalora: {options: {rho_final: 0.25}}
        """))
    assert (s.training.steps, s.training.batch_size) == (5, 8)  # nested merge keeps batch_size
    assert s.training.warmup_ratio == 0.1 and s.training.max_grad_norm == 1.0  # the rest from defaults.yaml
    assert (s.adapter.targets, s.adapter.rank, s.adapter.alpha, s.adapter.towers) == (["gate"], 4, 16, ["language", "vision"])
    assert [m.label for m in s.methods] == ["full", "nalora"]  # the child's mapping selects methods
    by = {m.label: m for m in s.methods}
    assert by["full"].lr_grid == [1e-5] and by["full"].lr_grid_reason  # kept from the parent entry
    assert by["nalora"].options == {"rho_final": 0.25, "beta": 0.9}
    assert by["nalora"].lr_grid == [1e-4, 1e-3] and s.seeds == [0, 1]


CONTROLS = ("lora_gate_scaled", "nalora_random_mask", "nalora_static_mask")


def test_shipped_suites_load():
    from benchmarks.runner.suite import load_suite
    from nalora.methods import list_methods

    # The control methods come from the method library; without them only the structure can be checked.
    check = set(CONTROLS) <= set(list_methods())
    smoke, default, hub = load_suite("smoke"), load_suite("default", check=check), load_suite("hub")
    assert smoke.seeds == [0] and {m.lr_bounds for m in smoke.methods} == {(3e-4, 3e-4), (3e-5, 3e-5), (3e-3, 3e-3)}
    by = {m.label: m for m in default.methods}
    assert {"lora", "nalora", *CONTROLS, "nalora_mask", "nalora_scale", "rslora", "loraplus", "dora", "pissa",
            "full", "head", "nalora-rho0.25", "nalora-rho0.75", "nalora-derivative", "nalora-mask-up-down"} <= set(by)
    assert all(by[m].seeds == [0, 1, 2, 3, 4] for m in ("lora", "nalora", *CONTROLS))
    assert all(by[m].seeds == [0, 1, 2] for m in ("rslora", "loraplus", "dora", "pissa", "full", "head"))
    assert default.models["llm"] == ["smollm2-135m", "gemma3-270m"] and by["head"].families == ["vlm"]
    # The campaign grid (issue 15): four language and two vision-language tasks (cifar10's offline source is no
    # longer served: docs/assets.md); quartz only for development.
    assert [t.name for t in default.tasks] == ["socialiqa", "sarcasm", "movie-reviews", "gsm8k", "fashion-mnist",
                                              "emoji"]
    assert [t.name for t in default.dev_tasks] == ["quartz"]
    # Equal tuning budget: the shipped suites tune nothing but lr.
    assert default.tune is None and hub.tune is None and smoke.tune is None
    assert by["full"].lr_bounds == (1e-6, 1e-3) and by["lora"].lr_bounds == (1e-5, 1e-2)


def test_vlm_collapse_fix_suite_pairs_each_multiplier_with_its_reference():
    from benchmarks.runner.grid import TaskFacts, expand
    from benchmarks.runner.suite import load_suite

    suite = load_suite("vlm-collapse-fix")
    scale = {m.label: m.adapter.tower_lr_scale for m in suite.methods}
    assert scale == {f"{b}-both{s}": ({"vision": float(s[2:])} if s else {})
                     for b in ("lora", "nalora") for s in ("", "-v0.1", "-v0.3")}
    assert all(m.adapter.towers == ["language", "vision"] for m in suite.methods)
    runs = expand(suite, lambda n: TaskFacts("vlm", "dinov2-s+smollm2-135m"))
    assert len(runs) == 6 * 3 * 2 and len({r.run_id for r in runs}) == len(runs)
    assert {r.config["training"]["eval_every"] for r in runs} == {0}


@pytest.mark.parametrize("text, needle", [
    ("trainng: {steps: 2}\n", "trainng: unknown key"),
    ("training: {steps: 0}\n", "training.steps: must be >= 1, got 0"),
    ("lr_grid: [fast]\n", "lr_grid.0: must be a number, got 'fast'"),
    ("seeds: []\n", "seeds: must not be empty"),
    ("methods: {lora: {lr_grid: [1.0]}}\n", "no lr_grid_reason"),
    ("methods: {lora: {rnak: 2}}\n", "methods.lora.rnak: unknown key"),
    ("dev_tasks: [fake]\n", "dev task 'fake' is also a reported task"),
    ("dev_tasks: [fake-dev]\ntune: {methods: {lora: {}}}\n", "tune.methods.lora: give at least one option"),
    ("tune: {methods: {nalora: {rho_final: [0.5]}}}\n", "tune needs dev_tasks"),
    ("tasks: [fake\n", "is not valid YAML"),
    (None, "top level must be a mapping"),
    # issue 11: values that used to pass the check (or fail only after training)
    ("training: {steps: 3, batch_size: 4, max_grad_norm: -1}\n", "training.max_grad_norm: must be > 0, got -1"),
    ("training: {steps: 3, batch_size: 4, weight_decay: x}\n", "training.weight_decay: must be a number, got 'x'"),
    ("training: {steps: 3, batch_size: 4, eval_batch_size: 0}\n", "training.eval_batch_size: must be >= 1, got 0"),
    ("adapter: {alpha: .inf}\n", "adapter.alpha: must be a finite number"),
    ("adapter: {alpha: -16}\n", "adapter.alpha: must be > 0, got -16"),
    ("adapter: {dropout: 5}\n", "adapter.dropout: must be < 1, got 5"),
    ("adapter: {rank: 1.5}\n", "adapter.rank: must be an integer, got 1.5"),
    ("adapter: {targets: [gat]}\n", "adapter.targets.0: must be one of"),
    ("methods: {lora: {adapter: {rank: 0}}}\n", "methods.lora.adapter.rank: must be >= 1, got 0"),
    ("adapter: {tower_lr_scale: {visoin: 0.1}}\n", "adapter.tower_lr_scale.visoin: must be one of 'language' or"),
    ("methods: {lora: {adapter: {tower_lr_scale: {vision: 0}}}}\n",
     "methods.lora.adapter.tower_lr_scale.vision: must be > 0, got 0"),
    ("tasks: [{name: fake, training: {log_every: 0}}]\n", "tasks.fake.training.log_every: must be >= 1, got 0"),
    ("lr_bounds: [1.0e-2, 1.0e-3]\n", "lower bound 0.01 is above upper bound 0.001"),
    ("lr_bounds: [1.0e-4, 1.0e-4]\n", "lr_grid has 0.001, outside lr_bounds"),
    ("methods: {lora: {seeds: [1, 1]}}\n", "methods.lora.seeds: has duplicates"),
    # names, checked at load (before any run starts)
    ("methods: {ghost: {}}\n", "methods.ghost.method: unknown method 'ghost'"),
    ("methods: {x: {method: nalora, options: {rho_finale: 0.5}}}\n", "methods.x.options:"),
    ("methods: {loraplus: {options: {rank_hint: 2}}}\n", "methods.loraplus.options:"),
    ("tasks: [nope]\n", "tasks: unknown task 'nope'"),
    ("models: [smollm3-999m]\n", "unknown model 'smollm3-999m'"),
])
def test_bad_suite_errors_clearly(tmp_path, text, needle):
    from benchmarks.runner.suite import SuiteError

    p = tmp_path / "bad.yaml"
    # PyYAML keeps the last of duplicate keys, so appending overrides the valid base suite.
    p.write_text("- just\n- a list\n" if text is None else BASE_SUITE + text)
    with pytest.raises(SuiteError) as e:
        load(p)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg and "bad.yaml" in msg


def test_unknown_suite_and_filters(tmp_path):
    from benchmarks.runner.suite import SuiteError, load_suite

    with pytest.raises(SuiteError, match="unknown suite 'nope'; known suites: .*smoke"):
        load_suite("nope")
    with pytest.raises(SuiteError, match="--methods: 'dora' is not in suite"):
        load(write_suite(tmp_path / "s.yaml", BASE_SUITE), methods=["dora"])


def test_cli_bad_input_is_one_line(tmp_path):
    # benchmarks/cli.py turns a ValueError from main() into one "error:" line.
    import argparse

    from benchmarks.runner import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--suite", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "r")])
    with pytest.raises(ValueError) as e:
        cli.main(args)
    assert "missing.yaml does not exist" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="--workers must be >= 0"):
        cli.main(parser.parse_args(["--workers", "-1"]))
    # issue 11: `--tasks ""` used to mean every task
    with pytest.raises(ValueError, match='--tasks: empty') as e:
        cli.main(parser.parse_args(["--suite", "smoke", "--tasks", "", "--out", str(tmp_path / "r")]))
    assert "\n" not in str(e.value) and not (tmp_path / "r").exists()
    with pytest.raises(ValueError, match="--timings-from needs --dry-run"):
        cli.main(parser.parse_args(["--suite", "smoke", "--timings-from", str(tmp_path)]))
    with pytest.raises(ValueError, match="no runs/ folder there"):
        cli.main(parser.parse_args(["--suite", "smoke", "--dry-run", "--timings-from", str(tmp_path / "nope")]))


def test_dry_run_estimates_from_another_results_folder(tmp_path):
    """A dry run of an empty folder has nothing to estimate from; ``timings_from`` lends another folder's runs
    (a slice timed on the GPU) to plan a campaign."""
    import json

    timed = tmp_path / "timed"
    assert run(write_suite(tmp_path / "seed9.yaml", BASE_SUITE.replace("seeds: [0]", "seeds: [9]")), timed) == 0
    for p in (timed / "runs").glob("*.json"):
        rec = json.loads(p.read_text())
        rec["perf"]["wall_s"] = 120.0
        p.write_text(json.dumps(rec))
    suite = write_suite(tmp_path / "s.yaml", BASE_SUITE.replace("seeds: [0]", "seeds: [0, 1, 2]"))
    lines: list[str] = []
    assert run(suite, tmp_path / "new", dry_run=True, log=lines.append) == 0
    assert lines[-1] == "3 runs to do; no timed run to estimate their time from (--timings-from DIR adds some)"
    lines.clear()
    assert run(suite, tmp_path / "new", dry_run=True, log=lines.append, timings_from=[str(timed)]) == 0
    assert ": 3 x 120 s; 0.10 run-hours in all" in lines[-1]


# ---------------------------------------------------------------------------------------------
# Grid, ids, records


def test_run_ids_stable_and_distinct(tmp_path):
    from benchmarks.runner.grid import expand

    s = load(write_suite(tmp_path / "s.yaml", BASE_SUITE.replace("seeds: [0]", "seeds: [0, 1]").replace(
        "lr_grid: [1.0e-3]", "lr_grid: [1.0e-3, 1.0e-2]").replace("lr_bounds: [1.0e-3, 1.0e-3]", "lr_bounds: [1.0e-3, 1.0e-2]")))
    fam = lambda n: ("llm", "tiny")  # noqa: E731
    a, b = expand(s, fam), expand(s, fam)
    assert len(a) == 4 and [x.run_id for x in a] == [x.run_id for x in b]
    assert len({x.run_id for x in a}) == 4


def test_run_records_everything(tmp_path):
    suite = write_suite(tmp_path / "s.yaml", BASE_SUITE)
    assert run(suite, tmp_path / "r") == 0
    (rec,) = runs(tmp_path / "r").values()
    assert rec["status"] == "ok", rec["error"]
    assert rec["config"]["method"] == "lora" and rec["config"]["lr"] == 1e-3 and rec["config"]["adapter"]["rank"] == 2
    assert set(rec["metrics"]) == {"validation", "test"} and 0 <= rec["metrics"]["test"]["acc"] <= 1
    assert [s for s, _ in rec["history"]["train_loss"]] == [1, 2, 3]
    assert [s for s, _ in rec["history"]["validation"]] == [2, 3]  # periodic at 2, final at 3
    assert rec["task_info"]["protocol"].startswith("fake")
    assert 0 < rec["trainable_params"] < rec["total_params"]
    assert rec["perf"]["unit"] == "tokens" and rec["perf"]["units"] == 3 * 4 * 8 and rec["perf"]["step_time_s"] > 0
    assert rec["provenance"]["packages"]["torch"] and "gpu" in rec["provenance"]["hardware"]
    assert rec["meta"]["lr_grid"] == [1e-3] and rec["meta"]["lr_bounds"] == [1e-3, 1e-3] and rec["meta"]["lr_round"] == 0
    # The whole resolved configuration: every training key (defaults.yaml filled in), the task's fingerprint.
    from benchmarks.runner.config import TrainingConfig

    omitted = {"curve_limit"} - set(rec["config"]["training"])  # left out when null: older runs keep their ids
    assert set(rec["config"]["training"]) | omitted == set(TrainingConfig.model_fields)
    assert rec["config"]["training"]["warmup_ratio"] == 0.1 and rec["config"]["task_fingerprint"]
    assert rec["health"]["collapsed"] is False and rec["schema"] == 2


def test_seed_fixes_adapter_init(tmp_path):
    # Same config -> same numbers; a different seed -> different training stream and adapter init.
    suite = write_suite(tmp_path / "s.yaml", BASE_SUITE.replace("seeds: [0]", "seeds: [0, 1]"))
    run(suite, tmp_path / "a")
    run(suite, tmp_path / "b")
    ra, rb = runs(tmp_path / "a"), runs(tmp_path / "b")
    assert ra.keys() == rb.keys()
    for k in ra:
        assert ra[k]["history"]["train_loss"] == rb[k]["history"]["train_loss"]
    l0, l1 = (r["history"]["train_loss"] for r in sorted(ra.values(), key=lambda r: r["config"]["seed"]))
    assert l0 != l1


def test_failures_recorded_and_grid_goes_on(tmp_path):
    from benchmarks.runner.cli import EXIT_RUNS_FAILED

    suite = write_suite(tmp_path / "s.yaml", BASE_SUITE.replace("tasks: [fake]", "tasks: [fake, fake-nan, fake-broken]"))
    # issue 11: a grid in which runs failed exits non-zero; a diverged run is a result, not a failure.
    assert run(suite, tmp_path / "r") == EXIT_RUNS_FAILED
    recs = runs(tmp_path / "r").values()
    by = {r["config"]["task"]: r for r in recs}
    assert len(by) == 3
    assert by["fake"]["status"] == "ok"
    assert by["fake-nan"]["status"] == "diverged" and by["fake-nan"]["error"]["type"] == "nan_loss"
    assert by["fake-broken"]["status"] == "failed" and "boom" in by["fake-broken"]["error"]["message"]
    # A finished (even failed) run is not repeated, and the exit code still says the grid holds a failure.
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "r/runs").glob("*.json")}
    assert run(suite, tmp_path / "r") == EXIT_RUNS_FAILED
    assert before == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "r/runs").glob("*.json")}
    run(suite, tmp_path / "r", retry_failed=True)
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "r/runs").glob("*.json")}
    changed = {n for n in before if before[n] != after[n]}
    assert changed == {f"{by['fake-broken']['run_id']}.json"}  # not the ok run, not the diverged one (a result)
    # Without the failing task the grid is clean: exit 0.
    clean = write_suite(tmp_path / "c.yaml", BASE_SUITE.replace("tasks: [fake]", "tasks: [fake, fake-nan]"))
    assert run(clean, tmp_path / "r") == 0


def test_max_minutes_stops_and_resumes(tmp_path):
    suite = write_suite(tmp_path / "s.yaml", BASE_SUITE.replace("seeds: [0]", "seeds: [0, 1, 2]").replace("tasks: [fake]", "tasks: [fake-slow]"))
    # 3 steps x 0.15 s sleep: a 0.005-minute budget (0.3 s) cannot fit all three runs.
    rc = run(suite, tmp_path / "r", max_minutes=0.005)
    from benchmarks.runner.cli import EXIT_MORE_TO_DO

    assert rc == EXIT_MORE_TO_DO and len(runs(tmp_path / "r")) < 3
    assert run(suite, tmp_path / "r") == 0 and len(runs(tmp_path / "r")) == 3
    assert not list((tmp_path / "r/runs").glob(".*"))  # no temp files left behind


def test_time_budget_ends_a_run_inside_a_long_evaluation_and_says_where(tmp_path):
    """The budget is checked before every evaluation forward, not only between steps: a run whose evaluation
    outlasts it stops there (unrecorded, redone next time) instead of holding the invocation past its time."""
    from benchmarks.runner.cli import EXIT_MORE_TO_DO

    suite = write_suite(tmp_path / "s.yaml", BASE_SUITE.replace("tasks: [fake]", "tasks: [fake-slow-eval]"))
    lines: list[str] = []
    assert run(suite, tmp_path / "r", max_minutes=0.1, log=lines.append) == EXIT_MORE_TO_DO  # 6 s; an eval: 15 s
    assert not runs(tmp_path / "r")
    (where,) = [x for x in lines if x.startswith("  interrupted:")]
    assert "s into the validation evaluation" in where, where


def test_time_budget_expects_each_task_its_own_run_time(tmp_path):
    """A slow task's run is not started on the strength of a fast task's: with the results folder saying a
    fake-slow run takes 10^5 s and a fake run well under a second, a one-minute budget trains every fake run and
    starts no fake-slow one (a median over both tasks would have started none, or all)."""
    import json

    from benchmarks.runner.cli import EXIT_MORE_TO_DO

    both = BASE_SUITE.replace("tasks: [fake]", "tasks: [fake-slow, fake]")
    out = tmp_path / "r"
    assert run(write_suite(tmp_path / "seed9.yaml", both.replace("seeds: [0]", "seeds: [9]")), out) == 0
    for p in (out / "runs").glob("*.json"):  # as if fake-slow were a long GPU task
        rec = json.loads(p.read_text())
        if rec["config"]["task"] == "fake-slow":
            rec["perf"]["wall_s"] = 1e5
            p.write_text(json.dumps(rec))
    suite = write_suite(tmp_path / "s.yaml", both.replace("seeds: [0]", "seeds: [0, 1, 2]"))
    assert run(suite, out, max_minutes=1) == EXIT_MORE_TO_DO
    tasks = sorted(r["config"]["task"] for r in runs(out).values() if r["config"]["seed"] != 9)
    assert tasks == ["fake", "fake", "fake"]


def test_a_run_the_deadline_stopped_keeps_its_kind_from_starting_where_it_cannot_finish(tmp_path, monkeypatch):
    """gsm8k on 2026-12-02: with no finished run of its own, a task was expected to take the other tasks' median,
    so every call started its runs and every call's end stopped them. Now a stopped run's time is written down
    (interrupted.jsonl, with the runs per GPU then) and counts among its model and task's run times where as many
    or more share a GPU; the grid then says why it starts none."""
    import benchmarks.runner.execute as ex
    from benchmarks.runner.budget import INTERRUPTED, TimeBudget
    from benchmarks.runner.grid import RunSpec
    from benchmarks.runner.ledger import read_lines
    from benchmarks.runner.pool import run_grid

    def spec(task, seed):
        return RunSpec({"model": "m", "task": task, "method": "lora", "base_method": "lora", "seed": seed, "lr": 1e-3})

    started = []

    def stopped(spec, ctx, position=0):  # every gsm8k run is stopped by the deadline 500 s in; fast runs finish
        started.append(spec.config["task"])
        if spec.config["task"] == "gsm8k":
            return {"run_id": spec.run_id, "status": "interrupted", "seconds": 500.0, "message": "at step 200/300"}
        return {"run_id": spec.run_id, "status": "ok", "message": "", "seconds": 1.0}

    monkeypatch.setattr(ex, "execute", stopped)
    root = tmp_path / "r"
    root.mkdir()
    s = run_grid([spec("gsm8k", 0), spec("gsm8k", 1)], str(root), resolver=None, workers=0, max_minutes=60,
                 progress=False)
    assert s.interrupted == 2 and started == ["gsm8k", "gsm8k"]
    assert [(ln["task"], ln["seconds"], ln["workers"], ln["where"]) for ln in read_lines(root / INTERRUPTED)] == [
        ("gsm8k", 500.0, 1, "at step 200/300")] * 2
    (root / INTERRUPTED).write_text((root / INTERRUPTED).read_text() + '{"torn')  # a killed runner's last line
    started.clear()
    s = run_grid([spec("gsm8k", 0), spec("fast", 0)], str(root), resolver=None, workers=0, max_minutes=5,
                 progress=False)
    assert started == ["fast"] and s.remaining == 1 and s.ok == 1
    assert s.stop_reason.startswith("time budget: a gsm8k run on m is expected to take 500 s or more with 1 or more "
                                    "runs per GPU (2 stopped unfinished")
    assert "give it more minutes, or fewer workers" in s.stop_reason
    # a model with no run of that task yet is expected to take the task's time on the other models, not the other
    # tasks' (Gemma-3's first gsm8k runs started beside SmolLM2's stopped ones on 2026-12-04 and were stopped too)
    started.clear()
    on_m2 = [RunSpec({**spec(task, 0).config, "model": "m2"}) for task in ("gsm8k", "fast")]
    s = run_grid(on_m2, str(root), resolver=None, workers=0, max_minutes=5, progress=False)
    assert started == ["fast"] and s.remaining == 1
    assert s.stop_reason.startswith("time budget: a gsm8k run on m2 is expected to take 500 s or more with 1 or more "
                                    "runs per GPU (2 stopped unfinished of this task on other models")
    # a stopped time counts only where at least as many runs share a GPU as when the run was stopped
    (root / INTERRUPTED).write_text('{"model": "m", "task": "gsm8k", "seconds": 900, "workers": 10}\n')
    assert TimeBudget(str(root), "main", 60, workers=4).expected(spec("gsm8k", 0)) == 0.0
    assert TimeBudget(str(root), "main", 60, workers=10).expected(spec("gsm8k", 0)) == 900.0


def test_pool_queue_keeps_a_model_and_methods_runs_together():
    """Runs come task by task from the grid; the pool takes those of one model and method together (a worker's
    next run then keeps its compiled graphs), each group in the grid's order, repeats dropped."""
    from benchmarks.runner.grid import RunSpec
    from benchmarks.runner.pool import _dedup

    def spec(task, method, seed):
        return RunSpec({"model": "m", "task": task, "method": method, "base_method": method, "seed": seed, "lr": 1e-3})

    grid_order = [spec(t, m, s) for t in ("a", "b") for m in ("lora", "nalora") for s in (0, 1)]
    queue = _dedup(grid_order + grid_order[:2])
    assert [(s.config["method"], s.config["task"], s.config["seed"]) for s in queue] == [
        ("lora", "a", 0), ("lora", "a", 1), ("lora", "b", 0), ("lora", "b", 1),
        ("nalora", "a", 0), ("nalora", "a", 1), ("nalora", "b", 0), ("nalora", "b", 1)]


KILL_SCRIPT = """\
import sys
sys.path.insert(0, {tests!r})
import test_runner as t
from benchmarks.runner.cli import run_suite
print("started", flush=True)
sys.exit(run_suite({suite!r}, {out!r}, resolver=t.fake_resolver, injector=t.stand_in_inject, progress=False))
"""


def test_resume_after_kill(tmp_path):
    suite = write_suite(tmp_path / "s.yaml", BASE_SUITE.replace("seeds: [0]", "seeds: [0, 1, 2, 3, 4, 5]").replace("tasks: [fake]", "tasks: [fake-slow]"))
    out = tmp_path / "r"
    script = tmp_path / "go.py"
    script.write_text(KILL_SCRIPT.format(tests=str(HERE), suite=str(suite), out=str(out)))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    t0 = time.time()
    while len(list((out / "runs").glob("*.json"))) < 2:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() - t0 < 120, "grid did not produce runs"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # mid-grid, likely mid-run
    proc.wait()
    first = {p.name: p.read_bytes() for p in (out / "runs").glob("*.json")}
    assert 2 <= len(first) < 6
    rc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, timeout=300)
    assert rc.returncode == 0, rc.stderr.decode()[-2000:]
    final = {p.name: p.read_bytes() for p in (out / "runs").glob("*.json")}
    assert len(final) == 6  # nothing lost, nothing duplicated
    assert all(final[n] == b for n, b in first.items())  # completed JSONs untouched
    assert sorted(json.loads(b)["config"]["seed"] for b in final.values()) == [0, 1, 2, 3, 4, 5]
    from benchmarks.runner.sidefile import SIDE_SUFFIX, read_full

    assert not [p for p in (out / "runs").iterdir() if not p.name.endswith((".json", SIDE_SUFFIX))]  # no temp files
    assert all(read_full(p)["adapted_modules"] for p in (out / "runs").glob("*.json"))  # side files intact
    from benchmarks.runner import ledger

    invs = ledger.read(out)  # the GPU-time ledger: the killed invocation has no end line, the second has one
    assert [i["ended"] for i in invs] == [False, True] and invs[1]["end"]["ok"] == 6 - len(first)


def test_ledger_counts_gpu_time_and_the_runs_inside_it(tmp_path):
    """invocations.jsonl: start, heartbeats, end; a killed invocation counts to its last heartbeat; GPU-hours
    are length x GPUs; runs count when they finished inside an invocation; a cut last line is skipped."""
    import datetime as dt
    import time as _time

    from benchmarks.runner import ledger

    with ledger.invocation(tmp_path, {"gpus": ["NVIDIA H200", "NVIDIA H200"], "workers": 3}, heartbeat_s=0.05) as inv:
        _time.sleep(0.2)
        inv["end"] = {"ok": 1}
    lines = [json.loads(x) for x in (tmp_path / ledger.LEDGER).read_text().splitlines()]
    assert lines[0]["event"] == "start" and lines[-1]["event"] == "end" and lines[-1]["ok"] == 1
    assert any(x["event"] == "alive" for x in lines) and lines[-1]["wall_s"] >= 0.2
    t0 = dt.datetime(2026, 12, 1, 0, 0, tzinfo=dt.timezone.utc)
    at = lambda m: (t0 + dt.timedelta(minutes=m)).isoformat()  # noqa: E731
    (tmp_path / ledger.LEDGER).write_text("\n".join(json.dumps(x) for x in [
        {"event": "start", "id": "a", "at": at(0), "gpus": ["H200", "H200"]},
        {"event": "end", "id": "a", "at": at(30), "ok": 2},
        {"event": "start", "id": "k", "at": at(60), "gpus": ["H200"]},
        {"event": "alive", "id": "k", "at": at(75)},
        {"event": "start", "id": "c", "at": at(90), "gpus": []},  # a CPU invocation: no GPU time
        {"event": "end", "id": "c", "at": at(120)}]) + '\n{"event": "alive", "id": "k", "at": "2026-12-01T0')
    recs = [{"provenance": {"finished_at": at(m)}} for m in (10, 29, 45, 70, 100)]
    g = ledger.gpu_hours(tmp_path, recs)
    assert g["invocations"] == 2 and g["killed"] == 1 and g["runs"] == 3 and g["records"] == 5
    assert g["gpu_hours"] == pytest.approx(0.5 * 2 + 0.25 * 1)
    assert ledger.gpu_hours(tmp_path / "none", recs) is None


# ---------------------------------------------------------------------------------------------
# Selection and tuning


def _rec(task, method, lr, seed, val, test, status="ok"):
    from benchmarks.runner.grid import run_id

    config = {"model": "m", "task": task, "method": method, "base_method": method, "seed": seed, "lr": lr,
              "adapter": {}, "options": {}, "training": {"steps": 1}}
    return {"run_id": run_id(config), "status": status, "config": config,
            "task_info": {"metrics": {"acc": True}, "selection_metric": "acc", "report_metric": "acc"},
            "metrics": {"validation": {"acc": val}, "test": {"acc": test}} if status == "ok" else {}}


def test_selection_by_mean_validation():
    from benchmarks.runner.grid import select_settings

    recs = [
        # lr 1e-3 has the best single seed but the worse mean; 1e-4 wins on mean validation.
        _rec("t", "lora", 1e-3, 0, 0.95, 0.10), _rec("t", "lora", 1e-3, 1, 0.50, 0.10),
        _rec("t", "lora", 1e-4, 0, 0.80, 0.70), _rec("t", "lora", 1e-4, 1, 0.80, 0.72),
        # lr 1e-2 has the best mean over its ok seeds but a failed seed: ranked after complete settings.
        _rec("t", "lora", 1e-2, 0, 0.99, 0.9), _rec("t", "lora", 1e-2, 1, 0, 0, status="failed"),
    ]
    sel = select_settings(recs)
    assert sel[("m", "t", "lora")]["lr"] == 1e-4 and sel[("m", "t", "lora")]["val_mean"] == pytest.approx(0.8)


def test_tune_runs_apart_and_chosen_values_used(tmp_path):
    suite = write_suite(tmp_path / "s.yaml", BASE_SUITE.replace("methods: {lora: {}}", "methods: {lora: {}, nalora: {}}") + textwrap.dedent("""\
        dev_tasks: [fake-dev]
        tune:
          methods: {nalora: {rho_final: [0.25, 0.75]}}
        """))
    assert run(suite, tmp_path / "r") == 0
    tune_runs, main_runs = runs(tmp_path / "r", "tune/runs"), runs(tmp_path / "r")
    assert {r["config"]["task"] for r in tune_runs.values()} == {"fake-dev"} and len(tune_runs) == 2
    assert {r["config"]["task"] for r in main_runs.values()} == {"fake"}
    chosen = json.loads((tmp_path / "r/tune/chosen.json").read_text())
    value = chosen["chosen"]["nalora"]["rho_final"]
    best = max(tune_runs.values(), key=lambda r: (r["metrics"]["validation"]["acc"], -r["config"]["options"]["rho_final"]))
    assert value == best["config"]["options"]["rho_final"]
    by = {r["config"]["method"]: r for r in main_runs.values()}
    # The main entry keeps the published default; the tuned one is reported apart (never in the main table).
    assert set(by) == {"lora", "nalora", "nalora-tuned"}
    assert by["nalora"]["config"]["options"]["rho_final"] == 0.5
    assert by["nalora-tuned"]["config"]["options"]["rho_final"] == value
    assert by["nalora-tuned"]["meta"]["tuned"] and by["nalora-tuned"]["meta"]["ablation"]
    assert not by["nalora"]["meta"]["tuned"]


def test_tune_needs_equal_budget(tmp_path):
    from benchmarks.runner.suite import SuiteError

    suite = write_suite(tmp_path / "s.yaml", BASE_SUITE.replace("methods: {lora: {}}", "methods: {loraplus: {}, nalora: {}}") + textwrap.dedent("""\
        dev_tasks: [fake-dev]
        tune:
          methods: {nalora: {rho_final: [0.25, 0.5, 0.75]}, loraplus: {loraplus_lr_ratio: [16.0]}}
        """))
    with pytest.raises(SuiteError, match=r"same number of configurations \(nalora: 3, loraplus: 1\)"):
        load(suite)


def _real_inject():
    from nalora.injection import inject

    return inject


def test_real_inject_records_diagnostics(tmp_path):
    inject = _real_inject()
    suite = write_suite(tmp_path / "s.yaml", BASE_SUITE.replace("diag_batches: 0", "diag_batches: 1").replace(
        "methods: {lora: {}}", "methods: {lora: {}, nalora: {}}").replace("steps: 3", "steps: 12"))
    assert run(suite, tmp_path / "r", injector=inject) == 0
    by = {r["config"]["method"]: r for r in runs(tmp_path / "r").values()}
    for m in ("lora", "nalora"):
        assert by[m]["status"] == "ok", by[m]["error"]
        assert by[m]["adapted_modules"]
        diag = by[m]["diagnostics"]["selection_misalignment"]
        assert "error" not in diag and diag["misalignment"] > 0  # the trained adapter moved the gates
    assert by["lora"]["nalora"] is None
    hist = by["nalora"]["nalora"]["history"]
    assert hist["step"] and hist["kept_fraction"]


def test_real_nalora_under_bf16_autocast(tmp_path):
    # The GPU default is bf16 autocast; CPU autocast reproduces the dtype mix here.
    inject = _real_inject()
    suite = write_suite(tmp_path / "s.yaml", BASE_SUITE.replace("log_every: 1", "log_every: 1, mixed_precision: bf16").replace(
        "methods: {lora: {}}", "methods: {nalora: {}}").replace("steps: 3", "steps: 12"))
    assert run(suite, tmp_path / "r", injector=inject) == 0
    (rec,) = runs(tmp_path / "r").values()
    assert rec["status"] == "ok", rec["error"]["message"]


@pytest.mark.slow  # spawned workers re-import torch + transformers: about a minute on 2 shared cores
def test_worker_pool_cpu(tmp_path):
    # Two spawned workers (CPU): every run is recorded once, same numbers as in-process.
    suite = write_suite(tmp_path / "s.yaml", BASE_SUITE.replace("seeds: [0]", "seeds: [0, 1]"))
    assert run(suite, tmp_path / "pool", workers=2) == 0
    assert run(suite, tmp_path / "inproc") == 0
    a, b = runs(tmp_path / "pool"), runs(tmp_path / "inproc")
    assert a.keys() == b.keys() and len(a) == 2
    for k in a:
        assert a[k]["status"] == "ok" and a[k]["metrics"] == b[k]["metrics"]


def test_runs_with_different_precision_share_a_process(tmp_path):
    # A per-task override may change precision; accelerate's state must not leak from one run to the next.
    suite = write_suite(tmp_path / "s.yaml", BASE_SUITE.replace(
        "tasks: [fake]", "tasks: [{name: fake-dev, training: {mixed_precision: bf16}}, fake]"))
    assert run(suite, tmp_path / "r") == 0
    by = {r["config"]["task"]: r for r in runs(tmp_path / "r").values()}
    assert by["fake-dev"]["status"] == "ok", by["fake-dev"]["error"]
    assert by["fake"]["status"] == "ok", by["fake"]["error"]
    assert by["fake-dev"]["perf"]["mixed_precision"] == "bf16" and by["fake"]["perf"]["mixed_precision"] == "no"


def test_assets_needed_covers_what_runs_load(tmp_path):
    """run_all.sh fetches exactly these: a composed VLM's parts, the task data, and the connector's
    alignment data (emoji), which no task of the smoke suite names itself; no tiny or hub models."""
    from benchmarks.runner.assets_needed import assets_needed
    from tasks.registry import get_task

    assert assets_needed("smoke") == ["dinov2-s", "emoji", "fashion-mnist", "quartz", "sarcasm", "smollm2-135m"]
    assert assets_needed("smoke", tasks=["sarcasm"]) == ["sarcasm", "smollm2-135m"]
    # default names quartz as its dev task but tunes nothing: no run reads quartz (a GPU visit's first campaign
    # call was refused for want of it); a suite that tunes on it needs it
    assert assets_needed("default", tasks=["sarcasm"]) == ["gemma3-270m", "sarcasm", "smollm2-135m"]
    tuned = write_suite(tmp_path / "tuned.yaml", """\
        extends: default
        tune: {methods: {nalora: {rho_final: [0.25, 0.5]}}, seeds: [0]}
        """)
    assert assets_needed(str(tuned), tasks=["sarcasm"]) == ["gemma3-270m", "quartz", "sarcasm", "smollm2-135m"]
    assert get_task("fashion-mnist", align=False).assets("dinov2-s+smollm2-135m") == ["dinov2-s", "smollm2-135m", "fashion-mnist"]
    assert get_task("sarcasm").assets("tiny-llama") == ["tiny-llama", "sarcasm"]  # filtered out by assets_needed
    assert get_task("fashion-mnist").assets("hub:Qwen/Qwen2.5-VL-3B-Instruct") == ["fashion-mnist"]


def test_missing_asset_is_one_error_before_any_run(tmp_path, monkeypatch, capsys):
    """A suite whose data is not cached stops before the grid: nothing written, one line naming the fetch.
    (Before, every run got an id of unknown data and a `failed` record; a GPU visit lost its call to it.)"""
    from benchmarks.runner.cli import run_suite

    monkeypatch.setenv("NALORA_BENCH_CACHE", str(tmp_path / "empty"))
    with pytest.raises(RuntimeError, match=r"not in the cache .*: sarcasm; run `nalora-bench fetch sarcasm`"):
        run_suite("smoke", tmp_path / "r", tasks=["sarcasm"], models=["tiny-llama"], log=lambda line: None)
    assert not (tmp_path / "r").exists()
    # a dry run lists the runs anyway, with a note first
    lines: list[str] = []
    assert run_suite("smoke", tmp_path / "r", tasks=["sarcasm"], models=["tiny-llama"], dry_run=True,
                     log=lines.append) == 0
    assert lines[0].startswith("note: suite smoke needs asset(s) not in the cache") and "todo" in lines[2]
    cli = subprocess.run([sys.executable, "-m", "benchmarks.cli", "run", "--suite", "smoke", "--tasks", "sarcasm",
                          "--models", "tiny-llama", "--out", str(tmp_path / "r2")], capture_output=True, text=True,
                         env={**os.environ, "NALORA_BENCH_CACHE": str(tmp_path / "empty")}, cwd=REPO)
    assert cli.returncode == 2 and len(cli.stderr.strip().splitlines()) == 1, cli.stderr
    assert not (tmp_path / "r2").exists()


def test_ledger_names_gpus_it_cannot_query(monkeypatch):
    """Without nvidia-smi the ledger still counts the GPUs (GPU-hours need the count, not the names)."""
    import shutil as _shutil

    from benchmarks.runner import ledger

    monkeypatch.setattr(_shutil, "which", lambda name: None)
    assert ledger.gpu_names(["0", "1"]) == ["unknown GPU", "unknown GPU"] and ledger.gpu_names([]) == []


def test_spawned_worker_takes_its_share_of_cores_for_torch_and_for_inductor(monkeypatch):
    from benchmarks.runner import pool

    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TORCHINDUCTOR_COMPILE_THREADS")}
    monkeypatch.setattr(os, "environ", env)
    pool._init_worker("1", 3)
    assert env["CUDA_VISIBLE_DEVICES"] == "1"
    assert (env["OMP_NUM_THREADS"], env["MKL_NUM_THREADS"], env["TORCHINDUCTOR_COMPILE_THREADS"]) == ("3", "3", "3")
    env["TORCHINDUCTOR_COMPILE_THREADS"] = "8"  # the user's own setting stands
    pool._init_worker(None, 2)
    assert env["TORCHINDUCTOR_COMPILE_THREADS"] == "8"
