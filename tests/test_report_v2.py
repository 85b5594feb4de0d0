"""Protocol-v2 report tests on synthetic records with per-example results: paired bootstrap, chance tests,
lr-edge marks, status counts, bad record files, README regeneration, determinism."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from benchmarks.report import stats
from benchmarks.report.cli import build_report
from benchmarks.runner.grid import run_id
from benchmarks.runner.record import make_record
from benchmarks.runner.store import ResultStore

LRS = (1e-4, 3e-4, 1e-3)


def v2_record(model: str, task: str, method: str, lr: float, seed: int, correct: np.ndarray, *, val: float,
              status: str = "ok", chance: float | None = 0.5, lr_bounds: list | None = None, ids: str = "ids-1") -> dict:
    """A schema-2 style record: per-example test correctness as a '0110...' string, chance in task_info."""
    config = {"model": model, "task": task, "method": method, "base_method": method, "seed": seed, "lr": lr,
              "adapter": {"targets": ["gate", "up", "down"], "rank": 8, "alpha": 16, "dropout": 0.0},
              "options": {}, "training": {"steps": 10, "batch_size": 4, "grad_accum": 1}}
    acc = float(np.mean(correct))
    result = {"metrics": {"validation": {"acc": val}, "test": {"acc": acc}},
              "history": {"train_loss": [[1, 2.0], [2, 1.5 - 0.01 * seed]], "validation": [[2, {"acc": val}]]},
              "trainable_params": 1000, "total_params": 10**6, "perf": {"peak_gpu_mem_mib": 100.0}}
    meta = {"suite": "syn", "phase": "main", "family": "llm", "lr_grid": list(LRS), "ablation": False}
    if lr_bounds:
        meta["lr_bounds"] = lr_bounds
    info = {"metrics": {"acc": True}, "selection_metric": "acc", "report_metric": "acc", "protocol": "syn"}
    if chance is not None:
        info["chance"] = {"acc": chance}
    rec = make_record(config, meta, run_id(config), status=status, task_info=info, result=result)
    rec["per_example"] = {"test": {"n": len(correct), "ids_sha256": ids,
                                   "correct": "".join("1" if c else "0" for c in correct)}}
    return rec


def _bits(rng: np.random.Generator, p: np.ndarray) -> np.ndarray:
    return rng.random(p.shape) < p


def make_v2(root, *, n=600, seeds=(0, 1, 2, 3, 4), delta=0.06, order=1, extra=()) -> list[dict]:
    """Task `easy` (lora ~0.70, nalora ~0.70 + delta, lr 1e-3 best on validation) and task `hard`
    (every method at chance 0.25 on a 4-way task): `hard` must be marked uninformative."""
    rng = np.random.default_rng(0)
    p_item = rng.uniform(0.4, 1.0, n)  # per-example difficulty shared by both methods: a paired design
    recs = []
    for seed in seeds:
        for lr in LRS:
            val = {1e-4: 0.6, 3e-4: 0.65, 1e-3: 0.7}[lr]
            base = _bits(rng, p_item)
            recs.append(v2_record("m", "easy", "lora", lr, seed, base, val=val))
            better = base | _bits(rng, np.full(n, delta / 0.3))  # flips about delta of the answers to correct
            recs.append(v2_record("m", "easy", "nalora", lr, seed, better, val=val + 0.01))
            for method in ("lora", "nalora"):
                recs.append(v2_record("m", "hard", method, lr, seed, _bits(rng, np.full(200, 0.25)), val=val,
                                      chance=0.25, ids="ids-hard"))
    recs += list(extra)
    store = ResultStore(root)
    for r in recs[::order]:
        store.write(r)
    return recs


def test_binomial_and_infer_n():
    assert stats.binom_sf(8, 10, 0.5) == pytest.approx(56 / 1024)
    assert stats.binom_sf(0, 10, 0.3) == 1.0 and stats.binom_sf(11, 10, 0.3) == 0.0
    exact = sum(math.comb(200, i) * 3 ** (200 - i) for i in range(60, 201)) / 4 ** 200  # exact rational tail
    assert stats.binom_sf(60, 200, 0.25) == pytest.approx(exact, rel=1e-9)
    assert stats.infer_n([100 / 227, 101 / 227, 3 / 227]) == 227
    assert stats.infer_n([0.5, 1 / 3]) == 6


def test_bootstrap_covers_known_difference():
    """Over simulated experiments with a known true difference, the 95% interval covers it about 95% of the time
    and is not so wide that it misses a real 12-point effect."""
    rng = np.random.default_rng(1)
    true, covered, excluded = 0.12, 0, 0
    sims = 40
    for k in range(sims):
        p = rng.uniform(0.3, 0.8, 300)
        seed_shift = rng.normal(0, 0.02, (3, 1))  # seed-to-seed variation of the method's accuracy
        a = rng.random((3, 300)) < np.clip(p + true + seed_shift, 0, 1)
        b = rng.random((3, 300)) < p
        iv = stats.bootstrap_paired(a, b, key=f"sim{k}", reps=1000)
        covered += iv.lo <= true <= iv.hi
        excluded += iv.lo > 0
        assert iv.lo <= iv.mean <= iv.hi and iv.mde == pytest.approx(2.8 * iv.se)
    assert covered >= 0.85 * sims and excluded >= 0.8 * sims


def test_bootstrap_is_deterministic_and_paired():
    rng = np.random.default_rng(2)
    a = rng.random((2, 500)) < 0.7
    i1, i2 = stats.bootstrap_paired(a, a, "k"), stats.bootstrap_paired(a, a, "k")
    assert (i1.lo, i1.hi) == (i2.lo, i2.hi)
    assert i1.lo == i1.hi == 0.0  # identical answers: a paired interval has no width (an unpaired one would)


def test_v2_report_intervals_and_uninformative(tmp_path):
    make_v2(tmp_path)
    build_report(tmp_path, plots=False)
    paired = (tmp_path / "tables/paired_m.md").read_text()
    row = next(line for line in paired.splitlines() if line.startswith("| nalora | easy"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "easy (n=600, chance 50.0)" and cells[2] == "5" and cells[5] == "bootstrap"
    lo, hi = (float(x) for x in cells[4].strip("[]").split(","))
    assert lo > 0 and lo < float(cells[3]) < hi and cells[7] == "yes"
    assert float(cells[6]) > 0  # MDE reported
    assert "| nalora | hard (n=200, chance 25.0) (uninformative) |" in paired
    pooled = next(line for line in paired.splitlines() if line.startswith("| nalora | **pooled**"))
    assert "(1 task(s) not marked uninformative)" in pooled and cells[3] in pooled  # pooled = easy alone
    main = (tmp_path / "tables/main_m.md").read_text()
    assert "hard (n=200, chance 25.0) (uninformative)" in main and "Avg over the 1 informative task(s)" in main
    findings = (tmp_path / "findings.md").read_text()
    assert "Uninformative at this model size" in findings and "hard (best p" in findings
    # chance in every per-task table and in the leaderboard: from each record's task_info
    sel = [line.split("|") for line in (tmp_path / "tables/selection.md").read_text().splitlines()]
    head = [c.strip() for c in sel[4]]
    chances = {row[head.index("task")].strip(): row[head.index("chance")].strip() for row in sel[6:]}
    assert chances == {"easy": "0.5000", "hard": "0.2500"}
    import pandas as pd

    lb = pd.read_csv(tmp_path / "leaderboard.csv")
    assert dict(lb.groupby("task")["chance"].first()) == {"easy": 0.5, "hard": 0.25}


def test_edge_and_bound_marks(tmp_path):
    make_v2(tmp_path, seeds=(0,))
    build_report(tmp_path, plots=False)
    main = (tmp_path / "tables/main_m.md").read_text()
    assert "(n=1)†" in main  # 1e-3, the top of {1e-4, 3e-4, 1e-3}, was selected
    sel = (tmp_path / "tables/selection.md").read_text()
    assert "| m | easy | lora | 0.001 | 0.0001, 0.0003, 0.001 | high |" in sel

    # the same grid with the documented bound at 1e-3: at bound
    bound = tmp_path / "bound"
    rng = np.random.default_rng(3)
    for lr in LRS:
        ResultStore(bound).write(v2_record("m", "t", "lora", lr, 0, _bits(rng, np.full(100, 0.8)),
                                           val=lr * 100, lr_bounds=[1e-5, 1e-3]))
    build_report(bound, plots=False)
    assert "| high (at bound) |" in (bound / "tables/selection.md").read_text()
    assert "(n=1)‡" in (bound / "tables/main_m.md").read_text()

    # an interior optimum carries no mark
    inner = tmp_path / "inner"
    for lr in LRS:
        ResultStore(inner).write(v2_record("m", "t", "lora", lr, 0, _bits(rng, np.full(100, 0.8)),
                                           val=0.9 if lr == 3e-4 else 0.5))
    build_report(inner, plots=False)
    assert "| m | t | lora | 0.0003 | 0.0001, 0.0003, 0.001 | — |" in (inner / "tables/selection.md").read_text()


def test_collapsed_runs_counted_never_selected(tmp_path):
    rng = np.random.default_rng(4)
    bad = [v2_record("m", "easy", "lora", 3e-3, s, _bits(rng, np.full(600, 0.5)), val=0.99, status="collapsed")
           for s in (0, 1)]
    bad.append(v2_record("m", "easy", "lora", 1e-2, 0, _bits(rng, np.full(600, 0.5)), val=0.99, status="diverged"))
    make_v2(tmp_path, extra=bad)
    build_report(tmp_path, plots=False)
    main = (tmp_path / "tables/main_m.md").read_text()
    lora = next(line for line in main.splitlines() if line.startswith("| lora "))
    assert "[2 collapsed, 1 diverged]" in lora
    sel = (tmp_path / "tables/selection.md").read_text()
    row = next(line for line in sel.splitlines() if line.startswith("| m | easy | lora "))
    assert "| 0.001 |" in row and "2 collapsed, 1 diverged" in row  # higher validation, but never selectable


def test_bad_record_files_skipped(tmp_path, capsys):
    make_v2(tmp_path, seeds=(0,))
    runs = tmp_path / "runs"
    (runs / "empty.json").write_text("[]")
    (runs / "null.json").write_text("null")
    (runs / "trunc.json").write_text('{"run_id": "x", "config": {"model"')
    build_report(tmp_path, plots=False)
    err = capsys.readouterr().err
    for name in ("empty.json", "null.json", "trunc.json"):
        assert f"report: skipping {runs / name}" in err
    assert (tmp_path / "tables/main_m.md").exists()


def test_readme_section_and_determinism(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_v2(a)
    make_v2(b, order=-1)
    readme = tmp_path / "README.md"
    readme.write_text("# X\n\nintro\n<!-- results:start -->\nold numbers 12.3\n<!-- results:end -->\n\nrest\n")
    build_report(a, plots=False, readme=readme)
    text = readme.read_text()
    assert "old numbers" not in text and text.startswith("# X\n\nintro\n<!-- results:start -->\n")
    assert text.endswith("<!-- results:end -->\n\nrest\n") and "tables/main_m.md" in text and "bootstrap" in text
    files = ["leaderboard.csv", "findings.md", "tables/main_m.md", "tables/paired_m.md", "tables/selection.md"]
    first = {f: (a / f).read_bytes() for f in files}
    build_report(a, plots=False, readme=readme)
    assert readme.read_text() == text  # rebuilt: same section
    build_report(b, plots=False)
    assert {f: (b / f).read_bytes() for f in files} == first  # other write order: byte-identical
    bad = tmp_path / "NOMARK.md"
    bad.write_text("no markers")
    with pytest.raises(ValueError, match="NOMARK.md: needs one '<!-- results:start -->'"):
        build_report(a, plots=False, readme=bad)


def test_per_example_mismatch_falls_back_to_t(tmp_path):
    """Runs scored on different test examples cannot be paired by position: t interval, said so."""
    recs = make_v2(tmp_path, seeds=(0, 1, 2))
    for r in recs:
        if r["config"]["method"] == "nalora" and r["config"]["task"] == "easy" and r["config"]["seed"] == 1:
            r["per_example"]["test"]["ids_sha256"] = "other"
            ResultStore(tmp_path).write(r)
    build_report(tmp_path, plots=False)
    paired = (tmp_path / "tables/paired_m.md").read_text()
    row = next(line for line in paired.splitlines() if line.startswith("| nalora | easy"))
    assert "| t (per-example results on different test examples) |" in row
    assert json.loads((tmp_path / "runs" / f"{recs[0]['run_id']}.json").read_text())["per_example"]


def test_runs_judged_by_an_older_collapse_rule_are_named_not_rejudged(tmp_path):
    """A record keeps the status its collapse rule gave; findings say how many were judged by rule v1."""
    from benchmarks.runner.health import assess

    rng = np.random.default_rng(5)
    v1 = v2_record("m", "easy", "lora", 3e-3, 0, _bits(rng, np.full(600, 0.25)), val=0.25)
    v1["health"] = {"collapsed": False, "reasons": [], "rule": {"top_share": 0.9, "alpha": 0.05, "loss_tol": 0.05}}
    v2 = v2_record("m", "easy", "lora", 1e-2, 0, _bits(rng, np.full(600, 0.25)), val=0.25)
    v2["health"] = assess(val_metrics={"acc": 0.25}, selection_metric="acc", chance={"acc": 0.5}, per_example=None)
    make_v2(tmp_path, seeds=(0,), extra=[v1, v2])
    build_report(tmp_path, plots=False)
    text = (tmp_path / "findings.md").read_text()
    assert "1 of these runs were judged by an older collapse rule" in text and "keep that status" in text


def test_mechanism_controls_compared_with_nalora(tmp_path):
    """NA-LoRA minus each mechanism control (what the part the control removes is worth): a control that equals
    LoRA is below NA-LoRA by NA-LoRA's margin (interval excludes 0, sign right); a control that equals NA-LoRA
    is not resolved from it; an option ablation is no mechanism control; the findings say both."""
    rng = np.random.default_rng(1)
    n = 600
    p_item = rng.uniform(0.4, 1.0, n)
    recs = []
    for seed in range(5):
        for lr in LRS:
            val = {1e-4: 0.6, 3e-4: 0.65, 1e-3: 0.7}[lr]
            base = _bits(rng, p_item)
            better = base | _bits(rng, np.full(n, 0.2))
            recs += [v2_record("m", "easy", "lora", lr, seed, base, val=val),
                     v2_record("m", "easy", "nalora", lr, seed, better, val=val + 0.01),
                     # LoRA's answers: what NA-LoRA adds is all in the part this control removes
                     v2_record("m", "easy", "lora_gate_scaled", lr, seed, base, val=val),
                     # drawn as NA-LoRA's are: the part this control removes does nothing
                     v2_record("m", "easy", "nalora_random_mask", lr, seed, base | _bits(rng, np.full(n, 0.2)),
                               val=val + 0.01)]
            abl = v2_record("m", "easy", "nalora-rho0.75", lr, seed, better, val=val)
            abl["config"]["base_method"] = "nalora"
            abl["meta"]["ablation"] = True
            recs.append(abl)
    store = ResultStore(tmp_path)
    for r in recs:
        store.write(r)
    build_report(tmp_path, plots=False)
    table = (tmp_path / "tables/mechanism_m.md").read_text()

    def row(control: str) -> list[str]:
        line = next(x for x in table.splitlines() if x.startswith(f"| {control} |") and "| easy" in x)
        return [c.strip() for c in line.strip("|").split("|")]

    scaled, random_mask = row("lora_gate_scaled"), row("nalora_random_mask")
    lo, hi = (float(x) for x in scaled[5].strip("[]").split(","))
    assert float(scaled[4]) > 0 and lo > 0 and scaled[8] == "yes" and "step scaling" in scaled[1]
    assert random_mask[8] == "no" and "channel choice" in random_mask[1]
    assert "nalora-rho0.75" not in table and "| nalora |" not in table
    findings = (tmp_path / "findings.md").read_text()
    assert "nalora minus lora_gate_scaled" in findings and "nalora above lora_gate_scaled" in findings
    assert "nalora minus nalora_random_mask" in findings
