"""Report tests on synthetic run JSONs (no training): determinism, selection, tables, CI, plots."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from benchmarks.runner.grid import run_id
from benchmarks.runner.record import LEADERBOARD_COLUMNS, make_record
from benchmarks.runner.store import ResultStore

METHODS = ["lora", "nalora_mask", "nalora_scale", "nalora", "full"]
# test score per (method, lr): only the validation decides which lr is reported.
VAL = {1e-4: 0.60, 1e-3: 0.70}  # 1e-3 wins on validation for every method
TEST = {1e-4: 0.90, 1e-3: 0.50}  # ... but 1e-4 would look better on test: it must NOT be reported
BONUS = {"lora": 0.0, "nalora_mask": 0.01, "nalora_scale": 0.02, "nalora": 0.03, "full": 0.04, "nalora-rho0.25": 0.005}


def _record(model, task, method, lr, seed, *, phase="main", status="ok", ablation=False):
    config = {"model": model, "task": task, "method": method, "base_method": method.split("-")[0], "seed": seed,
              "lr": lr, "adapter": {"targets": ["gate", "up", "down"], "rank": 8, "alpha": 16, "dropout": 0.0},
              "options": {"rho_final": 0.25} if ablation else {}, "training": {"steps": 10, "batch_size": 4, "grad_accum": 1}}
    b = BONUS[method] + 0.01 * seed + (0.1 if task == "t2" else 0.0)
    result = {
        "metrics": {"validation": {"acc": VAL[lr] + b}, "test": {"acc": TEST[lr] + b}},
        "history": {"train_loss": [[1, 2.0 - seed * 0.1], [2, 1.5]], "validation": [[2, {"acc": VAL[lr] + b}]]},
        "trainable_params": 10**6 if method == "full" else 1000 + 10 * len(method),
        "total_params": 10**6,
        "perf": {"wall_s": 1.0, "step_time_s": 0.1, "units_per_s": 100.0, "unit": "tokens", "peak_gpu_mem_mib": None},
        "diagnostics": {"selection_misalignment": {"mean_abs_ds": 0.01 * (1 + METHODS.index(method) if method in METHODS else 1),
                                                   "regime_flip_fraction": 0.001}, "source": "validation"},
    }
    if method.startswith("nalora"):
        result["nalora"] = {"history": [
            {"step": s, "layer": layer, "kept_fraction": 1.0 - 0.05 * s, "turnover": 0.1,
             "occupancy": {"suppressed": 0.2, "selecting": 0.5, "linear": 0.3}}
            for s in (10, 20) for layer in (0, 1)]}
    meta = {"suite": "synthetic", "phase": phase, "family": "llm", "lr_grid": [1e-3] if ablation else [1e-4, 1e-3],
            "seeds": [0, 1, 2], "lr_grid_reason": "",
            "ablation": ablation}
    info = {"metrics": {"acc": True}, "selection_metric": "acc", "report_metric": "acc", "protocol": "synthetic"}
    if status != "ok":
        return make_record(config, meta, run_id(config), status="failed", task_info=info,
                           error={"type": "exception", "message": "boom", "traceback": ""})
    return make_record(config, meta, run_id(config), status="ok", task_info=info, result=result,
                       provenance={"git": {"commit": "abc"}, "hardware": {"gpu": None}})


def make_results(root, order=1):
    store = ResultStore(root)
    recs = [_record("m", task, method, lr, seed) for task in ("t1", "t2") for method in METHODS
            for lr in (1e-4, 1e-3) for seed in (0, 1, 2)]
    recs += [_record("m", t, "nalora-rho0.25", 1e-3, s, ablation=True) for t in ("t1", "t2") for s in (0, 1, 2)]
    recs.append(_record("m", "t3", "lora", 1e-3, 0, status="failed"))
    for r in recs[::order]:  # write order must not matter
        store.write(r)
    # tuning runs live apart and never reach the leaderboard
    ResultStore(root, "tune").write(_record("m", "dev", "nalora", 1e-3, 0, phase="tune"))
    return recs


def report(root, plots=False):
    from benchmarks.report.cli import build_report

    return build_report(root, plots=plots)


def snapshot(root):
    files = [root / "leaderboard.csv", root / "findings.md", *sorted((root / "tables").glob("*.md"))]
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def test_report_is_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_results(a, order=1)
    make_results(b, order=-1)
    report(a)
    first = snapshot(a)
    report(a)
    assert snapshot(a) == first  # same JSONs, rebuilt: byte-identical
    report(b)
    assert snapshot(b) == first  # same JSONs written in another order: byte-identical
    assert {"leaderboard.csv", "tables/main_m.md", "tables/ablation_m.md", "tables/paired_m.md", "tables/selection.md"} <= set(first)


def test_leaderboard_columns_and_selection(tmp_path):
    make_results(tmp_path)
    report(tmp_path)
    df = pd.read_csv(tmp_path / "leaderboard.csv")
    assert list(df.columns) == LEADERBOARD_COLUMNS
    assert len(df) == 2 * 5 * 2 * 3 + 6 + 1 and "dev" not in set(df["task"])
    ok = df[df["status"] == "ok"]
    assert set(ok.loc[ok["selected"], "lr"]) == {1e-3} and not ok.loc[~ok["selected"], "lr"].eq(1e-3).any()
    failed = df[df["status"] == "failed"].iloc[0]
    assert failed["error_type"] == "exception" and not failed["selected"]


def test_main_table_reports_test_of_validation_choice(tmp_path):
    make_results(tmp_path)
    report(tmp_path)
    text = (tmp_path / "tables/main_m.md").read_text()
    lora = next(line for line in text.splitlines() if line.startswith("| lora "))
    cells = [c.strip() for c in lora.strip("|").split("|")]
    # lr 1e-3 selected: test 0.50 + seeds 0/.01/.02 -> mean 51.0, std 1.0; t2 adds 10 points.
    # 1e-3 is the top of the lrs run {1e-4, 1e-3}: edge-marked
    assert cells[1] == "51.0 ± 1.0 (n=3)†" and cells[2] == "61.0 ± 1.0 (n=3)†"
    # t3: one failed run, lr 1e-4 of its grid never ran: still running (◊), out of Avg
    assert cells[3] == "no ok run◊ [1 failed]" and cells[4] == "56.00"
    assert "Avg over the 2 informative task(s) where every listed method's grid finished (left out: t3)" in text
    full = next(line for line in text.splitlines() if line.startswith("| full "))
    assert full.split("|")[6].strip() == "1"  # best Avg -> rank 1
    assert "nalora-rho0.25" not in text and "nalora_mask" not in text  # ablations/controls: ablation table only
    ab = (tmp_path / "tables/ablation_m.md").read_text()
    assert "nalora-rho0.25" in ab and "| nalora | 54.0 ± 1.0 (n=3)† | 64.0 ± 1.0 (n=3)† | — | 59.00 |" in ab
    sel = (tmp_path / "tables/selection.md").read_text()
    assert "| m | t1 | lora | 0.001 | 0.0001, 0.001 | high |" in sel


def test_paired_ci(tmp_path):
    from benchmarks.report.tables import paired_ci

    mean, lo, hi = paired_ci([1.0, 2.0, 3.0])  # sd 1, t(0.975, 2) = 4.303
    assert mean == 2.0 and lo == pytest.approx(2 - 4.303 / math.sqrt(3)) and hi == pytest.approx(2 + 4.303 / math.sqrt(3))
    assert math.isnan(paired_ci([1.0])[1])
    make_results(tmp_path)
    report(tmp_path)
    text = (tmp_path / "tables/paired_m.md").read_text()
    # old records (no per-example results): seed-level t interval; nalora - lora = +3 points on every seed
    # these records carry no chance level: the header says so instead of leaving it out
    assert "| nalora | t1 (chance —) | 3 | +3.00 | [3.00, 3.00] | t | 0.00 | yes |" in text


def test_plots_written(tmp_path):
    from benchmarks.report.plots import history_series

    make_results(tmp_path)
    out = report(tmp_path, plots=True)
    names = sorted(p.name for p in out["plots"])
    assert names == ["curves_m_t1.png", "curves_m_t2.png", "mask_dynamics.png", "misalignment.png", "paired_m.png",
                     "pareto_m.png"]
    assert (tmp_path / "index.html").exists()
    for p in out["plots"]:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    series = history_series(_record("m", "t1", "nalora", 1e-3, 0)["nalora"]["history"])
    assert series["kept_fraction"] == ([10, 20], [0.5, 0.0]) and "occupancy.selecting" in series


def test_report_without_runs_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no run results in"):
        report(tmp_path / "nothing")


def test_stale_tables_removed(tmp_path):
    make_results(tmp_path)
    report(tmp_path)
    (tmp_path / "tables/main_old-model.md").write_text("stale")
    report(tmp_path)
    assert not (tmp_path / "tables/main_old-model.md").exists()


def test_plots_keep_points_and_lines_apart_and_show_seed_spread(tmp_path, monkeypatch):
    """Issue 14's plot complaints: Pareto labels piled on one point, clipped x label / wide margins, identical
    curves hiding each other, no seed spread. Checked on the figures themselves before they are saved."""
    import json

    from matplotlib.container import ErrorbarContainer

    from benchmarks.report import plots

    figs: dict[str, object] = {}
    real_save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: (figs.setdefault(path.name, fig), real_save(fig, path))[1])
    make_results(tmp_path)
    for p in (tmp_path / "runs").glob("*.json"):  # LoRA and NA-LoRA train the same parameters: one x on the plot
        rec = json.loads(p.read_text())
        if rec.get("trainable_params") and rec["config"]["method"] in ("lora", "nalora"):
            p.write_text(json.dumps({**rec, "trainable_params": 1000}))
    report(tmp_path, plots=True)
    assert plots.SAVE["bbox_inches"] == "tight"  # the saved image is cut to its content: no clipped label, no margin
    ax = figs["pareto_m.png"].axes[0]
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    xs = [float(c.lines[0].get_xdata()[0]) for c in bars]
    assert len(bars) >= 3 and len(set(xs)) == len(xs)  # equal parameter counts (lora, nalora) spread apart
    assert all(c.has_yerr for c in bars)  # 3 seeds: error bars of the seed spread
    assert not ax.texts and any("seeds=3" in t.get_text() for t in ax.get_legend().get_texts())  # legend, not labels
    curves = figs["curves_m_t1.png"].axes[1]
    marks = [(line.get_marker(), line.get_color()) for line in curves.get_lines() if line.get_label()[:1] != "_"]
    assert len(marks) >= 2 and len(set(marks)) == len(marks)  # own marker per method: identical lines stay visible
    assert curves.collections  # seed band (min..max) behind each curve


def test_superseded_records_of_a_cell_are_left_out(tmp_path, capsys):
    """A cell trained again under a new configuration (a default changed) is reported from the newest
    configuration only: the older one's records at the same lr and seed, and at lrs the new one never ran, are left out."""
    make_results(tmp_path)
    new = _record("m", "t1", "lora", 1e-3, 0)
    new["provenance"]["finished_at"] = "2001-01-01T00:00:00"
    ResultStore(tmp_path).write(new)  # the same run, now with its finishing time
    report(tmp_path)
    before = snapshot(tmp_path)
    olds = []
    for lr in (1e-3, 3e-3):  # 3e-3: an lr only the older configuration ran (e.g. an extension round)
        old = _record("m", "t1", "lora", 1e-3, 0)
        old["config"]["lr"] = lr
        old["config"]["training"]["curve_limit"] = 3  # another configuration of the same cell
        old["run_id"] = run_id(old["config"])
        old["provenance"]["finished_at"] = "2000-01-01T00:00:00"  # finished before the other ones
        old["metrics"]["validation"]["acc"] = 0.99  # would change the selection if it were read
        ResultStore(tmp_path).write(old)
        olds.append(old["run_id"])
    capsys.readouterr()
    report(tmp_path)
    err = capsys.readouterr().err
    assert "2 record(s) of an older configuration" in err and all(i in err for i in olds)
    assert snapshot(tmp_path) == before


def _curve_record(method: str, training: dict, validation: list) -> dict:
    """The fields ``plots.curves`` reads, for a run whose validation history is ``validation``."""
    return {"run_id": method, "status": "ok", "meta": {}, "task_info": {"selection_metric": "acc"},
            "config": {"model": "m", "task": "t", "method": method, "training": training},
            "history": {"train_loss": [[1, 2.0], [20, 1.0]], "validation": validation}}


def test_curves_keep_the_final_validation_on_all_examples_off_the_subset_curve(tmp_path, monkeypatch):
    """With curve_limit the final point (all eval_limit examples) is not the curve's last point: drawn apart with
    its own legend entry. Without it, or when the points' n agree, the curve keeps every point."""
    from benchmarks.report import plots

    subset = [[5, {"acc": 0.50}], [10, {"acc": 0.55}], [15, {"acc": 0.60}]]
    limited = _curve_record("lora", {"eval_limit": 96, "curve_limit": 32}, subset + [[20, {"acc": 0.90}]])
    assert plots.validation_split(limited, "acc") == ([[5, 0.50], [10, 0.55], [15, 0.60]], [[20, 0.90]])
    full = _curve_record("lora", {"eval_limit": 96, "curve_limit": None}, subset + [[20, {"acc": 0.90}]])
    assert plots.validation_split(full, "acc") == ([[5, 0.50], [10, 0.55], [15, 0.60], [20, 0.90]], [])
    # points that carry n decide over the config: n equal (the split is smaller than both limits) -> one curve
    with_n = [[s, {**m, "n": 20.0}] for s, m in subset + [[20, {"acc": 0.90}]]]
    assert plots.validation_split(_curve_record("lora", limited["config"]["training"], with_n), "acc")[1] == []
    with_n[-1][1]["n"] = 96.0
    assert plots.validation_split(_curve_record("lora", full["config"]["training"], with_n), "acc")[1] == [[20, 0.90]]

    figs: dict[str, object] = {}
    monkeypatch.setattr(plots, "_save", lambda fig, path: figs.setdefault(path.name, fig) and path)
    plots.curves([limited], {"lora"}, tmp_path)
    ax = figs["curves_m_t.png"].axes[1]
    curve = next(line for line in ax.get_lines() if line.get_label().startswith("lora"))
    assert list(curve.get_ydata()) == [0.50, 0.55, 0.60]  # no jump to 0.90 from the subset change
    assert any(list(line.get_ydata()) == [0.90] and line.get_marker() == "d" for line in ax.get_lines())
    assert any("final validation, all examples" in t.get_text() for t in ax.get_legend().get_texts())
    figs.clear()
    plots.curves([full], {"lora"}, tmp_path)
    ax = figs["curves_m_t.png"].axes[1]
    assert list(next(line for line in ax.get_lines() if line.get_label().startswith("lora")).get_ydata())[-1] == 0.90
    assert not any("final validation" in t.get_text() for t in ax.get_legend().get_texts())


def test_lr_table_counts_every_run_per_lr(tmp_path):
    make_results(tmp_path)
    report(tmp_path)
    text = (tmp_path / "tables/lrs.md").read_text()
    # lora on t1 at 1e-4: three ok seeds, validation 0.60 + 0/.01/.02 -> mean 0.61
    assert "| m | t1 | lora | 0.0001 | 3 | 3 | — | 0.6100 |" in text
    assert "| m | t3 | lora | 0.001 | 1 | 0 | 1 failed | — |" in text  # a failed run is counted, never averaged


def test_runs_line_gives_the_trained_share_per_family():
    from benchmarks.report.findings import _trained_share

    recs = [_record("m", "t1", "lora", 1e-3, s) for s in range(4)] + [_record("m", "t3", "lora", 1e-3, 0, status="failed")]
    recs[0]["status"] = "collapsed"
    vlm = _record("v", "t1", "lora", 1e-4, 0)
    vlm["meta"]["family"] = "vlm"
    # failed runs are infrastructure, not training outcomes: left out of the share
    assert _trained_share(recs + [vlm]) == " (trained without collapse or divergence: llm 3 of 4, 75.0%, vlm 1 of 1, 100.0%)"


def test_cell_with_holes_in_its_grid_is_provisional(tmp_path):
    """A slice that stopped mid-grid: LoRA's t1 lacks seed 2 at lr 1e-3 and lr 1e-4 entirely. The cell is
    marked ◊, its holes listed, and it is left out of the Avg and of every paired comparison until they are run."""
    store = ResultStore(tmp_path)
    for r in make_results(tmp_path / "full"):
        c = r["config"]
        if (c["task"], c["method"]) == ("t1", "lora") and (c["lr"] == 1e-4 or c["seed"] == 2):
            continue
        store.write(r)
    report(tmp_path)
    main = (tmp_path / "tables/main_m.md").read_text()
    lora = next(line for line in main.splitlines() if line.startswith("| lora "))
    assert "| 50.5 ± 0.7 (n=2)◊ |" in lora  # seeds 0, 1 at 1e-3; no edge mark: 1e-3 is the only lr run
    # a seed missing at every lr is found from meta.seeds (the cell's seeds, recorded by the runner)
    assert "Avg over the 1 informative task(s) where every listed method's grid finished (left out: t1, t3)" in main
    sel = (tmp_path / "tables/selection.md").read_text()
    assert "| lr 0.0001: not run; lr 0.001: seeds 2 |" in sel
    paired = (tmp_path / "tables/paired_m.md").read_text()
    rows = [line for line in paired.splitlines() if line.startswith("| nalora ")]
    assert rows and all("| t1 " not in line for line in rows) and any("| t2 " in line for line in rows)
    findings = (tmp_path / "findings.md").read_text()
    assert "Grid still running in 2 of" in findings and "t1/lora (lr 0.0001: not run; lr 0.001: seeds 2)" in findings


def test_cell_with_a_failed_run_is_provisional_until_it_is_rerun(tmp_path):
    """One of LoRA's t1 runs ran out of memory: the cell is ◊ (the runner's lr rule waits for the rerun), the
    selection table says why, and no paired comparison uses it."""
    store = ResultStore(tmp_path)
    for r in make_results(tmp_path / "full"):
        c = r["config"]
        if (c["task"], c["method"], c["seed"], c["lr"]) == ("t1", "lora", 2, 1e-4):
            r["status"], r["error"] = "failed", {"type": "oom", "message": "CUDA out of memory"}
        store.write(r)
    report(tmp_path)
    sel = (tmp_path / "tables/selection.md").read_text()
    assert "1 run(s) failed (oom): to rerun (--retry-failed) before the lr rule judges the cell" in sel
    paired_md = tmp_path / "tables/paired_m.md"
    paired = paired_md.read_text() if paired_md.exists() else ""
    assert not any(line.startswith("| nalora | t1") for line in paired.splitlines())


@pytest.mark.parametrize("bounds, provisional", [((1e-5, 1e-2), True), ((1e-5, 1e-3), False)])
def test_edge_short_of_the_bound_is_provisional(tmp_path, bounds, provisional):
    """Every cell selects lr 1e-3, the top of {1e-4, 1e-3}. With bounds up to 1e-2 the extension rule still has
    lr 3e-3 to run (the runner's own ``next_lr``): every cell is provisional (◊), listed with that lr, and nothing
    is compared. With the bound at 1e-3 the edge is the bound (‡): the cells are finished and compared."""
    store = ResultStore(tmp_path)
    for r in make_results(tmp_path / "full"):
        if r["config"]["task"] != "t3":
            r["meta"]["lr_bounds"] = list(bounds)
            store.write(r)
    report(tmp_path)
    main = (tmp_path / "tables/main_m.md").read_text()
    lora = next(line for line in main.splitlines() if line.startswith("| lora "))
    sel = (tmp_path / "tables/selection.md").read_text()
    paired_md = tmp_path / "tables/paired_m.md"  # written only when some pair is compared
    paired = paired_md.read_text() if paired_md.exists() else ""
    compared = any(line.startswith("| nalora | t1") for line in paired.splitlines())
    if provisional:
        assert "| 51.0 ± 1.0 (n=3)†◊ |" in lora and "| — | — |" in lora  # no Avg, no Rank
        assert "lr 0.003: extension not run (best lr at the high edge)" in sel
        assert not compared
    else:
        assert "| 51.0 ± 1.0 (n=3)‡ |" in lora and "extension not run" not in sel
        assert compared


def test_run_time_line_gives_each_task_its_median_and_evaluation_share():
    from benchmarks.report.findings import run_time_line

    recs = [_record("m", task, "lora", 1e-3, seed) for task in ("t1", "t2") for seed in (0, 1, 2)]
    assert run_time_line(recs) == ""  # no evaluation timings recorded: no line
    for r, (wall, ev) in zip(recs, [(100, 10), (120, 30), (110, 22), (300, 200), (200, 100), (250, 150)]):
        r["perf"].update(wall_s=float(wall), eval_s=float(ev))
    line = run_time_line(recs)
    assert "t1 on m (CPU): 110 s, evaluation 20% (3 runs)" in line  # shares 10%, 25%, 20%
    assert "t2 on m (CPU): 250 s, evaluation 60% (3 runs)" in line  # shares 67%, 50%, 60%


def test_gpu_time_line_reads_the_ledger(tmp_path):
    import json

    from benchmarks.report.findings import gpu_time_line

    assert gpu_time_line(tmp_path, []) == ""  # a folder from before the ledger: no line
    (tmp_path / "invocations.jsonl").write_text("\n".join(json.dumps(x) for x in [
        {"event": "start", "id": "a", "at": "2026-12-01T00:00:00+00:00", "gpus": ["NVIDIA H200", "NVIDIA H200"]},
        {"event": "end", "id": "a", "at": "2026-12-01T00:30:00+00:00"}]) + "\n")
    recs = [{"provenance": {"finished_at": f"2026-12-01T00:{m:02d}:00+00:00"}} for m in (5, 10, 40)]
    line = gpu_time_line(tmp_path, recs)
    assert line.startswith("GPU time: 1.00 GPU-hours (wall time x GPUs) in 1 grid invocation(s) on NVIDIA H200")
    assert "2 of the 3 reported runs finished inside them, 2 runs per GPU-hour" in line
