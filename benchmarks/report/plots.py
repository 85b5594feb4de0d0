"""PNG plots (matplotlib Agg) from the leaderboard, the analysis and the run JSONs.

- ``pareto_<model>.png``: mean test score over informative tasks vs trainable parameters, Pareto front drawn,
  seed spread as error bars, one legend entry per method (no labels on top of each other).
- ``paired_<model>.png``: forest plot of every method minus LoRA per task and pooled, with 95% intervals.
- ``curves_<model>_<task>.png``: training loss and validation score over steps (selected lr, mean over seeds,
  band = min..max over seeds), a marker per method so identical lines stay visible. With ``training.curve_limit``
  the final validation (all ``eval_limit`` examples) is an unjoined hollow thin diamond, not the curve's last point.
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

from benchmarks.report.analysis import BASELINE, Analysis, method_order  # noqa: E402
from benchmarks.report.tables import _safe, scale_of  # noqa: E402
from benchmarks.runner.train import curve_examples  # noqa: E402

REGIMES = ["suppressed", "selecting", "linear"]
MARKERS = "osD^v<>phX*P8"
# no version stamp: same data -> same bytes; tight bbox: no clipped axis labels, no wide empty margins
SAVE = {"dpi": 120, "metadata": {"Software": None}, "bbox_inches": "tight", "pad_inches": 0.05}


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, **SAVE)
    plt.close(fig)
    tmp.replace(path)
    return path


def _style(methods: list[str]) -> dict[str, dict]:
    """One colour and marker per method, stable for a given method list."""
    return {m: {"color": f"C{i % 10}", "marker": MARKERS[i % len(MARKERS)]} for i, m in enumerate(methods)}


def pareto(an: Analysis, lb: pd.DataFrame, out_dir: Path) -> list[Path]:
    paths = []
    for model in an.models():
        scale = scale_of(an, model)
        cells = {c.method: c for c in an.cells.values() if c.model == model and not c.is_control}
        # informative tasks with at least one reported result (a task where every run failed has no average)
        tasks = [t for t in an.task_names(model) if an.informative(model, t)
                 and any(an.cells.get((model, t, m)) and an.cells[(model, t, m)].mean is not None for m in cells)]
        pts = {}
        for m, _ in sorted(cells.items()):
            cs = [an.cells.get((model, t, m)) for t in tasks]
            if not tasks or any(c is None or c.mean is None for c in cs):
                continue  # only methods with every task: averages must be comparable
            params = [r.get("trainable_params") for c in cs for r in c.runs.values()]
            params = [p for p in params if isinstance(p, (int, float)) and p > 0]
            if not params:
                continue
            seeds = sorted(set.intersection(*(set(c.runs) for c in cs)))
            per_seed = [sum(c.runs[s]["metrics"]["test"][c.runs[s]["task_info"].get("report_metric", "acc")]
                            for c in cs) / len(cs) * scale for s in seeds]
            sd = (sum((x - sum(per_seed) / len(per_seed)) ** 2 for x in per_seed) / (len(per_seed) - 1)) ** 0.5 \
                if len(per_seed) > 1 else 0.0
            pts[m] = (sum(params) / len(params), sum(c.mean for c in cs) / len(cs) * scale, sd, len(per_seed))
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.2))
        style = _style(sorted(pts))
        # methods with the same parameter count (LoRA variants) would sit on one x: spread them by a few percent
        by_x: dict[float, list[str]] = defaultdict(list)
        for m, (x, *_rest) in sorted(pts.items()):
            by_x[round(math.log10(x), 3)].append(m)
        for group in by_x.values():
            for j, m in enumerate(group):
                x, y, sd, k = pts[m]
                xd = x * 10 ** (0.012 * (j - (len(group) - 1) / 2))
                ax.errorbar(xd, y, yerr=sd if k > 1 else None, fmt=style[m]["marker"], color=style[m]["color"],
                            ms=7, capsize=3, label=f"{m}: {y:.2f}" + (f" ± {sd:.2f} (seeds={k})" if k > 1 else ""))
        front, best = [], -math.inf
        for m, (x, y, _, _) in sorted(pts.items(), key=lambda kv: (kv[1][0], -kv[1][1])):
            if y > best:
                front.append((x, y))
                best = y
        ax.plot(*zip(*front), "--", color="gray", lw=1, label="Pareto front", zorder=0)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log scale; equal counts spread slightly)")
        metric = an.tasks[(model, tasks[0])].metric
        ax.set_ylabel(f"mean test {metric}{' (%)' if scale == 100 else ''}, {len(tasks)} task(s)")
        ax.set_title(f"{model}: score vs trainable parameters (error bars: std over seeds)", fontsize=10)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        paths.append(_save(fig, out_dir / f"pareto_{_safe(model)}.png"))
    return paths


def forest(an: Analysis, out_dir: Path) -> list[Path]:
    """Every method minus LoRA per task and pooled, 95% intervals; a dot alone has no interval."""
    paths = []
    for model in an.models():
        comps = [c for c in an.comparisons if c.model == model]
        if not comps:
            continue
        scale = scale_of(an, model)
        methods = method_order({c.method for c in comps})
        style = _style(methods)
        rows = []  # (label, interval, method, pooled?)
        for m in methods:
            for c in (c for c in comps if c.method == m):
                rows.append((f"{m} · {c.task}" + ("" if an.informative(model, c.task) else " (uninf.)"), c.interval, m, False))
            if (model, m) in an.pooled:
                rows.append((f"{m} · pooled", an.pooled[(model, m)], m, True))
        fig, ax = plt.subplots(figsize=(7, 0.28 * len(rows) + 1.2))
        for i, (label, iv, m, pooled) in enumerate(rows):
            y = len(rows) - 1 - i
            has = math.isfinite(iv.lo) and math.isfinite(iv.hi)
            xerr = [[iv.mean * scale - iv.lo * scale], [iv.hi * scale - iv.mean * scale]] if has else None
            ax.errorbar(iv.mean * scale, y, xerr=xerr, fmt="D" if pooled else "o", color=style[m]["color"],
                        ms=7 if pooled else 5, capsize=3, mfc="white" if not has else style[m]["color"])
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(range(len(rows)), [r[0] for r in reversed(rows)], fontsize=7)
        ax.set_ylim(-0.7, len(rows) - 0.3)
        ax.set_xlabel(f"method minus {BASELINE}, test {'points' if scale == 100 else 'score'} (95% interval)")
        ax.set_title(f"{model}: paired differences vs {BASELINE} (open marker: no interval)", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        paths.append(_save(fig, out_dir / f"paired_{_safe(model)}.png"))
    return paths


def _mean_curve(series: list[list[list[float]]]) -> tuple[list[float], list[float]]:
    steps, mean, _, _ = _band(series)
    return steps, mean


def _band(series: list[list[list[float]]]) -> tuple[list[float], list[float], list[float], list[float]]:
    """Steps, mean, min and max over the series at each step."""
    by_step: dict[float, list[float]] = defaultdict(list)
    for s in series:
        for step, v in s:
            if v is not None:
                by_step[step].append(v)
    steps = sorted(by_step)
    return (steps, [sum(by_step[s]) / len(by_step[s]) for s in steps], [min(by_step[s]) for s in steps],
            [max(by_step[s]) for s in steps])


def validation_split(record: dict, metric: str) -> tuple[list[list[Any]], list[list[Any]]]:
    """A run's validation history as ``(curve, final)`` ``[step, value]`` lists. ``final`` holds the last point
    when it was scored on other examples than the periodic ones (``training.curve_limit`` < ``eval_limit``), so
    the curve does not jump from the subset change; else it is empty and the curve has every point."""
    points = record["history"].get("validation", [])
    series = [[step, m.get(metric)] for step, m in points]
    if len(points) < 2:
        return series, []
    first_n, last_n = points[0][1].get("n"), points[-1][1].get("n")
    if first_n is not None and last_n is not None:  # the points say how many examples they scored
        other = first_n != last_n
    else:
        tr = record["config"].get("training", {})
        other = curve_examples(tr.get("eval_limit"), tr.get("curve_limit")) != tr.get("eval_limit")
    return (series[:-1], series[-1:]) if other else (series, [])


def curves(records: list[dict], selected: set[str], out_dir: Path) -> list[Path]:
    groups: dict[tuple[str, str], dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r["run_id"] in selected and r.get("status") == "ok" and not r.get("meta", {}).get("ablation"):
            groups[(r["config"]["model"], r["config"]["task"])][r["config"]["method"]].append(r)
    paths = []
    for (model, task), by_method in sorted(groups.items()):
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
        metric, has_final = None, False
        style = _style(sorted(by_method))
        for method in sorted(by_method):
            recs = by_method[method]
            st = style[method]
            metric = recs[0].get("task_info", {}).get("selection_metric", "acc")
            loss = [r["history"].get("train_loss", []) for r in recs]
            val, final = zip(*(validation_split(r, metric) for r in recs))
            steps, mean, lo, hi = _band(list(final))
            if steps:  # the final validation on all examples: its own marker, not joined to the subset's curve
                has_final = True
                a2.errorbar(steps, mean, yerr=[[m - v for m, v in zip(mean, lo)], [v - m for m, v in zip(mean, hi)]],
                            color=st["color"], marker="d", mfc="none", ms=8, ls="none", lw=0.8)
            for ax, series in ((a1, loss), (a2, list(val))):
                steps, mean, lo, hi = _band(series)
                if not steps:
                    continue
                # markers at a few steps (offset per method) so lines drawn on top of each other stay visible
                every = max(1, len(steps) // 6)
                i = sorted(by_method).index(method)
                ax.plot(steps, mean, color=st["color"], marker=st["marker"], ms=5, markevery=(i % every, every),
                        lw=1.2, label=method + (f" (seeds={len(recs)})" if len(recs) > 1 else ""))
                if len(recs) > 1:
                    ax.fill_between(steps, lo, hi, color=st["color"], alpha=0.12, lw=0)
            a2.margins(x=0.02)
        if has_final:  # one legend entry says what the hollow diamonds are
            a2.plot([], [], color="0.3", marker="d", mfc="none", ls="none",
                    label="final validation, all examples\n(curve: the first curve_limit)")
        a1.margins(x=0.01)
        a1.set(xlabel="optimiser step", ylabel="training loss", title=f"{task}: training loss")
        a2.set(xlabel="optimiser step", ylabel=f"validation {metric}", title=f"{task}: validation")
        a2.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0,
                  title="mean; band = min..max over seeds", title_fontsize=7)
        fig.tight_layout()
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
        for i, method in enumerate(methods):
            if name in per_method[method]:
                steps, mean = _mean_curve(per_method[method][name])
                every = max(1, len(steps) // 6)
                # a marker per method at offset steps: identical curves (e.g. a variant equal to nalora) stay visible
                ax.plot(steps, mean, color=color[method], marker=MARKERS[i % len(MARKERS)], ms=4,
                        markevery=(i % every, every), label=method)
        ax.set(title=name, xlabel="optimiser step")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=color[m], marker=MARKERS[i % len(MARKERS)], label=m) for i, m in enumerate(methods)]
    fig.legend(handles=handles, loc="lower right", fontsize=8, ncol=2)
    fig.suptitle("NA-LoRA mask dynamics (mean over selected runs)")
    fig.tight_layout()
    return [_save(fig, out_dir / "mask_dynamics.png")]


def misalignment(records: list[dict], selected: set[str], out_dir: Path) -> list[Path]:
    vals: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    sources: set[str] = set()
    for r in records:
        d = ((r.get("diagnostics") or {}).get("selection_misalignment")) or {}
        if r["run_id"] in selected and r.get("status") == "ok" and "error" not in d:
            if d:
                sources.add(str((r.get("diagnostics") or {}).get("source") or "unknown"))
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
        ax.tick_params(axis="x", labelsize=7)
        plt.setp(ax.get_xticklabels(), rotation=40, ha="right", rotation_mode="anchor")  # long names must not overlap
    # the batches' source as recorded: "train-stream" (old records) is not held out, so the title must say it
    fig.suptitle(f"selection misalignment, batches: {', '.join(sorted(sources))} (mean over selected runs)")
    fig.tight_layout()
    return [_save(fig, out_dir / "misalignment.png")]


def write_plots(lb: pd.DataFrame, records: list[dict], out_dir: str | Path, an: Analysis | None = None) -> list[Path]:
    """Every plot; stale PNGs of models/tasks no longer in the results are removed."""
    from benchmarks.report.analysis import analyse

    out_dir = Path(out_dir)
    an = an if an is not None else analyse(records)
    selected = set(lb.loc[lb["selected"], "run_id"])
    paths = pareto(an, lb, out_dir) if len(lb) else []
    paths += forest(an, out_dir)
    paths += curves(records, selected, out_dir)
    paths += mask_dynamics(records, selected, out_dir)
    paths += misalignment(records, selected, out_dir)
    if out_dir.exists():
        for old in out_dir.glob("*.png"):
            if old not in paths:
                old.unlink()
    return paths
