"""Markdown tables from the analysis (selected settings only; test scores).

- ``main_<model>.md``: every method at its defaults (lr tuned only): mean +- std over seeds per task, Avg, Rank.
- ``ablation_<model>.md``: controls and ablations against LoRA, with the pooled paired difference.
- ``paired_<model>.md``: every method minus LoRA per task: paired 95% interval, smallest detectable difference.
- ``mechanism_<model>.md``: NA-LoRA minus each mechanism control (what the part of NA-LoRA it removes is worth).
- ``towers_<model>.md``: one method with its adapters in the vision tower, the language tower or both, side by
  side (only where a suite ran such variants, e.g. ``vision-tower.yaml``).
- ``activation.md``: the pooled method-minus-LoRA difference per gated-MLP activation (SwiGLU, GeGLU, ...).
- ``selection.md``: the lr picked on validation per model x task x method, its grid, edge marks, run statuses.
- ``lrs.md``: every lr run per model x task x method: run statuses and mean validation of the `ok` runs (where
  along the grid runs collapse or diverge).
- ``tuning.md``: option values tuned on the dev task(s), when there was tuning.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from benchmarks.report import stats
from benchmarks.report.analysis import (
    BAD_STATUSES,
    BASELINE,
    MECHANISM_BASE,
    MECHANISM_CONTROLS,
    Analysis,
    Cell,
    activation_of,
    method_order,
)
from benchmarks.report.stats import paired_ci, t975  # noqa: F401  (public: kept importable from here)
from benchmarks.runner.store import atomic_write_text

DASH = "—"
EDGE, BOUND, PARTIAL = "†", "‡", "◊"
LEGEND = (f"{EDGE} selected lr is at an edge of the lrs run for this cell (the grid does not bracket the optimum); "
          f"{BOUND} at an edge that is the documented lr bound (the grid cannot extend further); "
          f"{PARTIAL} the cell's grid is still running (an lr or seed has no record yet, or the lr rule still has to "
          "extend past the selected edge lr: tables/selection.md says which): its score is provisional and left out of Avg, paired comparisons and pooled estimates. "
          "[k collapsed/diverged/failed] counts runs of the cell (all lrs and seeds) that are not `ok` and were "
          "never selectable. Tasks marked (uninformative) (no method's selected test score beats chance: one-sided "
          f"exact binomial test, p < {0.05}) are left out of Avg and of pooled estimates.")


def _fmt(x: float | None, digits: int = 1) -> str:
    return DASH if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _md(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def scale_of(an: Analysis, model: str) -> float:
    """100 when every test score of the model lies in [0, 1] (accuracies, shown in percent), else 1."""
    s = [x for c in an.cells.values() if c.model == model for x in c.scores]
    return 100.0 if s and all(0 <= x <= 1 for x in s) else 1.0


def unit(scale: float) -> str:
    return "points" if scale == 100 else "score"


def mark(cell: Cell) -> str:
    """Edge/bound mark and non-ok run counts of a cell."""
    m = ((BOUND if cell.at_bound else EDGE) if cell.edge else "") + (PARTIAL if cell.missing else "")
    bad = [f"{cell.counts[s]} {s}" for s in BAD_STATUSES if cell.counts.get(s)]
    return m + (f" [{', '.join(bad)}]" if bad else "")


def cell_text(cell: Cell | None, scale: float) -> str:
    if cell is None:
        return DASH
    s = [x * scale for x in cell.scores]
    if not s:
        return ("no ok run" + mark(cell)) if any(cell.counts.get(b) for b in BAD_STATUSES) else DASH
    mean = sum(s) / len(s)
    sd = math.sqrt(sum((x - mean) ** 2 for x in s) / (len(s) - 1)) if len(s) > 1 else math.nan
    body = f"{mean:.1f} ± {_fmt(sd)} (n={len(s)})" if scale == 100 else f"{mean:.4g} ± {_fmt(sd, 4)} (n={len(s)})"
    return body + mark(cell)


def chance_text(chance: float | None, scale: float) -> str:
    """A chance level on the table's scale (percent for accuracies)."""
    return DASH if chance is None else f"{chance * scale:.1f}" if scale == 100 else f"{chance:.4g}"


def task_header(an: Analysis, model: str, task: str) -> str:
    """``task (n=..., chance ...)``: test size and chance level in every table's task column or header."""
    info = an.tasks[(model, task)]
    parts = ([f"n{'≈' if info.n_source == 'inferred' else '='}{info.n}"] if info.n else [])
    parts.append(f"chance {chance_text(info.chance, scale_of(an, model))}")
    return f"{task} ({', '.join(parts)})" + (" (uninformative)" if info.informative is False else "")


def iv_text(iv: stats.Interval, scale: float) -> str:
    if not (math.isfinite(iv.lo) and math.isfinite(iv.hi)):
        return DASH
    return f"[{iv.lo * scale:.2f}, {iv.hi * scale:.2f}]"


def score_table(an: Analysis, lb: pd.DataFrame, model: str, methods: list[str], *, title: str,
                chosen: dict | None = None, delta: bool = False) -> str:
    """Methods x tasks of one model: mean +- std (n), Avg over informative tasks, Rank by Avg (1 = best)."""
    scale = scale_of(an, model)
    tasks = an.task_names(model)
    get = an.cells.get
    informative = [t for t in tasks if an.informative(model, t)]
    common = [t for t in informative if all(get((model, t, m)) and get((model, t, m)).finished for m in methods)]
    avgs = {m: sum(get((model, t, m)).mean * scale for t in common) / len(common) if common else math.nan for m in methods}
    ranked = sorted(((a, m) for m, a in avgs.items() if not math.isnan(a)), key=lambda x: (-x[0], x[1]))
    rank = {m: 1 + sum(round(a2, 2) > round(a, 2) for a2, _ in ranked) for a, m in ranked}
    mdf = lb[(lb["model"] == model) & lb["selected"] & (lb["status"] == "ok")]
    params = mdf.groupby("method")["trainable_pct"].mean()
    tuned = set((chosen or {}).get("chosen", {}))
    header = ["method", *(task_header(an, model, t) for t in tasks), "Avg", "Rank", "trainable %"]
    if delta:
        header += [f"pooled Δ vs {BASELINE} [95% CI]"]
    rows = []
    for m in methods:
        label = m + (" §" if m in tuned else "")
        row = [label, *(cell_text(get((model, t, m)), scale) for t in tasks)]
        row += [_fmt(avgs[m], 2), str(rank.get(m, DASH)), _fmt(params.get(m, math.nan), 3)]
        if delta:
            p = an.pooled.get((model, m))
            row.append("0 (baseline)" if m == BASELINE else
                       DASH if p is None else f"{p.mean * scale:+.2f} {iv_text(p, scale)}")
        rows.append(row)
    left = [t for t in tasks if t not in common]
    note = (f"Test {an.tasks[(model, tasks[0])].metric} ({'%' if scale == 100 else 'score'}) of the lr selected on "
            "validation (mean over seeds, `ok` runs only), mean ± std over seeds (n). "
            f"Avg over the {len(common)} informative task(s) where every listed method's grid finished"
            + (f" (left out: {', '.join(left)})" if left else "") + "; Rank by Avg, 1 = best. "
            "n in a task header = test examples (n≈: inferred from the scores, for records without per-example results); "
            "chance = the score of uniform guessing (`Task.chance()`, — when the records do not give it). "
            + ("§ options tuned on the dev task(s) (tuning.md). " if tuned & set(methods) else "")
            + LEGEND + "\n")
    return f"## {title}\n\n{note}\n" + _md(header, rows)


def main_tables(an: Analysis, lb: pd.DataFrame, chosen: dict | None = None) -> dict[str, str]:
    """``main_<model>.md``: every method that is neither a control nor an ablation."""
    out = {}
    for model in an.models():
        methods = sorted({c.method for c in an.cells.values() if c.model == model and not c.is_control})
        if methods:
            out[f"main_{_safe(model)}.md"] = score_table(an, lb, model, methods, title=f"{model}: all methods at their "
                                                         "defaults (lr tuned only)", chosen=chosen)
    return out


def ablation_tables(an: Analysis, lb: pd.DataFrame, chosen: dict | None = None) -> dict[str, str]:
    """LoRA, NA-LoRA, the mechanism controls and the option ablations, each against LoRA."""
    out = {}
    for model in an.models():
        present = {c.method for c in an.cells.values() if c.model == model}
        extra = method_order({c.method for c in an.cells.values() if c.model == model and c.is_control})
        core = [m for m in (BASELINE, "nalora") if m in present]
        if not extra:
            continue
        out[f"ablation_{_safe(model)}.md"] = score_table(an, lb, model, core + [m for m in extra if m not in core],
                                                         title=f"{model}: NA-LoRA controls and ablations",
                                                         chosen=chosen, delta=BASELINE in present)
    return out


def _comparison_rows(an: Analysis, model: str, lead: list[str], comps: list, pooled, pooled_tasks: list[str] | None,
                     scale: float) -> list[list[str]]:
    """Table rows of one comparison (``lead`` columns first): one per task, then the pooled estimate."""
    def tail(iv) -> list[str]:
        ex = iv.excludes_zero
        return [str(iv.seeds), f"{iv.mean * scale:+.2f}", iv_text(iv, scale), iv.method, _fmt(iv.mde * scale, 2),
                DASH if ex is None else ("yes" if ex else "no")]

    rows = []
    for c in comps:
        row = lead + [task_header(an, model, c.task)] + tail(c.interval)
        row[len(lead) + 4] += f" ({c.note})" if c.note else ""
        rows.append(row)
    if pooled is not None:
        rows.append(lead + [f"**pooled** ({len(pooled_tasks or [])} task(s) not marked uninformative)"] + tail(pooled))
    return rows


def paired_tables(an: Analysis) -> dict[str, str]:
    """Per model: every method minus LoRA per task (NA-LoRA first), then the pooled estimate per method."""
    out = {}
    for model in an.models():
        scale = scale_of(an, model)
        rows = []
        comps = [c for c in an.comparisons if c.model == model]
        for method in method_order({c.method for c in comps}):
            rows += _comparison_rows(an, model, [method], [c for c in comps if c.method == method],
                                     an.pooled.get((model, method)), an.pooled_tasks.get((model, method)), scale)
        if not rows:
            continue
        note = (f"Method minus {BASELINE}: test {an.tasks[(model, an.task_names(model)[0])].metric} ({unit(scale)}), each "
                "method at its own validation-selected lr, paired by seed. `bootstrap`: 95% percentile interval of a "
                f"paired bootstrap ({stats.BOOT_REPS} replicates, fixed seed) resampling seeds and test examples "
                "jointly for both methods (per-example results). `t`: seed-level paired Student-t interval (records "
                "without per-example results). With 1 seed and no per-example results there is no interval. "
                f"MDE: smallest difference detectable with 80% power at two-sided alpha 0.05, {stats.MDE_FACTOR} x SE. "
                "Pooled: unweighted mean of the informative tasks' differences (tasks fixed); interval from the mean of "
                "their bootstrap replicates, or normal with SE = sqrt(sum of task SE^2) / tasks when a task has only a "
                "t interval, none when a task has neither. With 1 seed and no per-example results the SE behind the "
                "MDE is the unpaired binomial bound sqrt((p_a(1-p_a) + p_b(1-p_b)) / n), an upper bound for paired "
                "test-set noise that ignores seed noise. "
                "seeds = seeds both methods finished. Each interval is a 95% interval for its own comparison, "
                "not corrected for multiplicity: nalora minus lora is the comparison the suite is for; when several "
                "other methods are compared with lora on a task, some interval may exclude 0 by chance alone (about "
                "1 in 20 per comparison where there is no difference).\n")
        out[f"paired_{_safe(model)}.md"] = (f"## {model}: method minus {BASELINE}\n\n{note}\n"
                                            + _md(["method", "task", "seeds", "Δ", "95% CI", "interval", "MDE",
                                                   "excludes 0"], rows))
    return out


def mechanism_tables(an: Analysis) -> dict[str, str]:
    """``mechanism_<model>.md``: NA-LoRA minus each mechanism control per task and pooled (what the part of
    NA-LoRA that the control takes away is worth), where the suite ran both."""
    out = {}
    for model in an.models():
        scale = scale_of(an, model)
        rows = []
        comps = [c for c in an.mechanism if c.model == model]
        for control in sorted({c.base for c in comps}):
            cell = next(c for c in an.cells.values() if c.model == model and c.method == control)
            removes = MECHANISM_CONTROLS.get(cell.base_method, DASH)
            rows += _comparison_rows(an, model, [control, removes], [c for c in comps if c.base == control],
                                     an.mechanism_pooled.get((model, control)),
                                     an.mechanism_pooled_tasks.get((model, control)), scale)
        if not rows:
            continue
        note = (f"{MECHANISM_BASE} minus each mechanism control: test {an.tasks[(model, an.task_names(model)[0])].metric} "
                f"({unit(scale)}), each at its own validation-selected lr, paired by seed, with the intervals, MDE and "
                f"pooling of `paired_{_safe(model)}.md`. A control is NA-LoRA (or LoRA) without one part of NA-LoRA "
                "(column `removes`): a difference whose interval excludes 0 says that part changes the score; one "
                "that includes 0 with a small MDE says the task cannot tell NA-LoRA from the control, so that part "
                "does not explain a difference from LoRA there. Not corrected for multiplicity.\n")
        out[f"mechanism_{_safe(model)}.md"] = (f"## {model}: {MECHANISM_BASE} minus its mechanism controls\n\n{note}\n"
                                               + _md(["control", "removes", "task", "seeds", "Δ", "95% CI",
                                                      "interval", "MDE", "excludes 0"], rows))
    return out


TOWER_COLUMNS = {("vision",): "vision", ("language",): "language", ("language", "vision"): "both"}


def towers_tables(an: Analysis) -> dict[str, str]:
    """``towers_<model>.md``: per task, a method (one option setting) whose entries differ only in
    ``adapter.towers``, its test score per tower set: rows method, columns vision / language / both."""
    out = {}
    for model in an.models():
        scale = scale_of(an, model)
        groups: dict[tuple[str, str, str], dict[tuple[str, ...], list[Cell]]] = {}
        for c in an.cells.values():
            if c.model == model and not c.is_control and c.towers in TOWER_COLUMNS:
                groups.setdefault((c.task, c.base_method, c.options), {}).setdefault(c.towers, []).append(c)
        order = {m: i for i, m in enumerate([BASELINE, *method_order({b for _, b, _ in groups} - {BASELINE})])}
        rows = []
        for (task, base, _), by in sorted(groups.items(), key=lambda kv: (kv[0][0], order[kv[0][1]], kv[0][2])):
            if len(by) < 2:  # one tower set only: nothing to separate
                continue
            texts = [" / ".join(cell_text(c, scale) for c in sorted(by.get(t, []), key=lambda c: c.method)) or DASH
                     for t in TOWER_COLUMNS]
            labels = ", ".join(c.method for t in TOWER_COLUMNS for c in sorted(by.get(t, []), key=lambda c: c.method))
            rows.append([base, task_header(an, model, task), *texts, labels])
        if not rows:
            continue
        adapted = [f"`{c.method}`: {_tower_modules(c)}" for by in groups.values() if len(by) > 1
                   for t in TOWER_COLUMNS for c in sorted(by.get(t, []), key=lambda c: c.method)]
        note = (f"Test {an.tasks[(model, an.task_names(model)[0])].metric} ({'%' if scale == 100 else 'score'}) of the lr "
                "selected on validation, mean ± std over seeds (n), as in the main table, for entries of one method and "
                "option setting that differ only in the towers the shared budget's targets are placed in "
                "(`adapter.towers`): vision = the image encoder only, language = the language model only, both = "
                "both towers. Two entries of one setting and tower set are shown separated by /, in the order of "
                "`suite entries`. " + LEGEND + "\n")
        adapted_note = ("\nAdapted FFNs per tower, from the selected runs' records (`adapted_modules`; the FFN kind, then "
                        "which method each projection role got):\n\n" + "\n".join(f"- {a}" for a in adapted) + "\n")
        out[f"towers_{_safe(model)}.md"] = (f"## {model}: adapters by tower\n\n{note}\n"
                                            + _md(["method", "task", *TOWER_COLUMNS.values(), "suite entries"], rows)
                                            + adapted_note)
    return out


def _tower_modules(cell: Cell) -> str:
    """What one of the cell's selected runs adapted, per tower: e.g. "vision 12 gated FFNs (gate nalora, up lora)"."""
    rec = next(iter(cell.runs.values()), {})
    mods = rec.get("adapted_modules") or []
    if not mods:
        return "not recorded"
    parts = []
    for tower in sorted({m.get("tower", "?") for m in mods}):
        ms = [m for m in mods if m.get("tower", "?") == tower]
        kinds = sorted({m.get("kind", "?") for m in ms})
        ffns = len({m["name"].rsplit(".", 1)[0] for m in ms})
        roles = sorted({(m.get("role", "?"), m.get("applied", "?")) for m in ms})
        parts.append(f"{tower} {ffns} {'/'.join(kinds)} FFNs ({', '.join(f'{r} {a}' for r, a in roles)})")
    return "; ".join(parts)


def activation_table(an: Analysis) -> str | None:
    """Pooled method-minus-LoRA difference per activation of the gated MLP, over informative (model, task)s."""
    groups: dict[tuple[str, str], list] = {}
    for c in an.comparisons:
        if an.informative(c.model, c.task) and scale_of(an, c.model) == 100:
            groups.setdefault((activation_of(c.model), c.method), []).append(c)
    if not groups:
        return None
    rows = []
    for act in sorted({a for a, _ in groups}):
        for method in method_order({m for a, m in groups if a == act}):
            cs = groups[(act, method)]
            p = stats.pooled([c.interval for c in cs])
            ex = p.excludes_zero
            rows.append([act, method, ", ".join(sorted({c.model for c in cs})), str(len(cs)), f"{p.mean * 100:+.2f}",
                         iv_text(p, 100), p.method, DASH if ex is None else ("yes" if ex else "no")])
    note = (f"Method minus {BASELINE} (points), pooled over the informative (model, task) pairs whose model has this "
            "gated-MLP activation (activation by model name: `benchmarks/report/analysis.py` ACTIVATIONS); same "
            "pooling as in paired_<model>.md.\n")
    return "## Per activation\n\n" + note + "\n" + _md(
        ["activation", "method", "models", "tasks", "pooled Δ", "95% CI", "interval", "excludes 0"], rows)


def selection_table(an: Analysis) -> str:
    """Which lr the validation picked for each model x task x method, from which lrs, and what failed."""
    rows = []
    for (model, task, method), c in sorted(an.cells.items()):
        grid = ", ".join(f"{x:g}" for x in c.lrs)
        edge = DASH if not c.edge else f"{c.edge}{' (at bound)' if c.at_bound else ''}"
        counts = ", ".join(f"{c.counts[s]} {s}" for s in BAD_STATUSES if c.counts.get(s)) or DASH
        opts = ""
        if c.runs:
            o = next(iter(c.runs.values()))["config"].get("options") or {}
            opts = ";".join(f"{k}={v}" for k, v in sorted(o.items()))
        chance = an.tasks[(model, task)].chance if (model, task) in an.tasks else None
        rows.append([model, task, method, DASH if c.selected_lr is None else f"{c.selected_lr:g}", grid, edge,
                     _fmt(c.val_mean, 4), _fmt(chance, 4), str(len(c.runs)), counts, c.missing or DASH, opts or DASH])
    note = ("The setting with the best mean validation score over its `ok` seeds (settings where a seed was not ok rank "
            "after complete ones; ties go to the smaller lr); only its test score is reported. `edge`: the selected lr "
            "is the smallest (low) or largest (high) lr run; `at bound` when that is the documented limit "
            "(`meta.lr_bounds`). `ok seeds` = seeds of the selected setting that finished ok; `not ok` counts every run "
            "of the cell that collapsed, diverged or failed. `chance`: the score of uniform guessing on the task's "
            "reported metric. `still to run`: the lrs and seeds of the cell's grid without a record yet (a slice that "
            "stopped mid-grid), and the next lr of the extension rule when the selected lr sits at an edge short of "
            "the bound; such a cell's selection is provisional.\n")
    return "## Selected hyperparameters\n\n" + note + "\n" + _md(
        ["model", "task", "method", "selected lr", "lrs run", "edge", "val mean", "chance", "ok seeds", "not ok",
         "still to run", "options"],
        rows)


def lr_table(lb: pd.DataFrame) -> str:
    """Per model x task x method x lr: how many runs, how each ended, and the `ok` runs' mean validation score."""
    rows = []
    for (model, task, method, lr), g in lb.groupby(["model", "task", "method", "lr"], sort=True):
        ok = g[g["status"] == "ok"]
        counts = ", ".join(f"{n} {s}" for s, n in sorted(g["status"].value_counts().items()) if s != "ok") or DASH
        val = _fmt(float(ok["val_score"].mean()), 4) if len(ok) and ok["val_score"].notna().any() else DASH
        rows.append([model, task, method, f"{lr:g}", str(len(g)), str(len(ok)), counts, val])
    note = ("Every lr run, with every seed's run counted: `ok` runs, the others by status (never selectable), and the "
            "mean validation score of the `ok` runs. Where along the grid runs stop training shows here.\n")
    return "## Runs per learning rate\n\n" + note + "\n" + _md(
        ["model", "task", "method", "lr", "runs", "ok", "not ok", "val mean (ok)"], rows)


def tuning_table(chosen: dict) -> str:
    rows = [[s["method"], ", ".join(f"{k}={v}" for k, v in sorted(s["options"].items())), _fmt(s["val_mean"], 4),
             str(s["n_tasks"]), "yes" if chosen["chosen"].get(s["method"]) == s["options"] else ""]
            for s in chosen.get("scores", [])]
    head = (f"## NA-LoRA options tuned on dev task(s): {', '.join(chosen.get('dev_tasks', []))}\n\n"
            "Each option combination at its best lr (mean validation over seeds), averaged over dev tasks. "
            "The dev tasks are never in the reported tables.\n\n")
    return head + _md(["method", "options", "val mean", "dev tasks", "chosen"], rows)


def all_tables(an: Analysis, lb: pd.DataFrame, chosen: dict | None = None) -> dict[str, str]:
    """Every table by file name."""
    files: dict[str, str] = {}
    if an.cells:
        files |= (main_tables(an, lb, chosen) | ablation_tables(an, lb, chosen) | paired_tables(an)
                  | mechanism_tables(an) | towers_tables(an))
        act = activation_table(an)
        if act:
            files["activation.md"] = act
        files["selection.md"] = selection_table(an)
    if len(lb):
        files["lrs.md"] = lr_table(lb)
    if chosen:
        files["tuning.md"] = tuning_table(chosen)
    return files


def write_tables(files: dict[str, str], out_dir: str | Path) -> list[Path]:
    """Write ``files`` (name -> markdown) atomically into ``out_dir``, removing tables no longer produced."""
    out_dir = Path(out_dir)
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
