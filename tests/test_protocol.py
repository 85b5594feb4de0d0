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


def test_a_finished_cell_extends_while_another_tasks_runs_do_not_fit(tmp_path, monkeypatch):
    """The lr rule reads one cell's runs, so a cell extends as soon as its own runs are in: on 2026-12-04 a call
    of movie-reviews and gsm8k trained none of movie-reviews' next lr because gsm8k's runs did not fit the call
    (the old loop waited for every cell's round). fake-slow's runs never fit here (stored ones took 10^5 s)."""
    import benchmarks.runner.train as train
    from benchmarks.runner.cli import EXIT_MORE_TO_DO

    monkeypatch.setattr(train, "train_run", fake_trainer(optimum=3e-3))
    text = grid_suite(tmp_path).read_text().replace("tasks: [fake]", "tasks: [fake-slow, fake]")
    out = tmp_path / "r"
    assert tr.run(tr.write_suite(tmp_path / "s9.yaml", text.replace("seeds: [0, 1]", "seeds: [9]")), out) == 0
    for p in (out / "runs").glob("*.json"):  # as if fake-slow were a long GPU task
        rec = json.loads(p.read_text())
        rec["perf"]["wall_s"] = 1e5 if rec["config"]["task"] == "fake-slow" else 1.0
        p.write_text(json.dumps(rec))
    lines: list[str] = []
    assert tr.run(tr.write_suite(tmp_path / "s.yaml", text), out, max_minutes=1, log=lines.append) == EXIT_MORE_TO_DO
    mine = [r for r in tr.runs(out).values() if r["config"]["seed"] != 9]
    assert {r["config"]["task"] for r in mine} == {"fake"}  # no fake-slow run started
    # 1e-3 best of round 0 -> 3e-3 (round 1) -> 1e-2 (round 2): 3e-3 interior, both seeds, in this one call
    got = {(r["config"]["lr"], r["meta"]["lr_round"]) for r in mine}
    assert got == {(1e-4, 0), (3e-4, 0), (1e-3, 0), (3e-3, 1), (1e-2, 2)} and len(mine) == 10
    assert any("fake/lora best lr at an edge; adding 0.003" in x for x in lines)
    assert not any("fake-slow/lora best lr" in x for x in lines)  # its cell is not judged without its runs


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


def test_a_cell_with_a_failed_run_is_not_extended_until_it_is_rerun(tmp_path, monkeypatch):
    # One seed of one lr runs out of memory: the cell's grid is incomplete, so the lr rule waits (its complete
    # settings alone say "top edge"); --retry-failed reruns that run, and then the rule extends the cell.
    import benchmarks.runner.train as train
    from benchmarks.runner.cli import EXIT_RUNS_FAILED

    ok = fake_trainer(optimum=3e-2)

    def oom_once(config, task, **kw):
        if config["lr"] == 1e-4 and config["seed"] == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 640.00 MiB")
        return ok(config, task, **kw)

    monkeypatch.setattr(train, "train_run", oom_once)
    suite = grid_suite(tmp_path)
    assert tr.run(suite, tmp_path / "r") == EXIT_RUNS_FAILED
    assert set(lrs_run(tmp_path / "r")) == {1e-4, 3e-4, 1e-3}
    failed = [r for r in tr.runs(tmp_path / "r").values() if r["status"] == "failed"]
    assert [(r["config"]["lr"], r["error"]["type"]) for r in failed] == [(1e-4, "oom")]
    monkeypatch.setattr(train, "train_run", ok)
    assert tr.run(suite, tmp_path / "r", retry_failed=True) == 0
    assert set(lrs_run(tmp_path / "r")) == {1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1}


def test_dry_run_shows_the_current_round_only(tmp_path, monkeypatch):
    import benchmarks.runner.train as train

    monkeypatch.setattr(train, "train_run", fake_trainer(optimum=3e-2))
    suite = grid_suite(tmp_path, bounds=(1e-5, 3e-3))
    lines: list[str] = []
    assert tr.run(suite, tmp_path / "r", dry_run=True, log=lines.append) == 0
    assert not (tmp_path / "r/runs").exists()  # trains nothing
    assert sum("todo" in x for x in lines) == 6 and not any("lr0.003" in x for x in lines)
    assert lines[-1].startswith("6 runs to do; no timed run to estimate their time from")
    # Round 0 done (a run limited to it by --methods is not possible; train it fully, then drop round 1's runs).
    assert tr.run(suite, tmp_path / "r") == 0
    for i, p in enumerate(sorted((tmp_path / "r/runs").glob("*.json"))):
        rec = json.loads(p.read_text())
        if rec["meta"]["lr_round"] == 1:
            p.unlink()
        else:  # as if timed on a GPU: the dry run's estimate reads these
            rec["perf"]["wall_s"] = 100.0 + 10 * i
            p.write_text(json.dumps(rec))
    lines.clear()
    assert tr.run(suite, tmp_path / "r", dry_run=True, log=lines.append) == 0
    todo = [x for x in lines if "todo" in x]
    assert len(todo) == 2 and all("lr0.003" in x for x in todo)  # only round 1's new lr is to do
    # the estimate: 2 runs at the median wall time of the stored runs of the same model and task
    walls = sorted(json.loads(p.read_text())["perf"]["wall_s"] for p in (tmp_path / "r/runs").glob("*.json"))
    median = (walls[2] + walls[3]) / 2 if len(walls) == 6 else None
    assert lines[-1].startswith("2 runs to do") and f": 2 x {median:.0f} s;" in lines[-1]
    assert any("lr round 1" in x for x in lines)


# ---------------------------------------------------------------------------------------------
# Collapse detector


def test_binomial_tail():
    from benchmarks.runner.health import binom_sf

    assert binom_sf(60, 100, 0.5) == pytest.approx(0.028444, abs=1e-5)  # exact one-sided tail
    assert binom_sf(0, 10, 0.3) == 1.0 and binom_sf(11, 10, 0.3) == 0.0


def _per_example(preds, correct, nll=None, k=None):
    from benchmarks.runner.health import compact

    extra = {} if nll is None else {"answer_nll": nll, "n_choices": [k] * len(preds)}
    return compact({"id": [str(i) for i in range(len(preds))], "pred": preds, "correct": correct, **extra})


def _old_rule_collapsed(value: float, n: int, chance: float, final_train_loss: float) -> bool:
    """Clause (b) of collapse rule v1, for contrast: binomial test plus the per-token train loss at ln(1/chance)."""
    from benchmarks.runner.health import binom_sf

    entropy = math.log(1 / chance)
    return binom_sf(round(value * n), n, chance) >= 0.05 and abs(final_train_loss - entropy) <= 0.05 * entropy


def _choice_scores(lls_rows, labels):
    """Synthetic per-example outputs of a K-way choice task through the one scoring module."""
    from tasks.scoring import score_choices

    k = len(lls_rows[0])
    return score_choices(lls_rows, [[f"class {j}" for j in range(k)]] * len(lls_rows), labels)


def _assess_scores(scores, final_train_loss=None):
    from benchmarks.runner.health import assess, compact

    pe = compact(scores.per_example([str(i) for i in range(len(scores.gold))]))
    acc = scores.metrics(norm=False)["acc"]
    k = scores.n_choices[0]
    return assess(val_metrics={"acc": acc}, selection_metric="acc", chance={"acc": 1 / k}, per_example=pe,
                  final_train_loss=final_train_loss), acc


def test_collapse_when_one_answer_dominates():
    from benchmarks.runner.health import assess

    pe = _per_example([3] * 95 + [1] * 5, [True] * 60 + [False] * 40)
    h = assess(val_metrics={"acc": 0.6}, selection_metric="acc", chance={"acc": 0.25}, per_example=pe,
               final_train_loss=0.3)
    assert h["collapsed"] and h["top_pred_share"] == pytest.approx(0.95)
    assert h["reasons"][0].startswith("(a) prediction share: 95.0% of 100") and h["clauses"]["a"] == "fired"
    pe = _per_example([3] * 89 + [1] * 11, [True] * 60 + [False] * 40)
    h = assess(val_metrics={"acc": 0.6}, selection_metric="acc", chance={"acc": 0.25}, per_example=pe,
               final_train_loss=0.3)
    assert not h["collapsed"] and h["clauses"]["a"] == "not fired"  # 89% < 90%


def test_answer_nll_is_ln_k_for_a_uniform_choice_distribution():
    from tasks.scoring import answer_nll

    # Equal choice scores, however many tokens each choice has (their sums are what is compared).
    assert answer_nll([-7.5] * 10, 3) == pytest.approx(math.log(10))
    assert answer_nll([0.0, math.log(3)], 0) == pytest.approx(math.log(4))  # p(gold) = 1/4
    assert answer_nll([-1e4, -1e4 - math.log(3)], 1) == pytest.approx(math.log(4))  # stable far from 0
    assert math.isnan(answer_nll([float("-inf"), 0.0], 1))


def test_collapse_a_one_token_answers_at_chance():
    """(a) One-token answers, a collapsed run: uniform choice distribution up to noise, argmax spread, at chance."""
    rng = torch.Generator().manual_seed(0)
    k, n = 10, 400
    labels = [i % k for i in range(n)]
    lls = (math.log(1 / k) + 1e-3 * torch.randn(n, k, generator=rng)).tolist()  # log p of one answer token
    h, acc = _assess_scores(_choice_scores(lls, labels), final_train_loss=math.log(k))
    assert h["collapsed"] and h["clauses"] == {"a": "not fired", "b": "fired"}
    assert h["answer_nll"] == pytest.approx(math.log(k), abs=0.01) and h["uniform_nll"] == pytest.approx(math.log(k))
    assert h["val_vs_chance_p"] >= 0.05 and h["reasons"][0].startswith("(b) chance with uniform answers")
    assert f"answer NLL {h['answer_nll']:.3f}" in h["reasons"][0] and f"p = {h['val_vs_chance_p']:.3g}" in h["reasons"][0]
    assert _old_rule_collapsed(acc, n, 1 / k, math.log(k))  # the one case rule v1 got right


def test_collapse_b_multi_token_answers_with_low_per_token_loss():
    """(b) Class names of three tokens: the collapsed model spreads its first token uniformly and then copies the
    easy continuation tokens, so its per-token train loss is ln(10)/3, far below ln(10): rule v1 said ok."""
    rng = torch.Generator().manual_seed(1)
    k, n, tokens = 10, 400, 3
    labels = [i % k for i in range(n)]
    # Summed log-likelihood of each choice: log(1/k) on the first token, ~0 on the two continuation tokens.
    lls = (math.log(1 / k) + 1e-3 * torch.randn(n, k, generator=rng) - 1e-4 * (tokens - 1)).tolist()
    per_token_loss = math.log(k) / tokens
    h, acc = _assess_scores(_choice_scores(lls, labels), final_train_loss=per_token_loss)
    assert h["collapsed"] and h["clauses"]["b"] == "fired" and h["top_pred_share"] < 0.9  # spread predictions
    assert h["final_train_loss"] == per_token_loss
    assert not _old_rule_collapsed(acc, n, 1 / k, per_token_loss)  # what rule v1 recorded: ok


def test_collapse_c_a_good_run_is_ok():
    k, n = 10, 400
    labels = [i % k for i in range(n)]
    # Gold gets most of the mass on 80% of the examples; wrong but unsure elsewhere.
    lls = [[0.0 if j == y else -4.0 for j in range(k)] if i % 5 else [0.0 if j == (y + 1) % k else -1.0 for j in range(k)]
           for i, y in enumerate(labels)]
    h, acc = _assess_scores(_choice_scores(lls, labels))
    assert acc == pytest.approx(0.8) and not h["collapsed"] and h["reasons"] == []
    assert h["clauses"] == {"a": "not fired", "b": "not fired"} and h["answer_nll"] < 0.5 * math.log(k)


def test_collapse_d_confidently_wrong_at_chance_is_not_collapsed():
    """(d) A task beyond the model: at chance, but each input gets a confident (random) answer, so the answer NLL
    is far above ln K. The model is not degenerate: the run is ok, and the report's chance test marks the task
    uninformative when no method beats chance."""
    k, n = 4, 400
    labels = [i % k for i in range(n)]
    picks = [(y + i // k) % k for i, y in enumerate(labels)]  # an input-dependent answer, right 1 time in k
    lls = [[0.0 if j == p else -6.0 for j in range(k)] for p in picks]
    h, acc = _assess_scores(_choice_scores(lls, labels))
    assert acc == 1 / k and h["val_vs_chance_p"] >= 0.05 and h["top_pred_share"] == 1 / k  # at chance, spread
    assert h["answer_nll"] > 2 * math.log(k) and not h["collapsed"] and h["clauses"]["b"] == "not fired"


def test_collapse_e_generation_task_uses_the_prediction_share_only():
    """(e) Free-text answers (gsm8k, exact match): no choices, chance 0, no answer NLL. Clause (b) is not
    applicable and says why; clause (a) still catches a model that always answers the same."""
    from benchmarks.runner.health import assess

    spread = _per_example([str(i) for i in range(100)], [False] * 100)
    h = assess(val_metrics={"exact_match": 0.0}, selection_metric="exact_match", chance={"exact_match": 0.0},
               per_example=spread, final_train_loss=0.5)
    assert not h["collapsed"] and h["clauses"]["a"] == "not fired"
    assert h["clauses"]["b"].startswith("not applicable: chance of 'exact_match' is 0.0 (free-text")
    same = _per_example([""] * 95 + ["3"] * 5, [False] * 100)
    h = assess(val_metrics={"exact_match": 0.0}, selection_metric="exact_match", chance={"exact_match": 0.0},
               per_example=same, final_train_loss=0.5)
    assert h["collapsed"] and h["reasons"] == ["(a) prediction share: 95.0% of 100 validation predictions are '' (>= 90%)"]


def test_collapse_rule_b_needs_the_answer_nll_and_adapts_to_validation_size():
    from benchmarks.runner.health import assess

    preds = [i % 10 for i in range(200)]
    # A plugin with per-example predictions but no answer NLL: clause (b) is not applicable (a per-token train
    # loss at ln K proves nothing for answers of several tokens).
    h = assess(val_metrics={"acc": 0.1}, selection_metric="acc", chance={"acc": 0.1},
               per_example=_per_example(preds, [p == 0 for p in preds]), final_train_loss=math.log(10))
    assert not h["collapsed"] and "no finite answer NLL" in h["clauses"]["b"]
    # The chance band is a binomial test: 13% is at chance on 200 examples, above chance on 2000.
    for n, collapsed in ((200, True), (2000, False)):
        pe = _per_example([i % 10 for i in range(n)], [i % 100 < 13 for i in range(n)], [math.log(10)] * n, 10)
        h = assess(val_metrics={"acc": 0.13}, selection_metric="acc", chance={"acc": 0.1}, per_example=pe)
        assert h["collapsed"] is collapsed, (n, h["val_vs_chance_p"])
    # The uniform-answer band: 5% of mean ln K on either side.
    preds, correct = [i % 10 for i in range(200)], [i % 10 == 0 for i in range(200)]
    for factor, collapsed in ((1.04, True), (0.96, True), (1.06, False), (0.94, False)):
        pe = _per_example(preds, correct, [factor * math.log(10)] * 200, 10)
        h = assess(val_metrics={"acc": 0.1}, selection_metric="acc", chance={"acc": 0.1}, per_example=pe)
        assert h["collapsed"] is collapsed, factor


def test_compact_keeps_the_answer_level_means():
    from benchmarks.runner.health import compact

    pe = compact({"id": ["a", "b"], "pred": [0, 1], "correct": [True, False], "answer_nll": [0.5, 1.5],
                  "n_choices": [2, 4]})
    assert pe["answer_nll"] == pytest.approx(1.0) and pe["uniform_nll"] == pytest.approx((math.log(2) + math.log(4)) / 2)
    assert "answer_nll" not in compact({"id": ["a"], "pred": ["7"], "correct": [True]})  # free text: no choices


def test_rule_version_of_records():
    from benchmarks.runner.health import RULE_VERSION, assess, rule_version

    h = assess(val_metrics={"acc": 0.5}, selection_metric="acc", chance={"acc": 0.5}, per_example=None)
    assert rule_version(h) == RULE_VERSION == 2 and h["clauses"]["a"].startswith("not applicable")
    assert rule_version({"collapsed": False, "rule": {"top_share": 0.9, "alpha": 0.05, "loss_tol": 0.05}}) == 1
    assert rule_version(None) is None


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


def test_tower_lr_scale_is_in_the_run_id_only_when_it_changes_something(tmp_path):
    from benchmarks.runner.grid import TaskFacts, expand

    def one(adapter: str, family: str = "vlm"):
        text = tr.BASE_SUITE.replace("dropout: 0.0}", "dropout: 0.0" + adapter + "}")
        (spec,) = expand(tr.load(tr.write_suite(tmp_path / "s.yaml", text)), lambda n: TaskFacts(family, "tiny-llama", "fp"))
        return spec

    plain = one(", tower_lr_scale: {vision: 1.0}")  # a scale of 1 changes nothing: runs from before the key keep ids
    assert "tower_lr_scale" not in plain.config["adapter"]
    assert one(", tower_lr_scale: {}").config["adapter"]["tower_lr_scale"] == {"vision": 0.3}  # merged: {} keeps it
    scaled = one(", tower_lr_scale: {vision: 0.1}")
    assert scaled.config["adapter"]["tower_lr_scale"] == {"vision": 0.1} and scaled.run_id != plain.run_id
    # The recipe's default ({vision: 0.3}, defaults.yaml) reaches VLM runs; a language model has no vision tower,
    # so its runs drop the multiplier and keep their ids.
    assert one("").config["adapter"]["tower_lr_scale"] == {"vision": 0.3}
    llm = one("", family="llm")
    assert "tower_lr_scale" not in llm.config["adapter"]
    assert llm.run_id == one(", tower_lr_scale: {}", family="llm").run_id
    assert one(", tower_lr_scale: {language: 0.5}", family="llm").config["adapter"]["tower_lr_scale"] == {"language": 0.5}


def test_an_adapted_that_ignores_the_tower_multiplier_fails_the_run(tmp_path):
    """A plugin's Adapted whose make_optimizer swallows tower_lr_scale must not train without it silently."""
    from benchmarks.runner.grid import expand
    from benchmarks.runner.train import train_run

    text = tr.BASE_SUITE.replace("dropout: 0.0}", "dropout: 0.0, tower_lr_scale: {language: 0.5}}")
    (spec,) = expand(tr.load(tr.write_suite(tmp_path / "s.yaml", text)), lambda n: ("llm", "tiny-llama"))
    with pytest.raises(ValueError, match="tower_lr_scale .* was not applied by StandInAdapted"):
        train_run(spec.config, ConstantAnswerTask(), injector=tr.stand_in_inject, progress=False)


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
    for needle in (f">= {health.TOP_SHARE}", f"p < {health.ALPHA}", f"{round(100 * health.NLL_TOL)}%", "lr_bounds",
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
    old = tr.load(tr.write_suite(tmp_path / "old.yaml", tr.BASE_SUITE))
    (old_spec,) = expand(old, lambda n: ("llm", "tiny-llama"))
    assert "curve_limit" not in old_spec.config["training"]  # null: the config (and id) of runs before the key
    new = tr.load(tr.write_suite(tmp_path / "new.yaml", tr.BASE_SUITE.replace("eval_limit: 8", "eval_limit: 8, curve_limit: 3")))
    (spec,) = expand(new, lambda n: ("llm", "tiny-llama"))
    assert spec.config["training"]["curve_limit"] == 3 and spec.run_id != old_spec.run_id
    task = LimitRecordingTask()
    train_run(spec.config, task, injector=tr.stand_in_inject, progress=False)
    # steps 3, eval_every 2: one periodic evaluation (curve subset), then the final validation and test in full.
    assert task.asked == [("validation", 3), ("validation", 8), ("test", 8)]
