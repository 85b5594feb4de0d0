"""Markdown tables from the leaderboard frame (selected settings only; test scores).

- ``main_<model>.md``: mean +- std over seeds per task x method, an average column and the rank.
- ``ablation_<model>.md``: lora vs nalora_mask vs nalora_scale vs nalora, plus option ablations.
- ``paired_<model>.md``: NA-LoRA minus LoRA per task, paired by seed, with a 95% t interval.
- ``selection.md``: the lr picked on validation for every model x task x method, out of which grid.
- ``tuning.md``: NA-LoRA option values tuned on the dev task(s), when there was tuning.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from benchmarks.runner.store import atomic_write_text

ABLATION_CORE = ["lora", "nalora_mask", "nalora_scale", "nalora"]
DASH = "—"

# Two-sided 95% Student t quantiles t_{0.975, df}; df > 30 uses the normal value (error < 2%).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
         29: 2.045, 30: 2.042}


def t975(df: int) -> float:
    return _T975.get(df, 1.960)


def paired_ci(diffs: list[float]) -> tuple[float, float, float]:
    """Mean difference and its 95% t confidence interval (nan bounds for n < 2)."""
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return mean, math.nan, math.nan
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = t975(n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def _scale(df: pd.DataFrame) -> float:
    # Scores in [0, 1] (accuracies) are shown in percent.
    s = df["test_score"].dropna()
    return 100.0 if len(s) and s.between(0, 1).all() else 1.0


def _fmt(x: float, digits: int = 1) -> str:
    return DASH if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _md(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _selected_ok(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["selected"] & (df["status"] == "ok")]


def _cell_stats(sel: pd.DataFrame, scale: float) -> dict[tuple[str, str], tuple[float, float, int]]:
    out = {}
    for (method, task), g in sel.groupby(["method", "task"], sort=True):
        v = g["test_score"].dropna().astype(float) * scale
        if len(v):
            out[(method, task)] = (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan, len(v))
    return out


def score_table(df: pd.DataFrame, methods: list[str], *, title: str, delta_vs: str | None = None) -> str:
    """Methods x tasks of one model: mean +- std (n), Avg over tasks, Rank by Avg (1 = best)."""
    sel = _selected_ok(df)
    scale = _scale(sel)
    tasks = sorted(df["task"].unique())
    stats = _cell_stats(sel, scale)
    failed = set(zip(df.loc[df["status"] != "ok", "method"], df.loc[df["status"] != "ok", "task"]))
    # Avg over the tasks every listed method finished, so that averages compare like with like.
    common = [t for t in tasks if all((m, t) in stats for m in methods)]
    avgs = {m: sum(stats[(m, t)][0] for t in common) / len(common) if common else math.nan for m in methods}
    ranked = sorted((a, m) for m, a in avgs.items() if not math.isnan(a))
    ranked.sort(key=lambda x: (-x[0], x[1]))
    # Competition ranking: equal averages (at the shown precision) share a rank.
    rank = {m: 1 + sum(round(a2, 2) > round(a, 2) for a2, _ in ranked) for a, m in ranked}
    params = sel.groupby("method")["trainable_pct"].mean()
    header = ["method", *tasks, "Avg", "Rank", "trainable %"] + ([f"Δ Avg vs {delta_vs}"] if delta_vs else [])
    rows = []
    for m in methods:
        row = [m]
        for t in tasks:
            if (m, t) in stats:
                mean, sd, n = stats[(m, t)]
                row.append(f"{mean:.1f} ± {_fmt(sd)} (n={n})" if scale == 100 else f"{mean:.4g} ± {_fmt(sd, 4)} (n={n})")
            else:
                row.append("failed" if (m, t) in failed else DASH)
        row += [_fmt(avgs[m], 2), str(rank.get(m, DASH)), _fmt(params.get(m, math.nan), 3)]
        if delta_vs:
            base = avgs.get(delta_vs, math.nan)
            row.append(_fmt(avgs[m] - base, 2) if m != delta_vs else "0")
        rows.append(row)
    unit = "%" if scale == 100 else "score"
    note = (f"Test {df['report_metric'].iloc[0]} ({unit}) of the lr selected on validation, mean ± std over seeds (n). "
            f"Avg over the {len(common)} task(s) every method finished"
            + (f" (left out: {', '.join(t for t in tasks if t not in common)})" if len(common) < len(tasks) else "")
            + "; Rank by Avg, 1 = best.\n")
    return f"## {title}\n\n{note}\n" + _md(header, rows)


def main_tables(lb: pd.DataFrame) -> dict[str, str]:
    """``main_<model>.md`` per model: every non-ablation method."""
    out = {}
    for model, df in lb.groupby("model", sort=True):
        methods = sorted(df.loc[~df["ablation"], "method"].unique())
        if methods:
            out[f"main_{_safe(model)}.md"] = score_table(df[~df["ablation"]], methods, title=f"{model}: all methods")
    return out


def ablation_tables(lb: pd.DataFrame) -> dict[str, str]:
    """LoRA -> + mask -> + scaling -> NA-LoRA, and the option ablations (ablation variants) when present."""
    out = {}
    for model, df in lb.groupby("model", sort=True):
        core = [m for m in ABLATION_CORE if m in set(df["method"])]
        extra = sorted(df.loc[df["ablation"], "method"].unique())
        if len(core) + len(extra) < 2:
            continue
        keep = df[df["method"].isin(core + extra)]
        base = "lora" if "lora" in core else None
        out[f"ablation_{_safe(model)}.md"] = score_table(keep, core + extra, title=f"{model}: NA-LoRA ablations", delta_vs=base)
    return out


def paired_tables(lb: pd.DataFrame, a: str = "nalora", b: str = "lora") -> dict[str, str]:
    """Per task: mean of (a - b) over seeds both finished, with a 95% t CI and n."""
    out = {}
    for model, df in lb.groupby("model", sort=True):
        sel = _selected_ok(df)
        scale = _scale(sel)
        rows = []
        for task in sorted(df["task"].unique()):
            ga = sel[(sel["task"] == task) & (sel["method"] == a)].set_index("seed")["test_score"]
            gb = sel[(sel["task"] == task) & (sel["method"] == b)].set_index("seed")["test_score"]
            seeds = sorted(set(ga.dropna().index) & set(gb.dropna().index))
            if not seeds:
                continue
            diffs = [(float(ga[s]) - float(gb[s])) * scale for s in seeds]
            mean, lo, hi = paired_ci(diffs)
            sig = "" if math.isnan(lo) else ("yes" if lo > 0 or hi < 0 else "no")
            rows.append([task, str(len(seeds)), _fmt(mean, 2), f"[{_fmt(lo, 2)}, {_fmt(hi, 2)}]", sig or DASH])
        if rows:
            note = (f"{a} minus {b}: test {df['report_metric'].iloc[0]} ({'points' if scale == 100 else 'score'}) of each "
                    "method's validation-selected lr, paired by seed; 95% t interval over the n seeds (df = n - 1); "
                    "'excludes 0' says whether the interval excludes zero. n < 2 gives no interval.\n")
            out[f"paired_{_safe(model)}.md"] = (f"## {model}: {a} vs {b}\n\n{note}\n"
                                                + _md(["task", "n", "mean Δ", "95% CI", "excludes 0"], rows))
    return out


def selection_table(lb: pd.DataFrame) -> str:
    """Which lr the validation picked for each model x task x method, and from which grid."""
    rows = []
    for (model, task, method), g in lb.groupby(["model", "task", "method"], sort=True):
        sel = g[g["selected"]]
        lrs = sorted(g["lr"].unique())
        grid = ", ".join(f"{x:g}" for x in lrs)
        if len(sel):
            ok = sel[sel["status"] == "ok"]
            rows.append([model, task, method, f"{sel['lr'].iloc[0]:g}", grid, _fmt(float(ok["val_score"].mean()), 4),
                         f"{len(ok)}/{len(sel)}", sel["options"].iloc[0] or DASH])
        else:
            rows.append([model, task, method, DASH, grid, DASH, f"0/{len(g)}", DASH])
    note = ("The setting with the best mean validation score over seeds (settings where a seed failed rank last); "
            "only its test score is reported. 'seeds ok' = finished / run.\n")
    return "## Selected hyperparameters\n\n" + note + "\n" + _md(
        ["model", "task", "method", "selected lr", "lr grid", "val mean", "seeds ok", "options"], rows)


def tuning_table(chosen: dict) -> str:
    rows = [[s["method"], ", ".join(f"{k}={v}" for k, v in sorted(s["options"].items())), _fmt(s["val_mean"], 4),
             str(s["n_tasks"]), "yes" if chosen["chosen"].get(s["method"]) == s["options"] else ""]
            for s in chosen.get("scores", [])]
    head = (f"## NA-LoRA options tuned on dev task(s): {', '.join(chosen.get('dev_tasks', []))}\n\n"
            "Each option combination at its best lr (mean validation over seeds), averaged over dev tasks. "
            "The dev tasks are never in the reported tables.\n\n")
    return head + _md(["method", "options", "val mean", "dev tasks", "chosen"], rows)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def write_tables(lb: pd.DataFrame, out_dir: str | Path, chosen: dict | None = None) -> list[Path]:
    """Write every table (atomically) into ``out_dir``; returns the paths."""
    out_dir = Path(out_dir)
    files: dict[str, str] = {}
    if len(lb):
        files |= main_tables(lb) | ablation_tables(lb) | paired_tables(lb)
        files["selection.md"] = selection_table(lb)
    if chosen:
        files["tuning.md"] = tuning_table(chosen)
    if out_dir.exists():  # tables of methods/tasks no longer in the results must not linger
        for old in out_dir.glob("*.md"):
            if old.name not in files:
                old.unlink()
    paths = []
    for name, text in sorted(files.items()):
        p = out_dir / name
        atomic_write_text(p, text)
        paths.append(p)
    return paths
