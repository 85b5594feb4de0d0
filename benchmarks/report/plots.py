"""PNG plots (matplotlib Agg) from the leaderboard and the run JSONs.

- ``pareto_<model>.png``: average test score vs trainable parameters, Pareto front drawn.
- ``curves_<model>_<task>.png``: training loss and validation score over steps (selected lr, mean over seeds).
- ``mask_dynamics.png``: NA-LoRA kept fraction, turnover and regime occupancy over steps.
- ``misalignment.png``: the selection-misalignment diagnostic per method (mean over selected runs).
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from benchmarks.report.tables import _safe  # noqa: E402

REGIMES = ["suppressed", "selecting", "linear"]
SAVE = {"dpi": 120, "metadata": {"Software": None}}  # no version stamp: same data -> same bytes where possible


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, **SAVE)
    plt.close(fig)
    tmp.replace(path)
    return path


def pareto(lb: pd.DataFrame, out_dir: Path) -> list[Path]:
    paths = []
    sel = lb[lb["selected"] & (lb["status"] == "ok") & ~lb["ablation"]]
    for model, df in sel.groupby("model", sort=True):
        ntasks = df["task"].nunique()
        per = df.groupby(["method", "task"])[["test_score", "trainable_params"]].mean().reset_index()
        agg = per.groupby("method").agg(score=("test_score", "mean"), params=("trainable_params", "mean"), n=("task", "count"))
        agg = agg[agg["n"] == ntasks].dropna()  # only methods with every task: averages must be comparable
        if agg.empty:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.scatter(agg["params"], agg["score"])
        for m, r in agg.iterrows():
            ax.annotate(m, (r["params"], r["score"]), fontsize=8, xytext=(3, 3), textcoords="offset points")
        front, best = [], -math.inf
        for m, r in agg.sort_values(["params", "score"], ascending=[True, False]).iterrows():
            if r["score"] > best:
                front.append((r["params"], r["score"]))
                best = r["score"]
        # markers too: a front of one point (one method best at the smallest size) draws no line
        ax.plot(*zip(*front), "--o", color="gray", mfc="none", ms=11, label="Pareto front")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel(f"mean test {df['report_metric'].iloc[0]} over {ntasks} task(s)")
        ax.set_title(f"{model}: score vs trainable parameters")
        ax.legend()
        paths.append(_save(fig, out_dir / f"pareto_{_safe(model)}.png"))
    return paths


def _mean_curve(series: list[list[list[float]]]) -> tuple[list[float], list[float]]:
    by_step: dict[float, list[float]] = defaultdict(list)
    for s in series:
        for step, v in s:
            if v is not None:
                by_step[step].append(v)
    steps = sorted(by_step)
    return steps, [sum(by_step[s]) / len(by_step[s]) for s in steps]


def curves(records: list[dict], selected: set[str], out_dir: Path) -> list[Path]:
    groups: dict[tuple[str, str], dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r["run_id"] in selected and r.get("status") == "ok" and not r.get("meta", {}).get("ablation"):
            groups[(r["config"]["model"], r["config"]["task"])][r["config"]["method"]].append(r)
    paths = []
    for (model, task), by_method in sorted(groups.items()):
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
        metric = None
        for method in sorted(by_method):
            recs = by_method[method]
            a1.plot(*_mean_curve([r["history"].get("train_loss", []) for r in recs]), label=method)
            metric = recs[0].get("task_info", {}).get("selection_metric", "acc")
            val = [[[s, m.get(metric)] for s, m in r["history"].get("validation", [])] for r in recs]
            a2.plot(*_mean_curve(val), marker="o", label=method)
        a1.set(xlabel="optimiser step", ylabel="training loss", title=f"{task}: training loss")
        a2.set(xlabel="optimiser step", ylabel=f"validation {metric}", title=f"{task}: validation")
        a1.legend(fontsize=7)
        paths.append(_save(fig, out_dir / f"curves_{_safe(model)}_{_safe(task)}.png"))
    return paths


def history_series(history: Any) -> dict[str, tuple[list[float], list[float]]]:
    """Numeric series from a controller history: ``{name: (steps, values)}``.

    Accepts a list of per-refresh dicts (``step`` plus numbers, per-layer lists averaged, nested
    dicts flattened as ``outer.inner``; entries with a ``layer`` key are averaged per step) or a dict
    of lists with a ``step`` list.
    """
    if isinstance(history, dict) and isinstance(history.get("step"), list):
        n = len(history["step"])
        history = [{k: v[i] for k, v in history.items() if isinstance(v, list) and len(v) == n} for i in range(n)]
    if not isinstance(history, list):
        return {}
    acc: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))

    def add(prefix: str, value: Any, step: float) -> None:
        if isinstance(value, bool) or value is None:
            return
        if isinstance(value, (int, float)):
            if math.isfinite(value):
                acc[prefix][step].append(float(value))
        elif isinstance(value, list) and value and all(isinstance(x, list) for x in value):
            # per layer x component (e.g. occupancy [layer][supp, sel, lin]): mean over layers per component
            width = max(len(x) for x in value)
            names = REGIMES if prefix.endswith("occupancy") and width == 3 else [str(j) for j in range(width)]
            for j in range(width):
                add(f"{prefix}.{names[j]}", [x[j] for x in value if len(x) > j], step)
        elif isinstance(value, list):
            nums = [float(x) for x in value if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)]
            if nums:  # per-layer values (NaN/None where not applicable are left out)
                acc[prefix][step].append(sum(nums) / len(nums))
        elif isinstance(value, dict):
            for k, v in value.items():
                add(f"{prefix}.{k}" if prefix else str(k), v, step)

    for i, entry in enumerate(history):
        if not isinstance(entry, dict):
            continue
        step = entry.get("step", i)
        for k, v in entry.items():
            if k not in ("step", "layer", "layer_index"):
                add(k, v, step)
    return {k: (sorted(d), [sum(d[s]) / len(d[s]) for s in sorted(d)]) for k, d in sorted(acc.items())}


def mask_dynamics(records: list[dict], selected: set[str], out_dir: Path) -> list[Path]:
    """One panel per series of the controller history (mean over the selected NA-LoRA runs and tasks)."""
    per_method: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        hist = (r.get("nalora") or {}).get("history")
        if r["run_id"] in selected and r.get("status") == "ok" and hist:
            for name, (steps, vals) in history_series(hist).items():
                per_method[r["config"]["method"]][name].append(list(zip(steps, vals)))
    names = sorted({n for d in per_method.values() for n in d})
    if not names:
        return []
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    # one colour per method in every panel (a method missing from a panel, e.g. no gamma without step
    # scaling, must not shift the others' colours), and one legend for the figure
    methods = sorted(per_method)
    color = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    for ax, name in zip(axes.flat, names):
        for method in methods:
            if name in per_method[method]:
                ax.plot(*_mean_curve(per_method[method][name]), color=color[method], label=method)
        ax.set(title=name, xlabel="optimiser step")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=color[m], label=m) for m in methods]
    fig.legend(handles=handles, loc="lower right", fontsize=8, ncol=2)
    fig.suptitle("NA-LoRA mask dynamics (mean over selected runs)")
    fig.tight_layout()
    return [_save(fig, out_dir / "mask_dynamics.png")]


def misalignment(records: list[dict], selected: set[str], out_dir: Path) -> list[Path]:
    vals: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        d = ((r.get("diagnostics") or {}).get("selection_misalignment")) or {}
        if r["run_id"] in selected and r.get("status") == "ok" and "error" not in d:
            for k, v in d.items():
                if k in ("pairs", "tokens", "n"):  # counts, not diagnostics
                    continue
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    vals[k][r["config"]["method"]].append(float(v))
    if not vals:
        return []
    keys = sorted(vals)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.5), squeeze=False)
    for ax, k in zip(axes.flat, keys):
        methods = sorted(vals[k])
        ax.bar(methods, [sum(vals[k][m]) / len(vals[k][m]) for m in methods])
        ax.set_title(k)
        ax.tick_params(axis="x", rotation=45, labelsize=7)
    fig.suptitle("selection misalignment on held-out batches (mean over selected runs)")
    fig.tight_layout()
    return [_save(fig, out_dir / "misalignment.png")]


def write_plots(lb: pd.DataFrame, records: list[dict], out_dir: str | Path) -> list[Path]:
    out_dir = Path(out_dir)
    selected = set(lb.loc[lb["selected"], "run_id"])
    paths = pareto(lb, out_dir) if len(lb) else []
    paths += curves(records, selected, out_dir)
    paths += mask_dynamics(records, selected, out_dir)
    paths += misalignment(records, selected, out_dir)
    return paths
