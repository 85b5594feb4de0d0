"""Protocol v2 (docs/protocol.md): the lr grid that brackets the optimum, collapse and divergence, the
resolved configuration in the run id, held-out diagnostics, plugin tasks and methods known at load."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_runner as tr  # noqa: E402  (the fake tasks, stand-in injector and suite helpers)

# ---------------------------------------------------------------------------------------------
# The lr-extension rule on a synthetic optimum (a fake trainer: validation = f(lr))


def test_half_decade_sequence():
    from benchmarks.runner.grid import half_decade

    assert [half_decade(x, +1) for x in (1e-3, 3e-3, 1e-2, 3e-5)] == [3e-3, 1e-2, 3e-2, 1e-4]
    assert [half_decade(x, -1) for x in (3e-4, 1e-4, 1e-5, 3e-2)] == [1e-4, 3e-5, 3e-6, 1e-2]


def fake_trainer(optimum: float, collapsed_above: float | None = None):
    """A ``train_run`` stand-in: validation acc peaks at ``optimum`` (log scale), identical over seeds."""

    def train_run(config, task, **kw):
        lr = config["lr"]
        acc = 0.9 - 0.1 * abs(math.log10(lr) - math.log10(optimum)) + 0.001 * config["seed"]
        status = "collapsed" if collapsed_above is not None and lr > collapsed_above else "ok"
        return {"metrics": {"validation": {"acc": acc}, "test": {"acc": acc}}, "history": {}, "status": status,
                "health": {"collapsed": status == "collapsed", "reasons": []}, "perf": {"wall_s": 0.0}}

    return train_run


def grid_suite(tmp_path, bounds=(1e-5, 1e-1), grid=(1e-4, 3e-4, 1e-3)):
    text = tr.BASE_SUITE.replace("seeds: [0]", "seeds: [0, 1]").replace(
        "lr_grid: [1.0e-3]", f"lr_grid: [{', '.join(f'{x:.1e}' for x in grid)}]").replace(
        "lr_bounds: [1.0e-3, 1.0e-3]", f"lr_bounds: [{bounds[0]:.1e}, {bounds[1]:.1e}]")
    return tr.write_suite(tmp_path / "grid.yaml", text)


def lrs_run(out: Path) -> dict[float, set[int]]:
    got: dict[float, set[int]] = {}
    for rec in tr.runs(out).values():
        got.setdefault(rec["config"]["lr"], set()).add(rec["meta"]["lr_round"])
    return got


def test_lr_grid_extends_upwards_until_interior(tmp_path, monkeypatch):
    import benchmarks.runner.train as train

    monkeypatch.setattr(train, "train_run", fake_trainer(optimum=3e-2))
    suite = grid_suite(tmp_path)
    assert tr.run(suite, tmp_path / "r") == 0
    got = lrs_run(tmp_path / "r")
    # 1e-3 is the best of round 0 -> 3e-3 (round 1) -> 1e-2 (2) -> 3e-2 (3) -> 1e-1 (4): 3e-2 interior, stop.
    assert got == {1e-4: {0}, 3e-4: {0}, 1e-3: {0}, 3e-3: {1}, 1e-2: {2}, 3e-2: {3}, 1e-1: {4}}
    recs = tr.runs(tmp_path / "r").values()
    assert len(recs) == 7 * 2  # every lr x both seeds
    last = [r for r in recs if r["config"]["lr"] == 1e-1]
    assert all(r["meta"]["lr_grid"] == [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1] for r in last)
    assert all(r["meta"]["lr_bounds"] == [1e-5, 1e-1] for r in last)
    # Resumable: a rerun recomputes the same extensions from the stored records and trains nothing.
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "r/runs").glob("*.json")}
    assert tr.run(suite, tmp_path / "r") == 0
    assert before == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "r/runs").glob("*.json")}


def test_lr_grid_extends_downwards_and_stops_at_the_bound(tmp_path, monkeypatch):
    import benchmarks.runner.train as train
    from benchmarks.runner.grid import edge_status, select_settings

    monkeypatch.setattr(train, "train_run", fake_trainer(optimum=1e-7))
    suite = grid_suite(tmp_path, bounds=(1e-5, 1e-2))
    assert tr.run(suite, tmp_path / "r") == 0
    got = lrs_run(tmp_path / "r")
    # 1e-4 best -> 3e-5 (1) -> 1e-5 (2); the next, 3e-6, is below the bound: the cell stays at its edge.
    assert got == {1e-5: {2}, 3e-5: {1}, 1e-4: {0}, 3e-4: {0}, 1e-3: {0}}
    sel = select_settings(list(tr.runs(tmp_path / "r").values()))
    (cell,) = sel.values()
    assert cell["lr"] == 1e-5 and edge_status(sorted(got), cell["lr"], (1e-5, 1e-2)) == "at-bound"


def test_interior_optimum_adds_nothing(tmp_path, monkeypatch):
    import benchmarks.runner.train as train

    monkeypatch.setattr(train, "train_run", fake_trainer(optimum=3e-4))
    assert tr.run(grid_suite(tmp_path), tmp_path / "r") == 0
    assert set(lrs_run(tmp_path / "r")) == {1e-4, 3e-4, 1e-3}


def test_collapsed_runs_are_not_selected_for_extension(tmp_path, monkeypatch):
    # The top lr "scores" best but collapsed: only ok runs count, so 3e-4 is interior and nothing is added.
    import benchmarks.runner.train as train

    monkeypatch.setattr(train, "train_run", fake_trainer(optimum=1e-2, collapsed_above=5e-4))
    assert tr.run(grid_suite(tmp_path), tmp_path / "r") == 0
    recs = tr.runs(tmp_path / "r").values()
    assert {r["config"]["lr"] for r in recs} == {1e-4, 3e-4, 1e-3}
    assert {r["status"] for r in recs if r["config"]["lr"] == 1e-3} == {"collapsed"}


def test_dry_run_shows_the_current_round_only(tmp_path, monkeypatch):
    import benchmarks.runner.train as train

    monkeypatch.setattr(train, "train_run", fake_trainer(optimum=3e-2))
    suite = grid_suite(tmp_path, bounds=(1e-5, 3e-3))
    lines: list[str] = []
    assert tr.run(suite, tmp_path / "r", dry_run=True, log=lines.append) == 0
    assert not (tmp_path / "r/runs").exists()  # trains nothing
    assert sum("todo" in x for x in lines) == 6 and not any("lr0.003" in x for x in lines)
    # Round 0 done (a run limited to it by --methods is not possible; train it fully, then drop round 1's runs).
    assert tr.run(suite, tmp_path / "r") == 0
    for p in (tmp_path / "r/runs").glob("*.json"):
        if json.loads(p.read_text())["meta"]["lr_round"] == 1:
            p.unlink()
    lines.clear()
    assert tr.run(suite, tmp_path / "r", dry_run=True, log=lines.append) == 0
    todo = [x for x in lines if "todo" in x]
    assert len(todo) == 2 and all("lr0.003" in x for x in todo)  # only round 1's new lr is to do
    assert any("lr round 1" in x for x in lines)


# ---------------------------------------------------------------------------------------------
# Collapse detector


def test_binomial_tail():
    from benchmarks.runner.health import binom_sf

    assert binom_sf(60, 100, 0.5) == pytest.approx(0.028444, abs=1e-5)  # exact one-sided tail
    assert binom_sf(0, 10, 0.3) == 1.0 and binom_sf(11, 10, 0.3) == 0.0


def _per_example(preds, correct):
    from benchmarks.runner.health import compact

    return compact({"id": [str(i) for i in range(len(preds))], "pred": preds, "correct": correct})


def test_collapse_when_one_answer_dominates():
    from benchmarks.runner.health import assess

    pe = _per_example([3] * 95 + [1] * 5, [True] * 60 + [False] * 40)
    h = assess(val_metrics={"acc": 0.6}, selection_metric="acc", chance={"acc": 0.25}, per_example=pe,
               final_train_loss=0.3)
    assert h["collapsed"] and h["top_pred_share"] == pytest.approx(0.95) and "95%" in h["reasons"][0]
    pe = _per_example([3] * 89 + [1] * 11, [True] * 60 + [False] * 40)
    h = assess(val_metrics={"acc": 0.6}, selection_metric="acc", chance={"acc": 0.25}, per_example=pe,
               final_train_loss=0.3)
    assert not h["collapsed"]  # 89% < 90%


def test_collapse_at_chance_with_loss_at_uniform_entropy():
    from benchmarks.runner.health import assess

    preds = [i % 10 for i in range(200)]  # spread answers: rule (a) does not fire
    pe = _per_example(preds, [i % 10 == 0 for i in range(200)])
    at_chance = {"val_metrics": {"acc": 0.105}, "selection_metric": "acc", "chance": {"acc": 0.1}, "per_example": pe}
    h = assess(**at_chance, final_train_loss=math.log(10) * 1.02)
    assert h["collapsed"] and h["val_vs_chance_p"] > 0.05 and h["uniform_entropy"] == pytest.approx(math.log(10))
    # The train loss moved off the uniform entropy: not collapsed (a hard task, not a degenerate run).
    assert not assess(**at_chance, final_train_loss=math.log(10) * 0.9)["collapsed"]
    # Clearly above chance (p < 0.05) with the same loss: not collapsed.
    above = dict(at_chance, val_metrics={"acc": 0.2})
    assert not assess(**above, final_train_loss=math.log(10))["collapsed"]


class ConstantAnswerTask(tr.FakeTask):
    """Per-example results whose predictions are all one answer (the VLM collapse of issue 9)."""

    name = "fake-constant"

    def chance(self):
        return {"acc": 1 / 31}

    def evaluate_examples(self, setup, model, split, limit=None, batch_size=16):
        n = limit or 16
        pe = {"id": [f"{split}-{i}" for i in range(n)], "pred": [7] * n, "correct": [i == 0 for i in range(n)]}
        return {"acc": 1 / n}, pe


class NanGradTask(tr.FakeTask):
    """Finite loss on every step, NaN gradients on the last one only (issue 11: recorded ok before)."""

    name = "fake-nangrad"
    calls = 0
    last = 3

    def loss(self, setup, model, batch):
        NanGradTask.calls += 1
        loss = super().loss(setup, model, batch)
        if NanGradTask.calls == NanGradTask.last:
            p = next(q for q in model.parameters() if q.requires_grad)
            # where() keeps the forward finite; the unselected sqrt of a negative number sends NaN backwards.
            loss = loss + torch.where(torch.zeros_like(p, dtype=torch.bool), (-(p.abs() + 1)).sqrt(), torch.zeros_like(p)).sum()
        return loss


def resolver(name):
    extra = {c.name: c for c in (ConstantAnswerTask, NanGradTask)}
    return extra[name]() if name in extra else tr.fake_resolver(name)


def test_collapsed_and_nan_gradient_runs_are_recorded_as_such(tmp_path):
    NanGradTask.calls = 0
    suite = tr.write_suite(tmp_path / "s.yaml", tr.BASE_SUITE.replace("tasks: [fake]", "tasks: [fake-constant, fake-nangrad]")
                           .replace("log_every: 1", "log_every: 10"))  # the NaN step is not a log step but the last
    assert tr.run(suite, tmp_path / "r", resolver=resolver) == 0  # collapsed / diverged are results
    by = {r["config"]["task"]: r for r in tr.runs(tmp_path / "r").values()}
    col = by["fake-constant"]
    assert col["status"] == "collapsed" and col["health"]["top_pred_share"] == 1.0
    pe = col["per_example"]["validation"]
    assert pe["n"] == 8 and pe["correct"] == "10000000" and pe["pred"] == [7] * 8 and len(pe["ids_sha256"]) == 64
    assert col["per_example"]["test"]["n"] == 8
    div = by["fake-nangrad"]
    assert div["status"] == "diverged" and "non-finite gradient" in div["error"]["message"]


def test_train_run_status_and_diverged_exception(tmp_path):
    from benchmarks.runner.train import Diverged, NonFiniteLoss, train_run

    assert NonFiniteLoss is Diverged and issubclass(Diverged, RuntimeError)
    from benchmarks.runner.grid import expand

    suite = tr.load(tr.write_suite(tmp_path / "s.yaml", tr.BASE_SUITE))
    (spec,) = expand(suite, lambda n: ("llm", "tiny-llama"))
    result = train_run(spec.config, ConstantAnswerTask(), injector=tr.stand_in_inject, progress=False)
    assert result["status"] == "collapsed" and result["health"]["collapsed"]
    NanGradTask.calls, NanGradTask.last = 0, 2
    with pytest.raises(Diverged, match="non-finite gradient"):
        train_run(spec.config, NanGradTask(), injector=tr.stand_in_inject, progress=False)
    NanGradTask.last = 3


# ---------------------------------------------------------------------------------------------
# The resolved configuration is the run id


def test_resolved_config_and_run_ids(tmp_path):
    from benchmarks.runner.grid import TaskFacts, expand

    base = tr.BASE_SUITE.replace("methods: {lora: {}}", "methods: {nalora: {}}")
    suite = tr.load(tr.write_suite(tmp_path / "a.yaml", base))
    (a,) = expand(suite, lambda n: TaskFacts("llm", "tiny-llama", "fp-1"))
    # Every NA-LoRA option is written out with its default, so changing a code default changes the id.
    opts = a.config["options"]
    assert {"beta", "mask_interval", "rho_final", "gammas", "warmup_frac", "final_frac"} <= set(opts)
    assert opts["rho_final"] == 0.5
    (b,) = expand(suite, lambda n: TaskFacts("llm", "tiny-llama", "fp-2"))
    assert a.config["task_fingerprint"] == "fp-1" and a.run_id != b.run_id  # the task's definition/data changed
    suite.methods[0].resolved = {**opts, "beta": 0.95}  # what a new code default of beta resolves to
    (c,) = expand(suite, lambda n: TaskFacts("llm", "tiny-llama", "fp-1"))
    assert c.run_id != a.run_id
    # A suite default (defaults.yaml) that changes is in the config too.
    other = tr.load(tr.write_suite(tmp_path / "b.yaml", base.replace("log_every: 1", "log_every: 1, weight_decay: 0.01")))
    (d,) = expand(other, lambda n: TaskFacts("llm", "tiny-llama", "fp-1"))
    assert d.config["training"]["weight_decay"] == 0.01 and d.run_id != a.run_id


def test_per_method_seeds(tmp_path):
    from benchmarks.runner.grid import expand

    suite = tr.load(tr.write_suite(tmp_path / "s.yaml", tr.BASE_SUITE.replace(
        "methods: {lora: {}}", "methods: {lora: {seeds: [0, 1, 2, 3, 4]}, nalora: {}}").replace("seeds: [0]", "seeds: [0, 1, 2]")))
    specs = expand(suite, lambda n: ("llm", "tiny-llama"))
    seeds = {m: sorted(s.config["seed"] for s in specs if s.config["method"] == m) for m in ("lora", "nalora")}
    assert seeds == {"lora": [0, 1, 2, 3, 4], "nalora": [0, 1, 2]}
    sub = tr.load(tmp_path / "s.yaml", seeds=[3])  # --seeds keeps the entries that have the seed
    assert [(m.label, m.seeds) for m in sub.methods] == [("lora", [3])]


# ---------------------------------------------------------------------------------------------
# Plugins known at load; relative task folders; held-out diagnostic batches


PLUGIN = """\
import sys
sys.path.insert(0, {tests!r})
from test_runner import FakeTask
from tasks.registry import register_task
from nalora.methods.peft_lora import LoRA
from nalora.methods.registry import register_method

@register_task("plugin-fake-{tag}")
class PluginTask(FakeTask):
    name = "plugin-fake-{tag}"

@register_method("lora_plugin_{tag}")
class PluginLoRA(LoRA):
    pass
"""


def test_relative_task_paths_and_plugin_methods_known_at_load(tmp_path, monkeypatch):
    from benchmarks.runner.suite import SuiteError, load_suite

    tag = tmp_path.name.replace("-", "_")[-12:]
    (tmp_path / "suites/mytasks").mkdir(parents=True)
    (tmp_path / "suites/mytasks/plugin.py").write_text(PLUGIN.format(tests=str(tr.HERE), tag=tag))
    suite = tr.write_suite(tmp_path / "suites/s.yaml", tr.BASE_SUITE.replace("tasks: [fake]", f"tasks: [plugin-fake-{tag}]")
                           .replace("methods: {lora: {}}", f"methods: {{lora_plugin_{tag}: {{}}}}") + "task_paths: [mytasks]\n")
    monkeypatch.chdir(tmp_path)  # not the suite's folder: the relative path must resolve from the suite file
    s = load_suite(suite)
    assert s.task_paths == [str((tmp_path / "suites/mytasks").resolve())]
    assert [m.method for m in s.methods] == [f"lora_plugin_{tag}"] and s.tasks[0].name == f"plugin-fake-{tag}"
    bad = tr.write_suite(tmp_path / "suites/bad.yaml", tr.BASE_SUITE + "task_paths: [nowhere]\n")
    with pytest.raises(SuiteError, match="bad.yaml: task_paths: .*nowhere"):
        load_suite(bad)


def test_heldout_batches_come_from_the_task_and_the_fallback_is_labelled():
    from benchmarks.runner.train import _heldout_batches

    class Held(tr.FakeTask):
        def heldout_batches(self, setup, n, batch_size):
            return [{"input_ids": torch.zeros(batch_size, 8, dtype=torch.long)}] * n

    batches, source = _heldout_batches(Held(), None, 2, 4, seed=0)
    assert source == "validation" and len(batches) == 2
    batches, source = _heldout_batches(tr.FakeTask(), None, 2, 4, seed=0)
    assert source == "train-stream-fallback" and len(batches) == 2


def test_protocol_doc_states_the_code_constants():
    # docs/protocol.md is what a reviewer checks; it must state the rule's constants as the code has them.
    from benchmarks.runner import health
    from benchmarks.runner.cli import EXIT_MORE_TO_DO, EXIT_RUNS_FAILED

    text = (tr.REPO / "docs/protocol.md").read_text()
    for needle in (f">= {health.TOP_SHARE}", f"p < {health.ALPHA}", f"{round(100 * health.LOSS_TOL)}%", "lr_bounds",
                   f"exit code {EXIT_RUNS_FAILED}", f"exit code {EXIT_MORE_TO_DO}"):
        assert needle in text, needle


class LimitRecordingTask(tr.FakeTask):
    """Records the (split, limit) of every evaluation the runner asks for."""

    name = "fake-limits"

    def __init__(self):
        super().__init__()
        self.asked = []

    def evaluate_examples(self, setup, model, split, limit=None, batch_size=16):
        self.asked.append((split, limit))
        n = limit or 16
        return {"acc": 0.5}, {"id": [str(i) for i in range(n)], "pred": [i % 2 for i in range(n)], "correct": [i % 2 == 0 for i in range(n)]}

    evaluate = lambda self, *a, **k: self.evaluate_examples(*a, **k)[0]  # noqa: E731


def test_curve_limit_cheapens_periodic_evaluations_only_and_null_keeps_run_ids(tmp_path):
    from benchmarks.runner.grid import expand
    from benchmarks.runner.train import curve_examples, train_run

    assert [curve_examples(500, 100), curve_examples(64, 100), curve_examples(None, 100), curve_examples(500, None)] == \
        [100, 64, 100, 500]
    old = tr.load(tr.write_suite(tmp_path / "old.yaml", tr.BASE_SUITE.replace("eval_limit: 8", "eval_limit: 8, curve_limit: null")))
    (old_spec,) = expand(old, lambda n: ("llm", "tiny-llama"))
    assert "curve_limit" not in old_spec.config["training"]  # null: the config (and id) of runs before the key
    new = tr.load(tr.write_suite(tmp_path / "new.yaml", tr.BASE_SUITE.replace("eval_limit: 8", "eval_limit: 8, curve_limit: 3")))
    (spec,) = expand(new, lambda n: ("llm", "tiny-llama"))
    assert spec.config["training"]["curve_limit"] == 3 and spec.run_id != old_spec.run_id
    task = LimitRecordingTask()
    train_run(spec.config, task, injector=tr.stand_in_inject, progress=False)
    # steps 3, eval_every 2: one periodic evaluation (curve subset), then the final validation and test in full.
    assert task.asked == [("validation", 3), ("validation", 8), ("test", 8)]
