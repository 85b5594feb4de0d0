"""What the tables, plots, findings and HTML page share: selected cells, run-status counts, lr-edge marks,
chance tests and paired method-minus-LoRA intervals, computed once from the run records.

Selection is ``benchmarks.runner.grid.select_settings`` (mean validation over seeds, ``ok`` runs only);
only ``ok`` runs of the selected setting are reported.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np

from benchmarks.report import stats
from benchmarks.runner.grid import edge_status, next_lr, select_settings, setting_key
from benchmarks.runner.record import is_failure, record_chance

BASELINE = "lora"
# Mechanism controls and NA-LoRA component ablations (by registered method): ablation/control table, not main.
CONTROL_METHODS = ("lora_gate_scaled", "nalora_random_mask", "nalora_static_mask", "nalora_mask", "nalora_scale")
# What NA-LoRA minus each mechanism control isolates: the part of NA-LoRA the control takes away (docs/protocol.md).
MECHANISM_BASE = "nalora"
MECHANISM_CONTROLS = {
    "lora_gate_scaled": "the mask and the per-token step scaling: LoRA with B_gate's lr at NA-LoRA's mean step scale",
    "nalora_random_mask": "the importance-based channel choice: the same keep schedule, channels drawn at random",
    "nalora_static_mask": "the mask refresh: channels chosen once, at the start of the schedule",
}
BAD_STATUSES = ("collapsed", "diverged", "failed")
CHANCE_ALPHA = 0.05
# Activation of each model's gated MLP, by name (records carry no activation field); the first matching
# substring wins; a composed VLM ("vision+lm") is named by its language model.
ACTIVATIONS = [("gemma", "GeGLU (gelu_tanh)"), ("smollm", "SwiGLU (silu)"), ("llama", "SwiGLU (silu)"),
               ("qwen", "SwiGLU (silu)"), ("mistral", "SwiGLU (silu)"), ("phi3", "SwiGLU (silu)")]


def activation_of(model: str) -> str:
    """The gated MLP's activation of ``model`` (``unknown`` when the name is not in ``ACTIVATIONS``)."""
    lm = model.split("+")[-1].lower()
    return next((act for key, act in ACTIVATIONS if key in lm), "unknown")


@dataclass
class Cell:
    """One (model, task, method): its selected setting, the ok runs of it, and what happened to the others."""

    model: str
    task: str
    method: str
    base_method: str
    ablation: bool
    lrs: list[float]
    counts: dict[str, int]
    selected_lr: float | None = None
    runs: dict[int, dict] = field(default_factory=dict)  # seed -> ok record of the selected setting
    edge: str | None = None  # "low" | "high" when the selected lr is the smallest / largest lr run
    at_bound: bool = False  # the edge is the documented limit meta["lr_bounds"]: the grid cannot extend
    val_mean: float | None = None
    towers: tuple[str, ...] = ()  # config.adapter.towers of the cell's runs (sorted; empty: not recorded)
    options: str = ""  # config.options of the cell's runs as canonical JSON (one method setting)
    missing: str = ""  # what of the cell's grid has no record yet: lrs of meta.lr_grid x seeds, and the lr the
    # extension rule adds next when the selection sits at an edge short of meta.lr_bounds

    @property
    def scores(self) -> list[float]:
        return [s for s in (test_score(r) for _, r in sorted(self.runs.items())) if s is not None]

    @property
    def mean(self) -> float | None:
        s = self.scores
        return sum(s) / len(s) if s else None

    @property
    def finished(self) -> bool:
        """A selection was made and every lr x seed of the cell's grid has a record: only such cells are compared."""
        return self.mean is not None and not self.missing

    @property
    def is_control(self) -> bool:
        return self.ablation or self.base_method in CONTROL_METHODS or self.method in CONTROL_METHODS


@dataclass
class TaskInfo:
    """Per (model, task): test size, chance level and whether any method beats chance."""

    model: str
    task: str
    metric: str
    n: int | None
    n_source: str  # "per-example" | "inferred" | "unknown"
    chance: float | None
    best_p: float | None = None  # smallest one-sided binomial p over methods (selected test vs chance)
    informative: bool | None = None  # None: chance or n unknown, not marked


@dataclass
class Comparison:
    model: str
    task: str
    method: str
    base: str
    interval: stats.Interval
    note: str = ""


def test_score(rec: dict) -> float | None:
    metric = rec.get("task_info", {}).get("report_metric", "acc")
    v = ((rec.get("metrics") or {}).get("test") or {}).get(metric)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-15)


def cells(records: list[dict]) -> dict[tuple[str, str, str], Cell]:
    """Every (model, task, method) with its selection, status counts and lr-edge marks."""
    chosen = select_settings(records)
    out: dict[tuple[str, str, str], Cell] = {}
    by_cell: dict[tuple[str, str, str], list[dict]] = {}
    for rec in sorted(records, key=lambda r: r["run_id"]):
        c = rec["config"]
        key = (c["model"], c["task"], c["method"])
        by_cell.setdefault(key, []).append(rec)
        cell = out.get(key)
        if cell is None:
            cell = out[key] = Cell(c["model"], c["task"], c["method"], c.get("base_method", c["method"]),
                                   bool((rec.get("meta") or {}).get("ablation")), [],
                                   {s: 0 for s in ("ok", *BAD_STATUSES)},
                                   towers=tuple(sorted((c.get("adapter") or {}).get("towers") or ())),
                                   options=json.dumps(c.get("options") or {}, sort_keys=True, default=str))
        if not any(_same(c["lr"], x) for x in cell.lrs):
            cell.lrs.append(float(c["lr"]))
        status = rec.get("status") if rec.get("status") in cell.counts else "failed"
        cell.counts[status] += 1
    for key, cell in out.items():
        cell.lrs.sort()
        cell.missing = _missing(by_cell[key])
        failed = [r for r in by_cell[key] if is_failure(r)]
        if failed:  # the runner's lr rule does not judge the cell until they are rerun (grid.extend_grids)
            kinds = ", ".join(sorted({(r.get("error") or {}).get("type") or "exception" for r in failed}))
            note = f"{len(failed)} run(s) failed ({kinds}): to rerun (--retry-failed) before the lr rule judges the cell"
            cell.missing = f"{cell.missing}; {note}" if cell.missing else note
        sel = chosen.get(key)
        if sel is None:
            continue
        cell.selected_lr, cell.val_mean = float(sel["lr"]), sel["val_mean"]
        for rec in records:
            c = rec["config"]
            if (c["model"], c["task"], c["method"]) == key and rec.get("status") == "ok" \
                    and setting_key(c) == sel["setting"]:
                cell.runs[int(c["seed"])] = rec
        if len(cell.lrs) > 1:
            side = "low" if _same(cell.selected_lr, cell.lrs[0]) else "high" if _same(cell.selected_lr, cell.lrs[-1]) else None
            cell.edge = side
            bounds = [(r.get("meta") or {}).get("lr_bounds") for r in cell.runs.values()]
            bounds = next((b for b in bounds if isinstance(b, (list, tuple)) and len(b) == 2), None)
            if side and bounds:
                bounds = (float(bounds[0]), float(bounds[1]))
                cell.at_bound = edge_status(cell.lrs, cell.selected_lr, bounds) == "at-bound"
                new = None if cell.at_bound else next_lr(cell.lrs, cell.selected_lr, bounds)
                # the runner's lr rule (the same function) still has this extension to run; while the grid has
                # holes the selection that points there is itself provisional, so it waits for them
                if new is not None and not cell.missing:
                    cell.missing = f"lr {new:g}: extension not run (best lr at the {side} edge)"
    return out


def _missing(recs: list[dict]) -> str:
    """The lrs and seeds of a cell's grid (``recs``: its records) without a record, e.g. "lr 0.001: seeds 3, 4".

    The grid is every lr any of the cell's records lists in ``meta.lr_grid`` (its lrs so far, extensions
    included) times every seed the cell ran or its records list in ``meta.seeds``; a slice that stopped
    mid-grid leaves holes, and selecting from them would compare lrs on different seeds, or miss an lr."""
    lrs = {float(r["config"]["lr"]) for r in recs}
    for r in recs:
        lrs |= {float(x) for x in ((r.get("meta") or {}).get("lr_grid") or [])}
    seeds = {int(r["config"]["seed"]) for r in recs}
    for r in recs:
        seeds |= {int(x) for x in ((r.get("meta") or {}).get("seeds") or [])}
    holes = []
    for lr in sorted(lrs):
        have = {int(r["config"]["seed"]) for r in recs if _same(float(r["config"]["lr"]), lr)}
        if not have:
            holes.append(f"lr {lr:g}: not run")
        elif have != seeds:
            holes.append(f"lr {lr:g}: seeds {', '.join(str(x) for x in sorted(seeds - have))}")
    return "; ".join(holes)


def _chance(records: list[dict], metric: str) -> float | None:
    return next((c for c in (record_chance(r, metric) for r in records) if c is not None), None)


def task_infos(records: list[dict], cs: dict[tuple[str, str, str], Cell]) -> dict[tuple[str, str], TaskInfo]:
    """Test size, chance and the 'uninformative at this model size' mark per (model, task)."""
    by_task: dict[tuple[str, str], list[dict]] = {}
    for rec in records:
        by_task.setdefault((rec["config"]["model"], rec["config"]["task"]), []).append(rec)
    out = {}
    for (model, task), recs in sorted(by_task.items()):
        ok = [r for r in recs if r.get("status") == "ok"]
        metric = (recs[0].get("task_info") or {}).get("report_metric", "acc")
        ns = [((r.get("per_example") or {}).get("test") or {}).get("n") for r in ok]
        ns = [n for n in ns if isinstance(n, int) and n > 0]
        if ns:
            n, src = max(set(ns), key=ns.count), "per-example"
        else:
            n = stats.infer_n([s for s in (test_score(r) for r in ok) if s is not None])
            src = "inferred" if n else "unknown"
        info = TaskInfo(model, task, metric, n, src, _chance(recs, metric))
        if n and info.chance is not None:
            ps = [stats.binom_sf(round(c.mean * n), n, info.chance)
                  for (m, t, _), c in cs.items() if (m, t) == (model, task) and c.mean is not None]
            if ps:
                info.best_p = min(ps)
                info.informative = info.best_p < CHANCE_ALPHA
        out[(model, task)] = info
    return out


def _per_example(rec: dict) -> tuple[str, np.ndarray] | None:
    pe = ((rec.get("per_example") or {}).get("test")) or {}
    bits, sha = pe.get("correct"), pe.get("ids_sha256")
    if not isinstance(bits, str) or not bits or not isinstance(sha, str):
        return None
    return sha, stats.decode_correct(bits)


def compare(a: Cell, b: Cell, n: int | None = None) -> Comparison | None:
    """``a`` minus ``b`` on the seeds both finished: paired bootstrap when every run has per-example results
    on the same test examples (equal ``ids_sha256``) that reproduce its test score, else the seed-level t interval."""
    seeds = sorted(set(a.runs) & set(b.runs))
    seeds = [s for s in seeds if test_score(a.runs[s]) is not None and test_score(b.runs[s]) is not None]
    if not seeds:
        return None
    key = f"{a.model}|{a.task}|{a.method}|{b.method}"
    pes = [(_per_example(a.runs[s]), _per_example(b.runs[s])) for s in seeds]
    note = ""
    if all(x is not None and y is not None for x, y in pes):
        shas = {x[0] for x, _ in pes} | {y[0] for _, y in pes}
        lens = {len(x[1]) for x, _ in pes} | {len(y[1]) for _, y in pes}
        match = all(abs(float(x[1].mean()) - test_score(a.runs[s])) < 1e-6
                    and abs(float(y[1].mean()) - test_score(b.runs[s])) < 1e-6 for s, (x, y) in zip(seeds, pes))
        if len(shas) == 1 and len(lens) == 1 and match:
            iv = stats.bootstrap_paired(np.stack([x[1] for x, _ in pes]), np.stack([y[1] for _, y in pes]), key)
            return Comparison(a.model, a.task, a.method, b.method, iv)
        note = ("per-example results on different test examples" if len(shas) > 1 or len(lens) > 1
                else "per-example results do not reproduce the test score")
    iv = stats.t_interval([test_score(a.runs[s]) - test_score(b.runs[s]) for s in seeds], n)
    if iv.seeds == 1 and n:
        # One seed, no per-example results: the test-sampling SE of a difference of two accuracies on the
        # same n examples is at most that of independent samples, so this MDE is an upper bound.
        pa, pb = test_score(a.runs[seeds[0]]), test_score(b.runs[seeds[0]])
        iv.se = math.sqrt((pa * (1 - pa) + pb * (1 - pb)) / n) if 0 <= pa <= 1 and 0 <= pb <= 1 else math.nan
        iv.method = "none (1 seed; SE: unpaired binomial bound)"
    return Comparison(a.model, a.task, a.method, b.method, iv, note)


@dataclass
class Analysis:
    cells: dict[tuple[str, str, str], Cell]
    tasks: dict[tuple[str, str], TaskInfo]
    comparisons: list[Comparison]
    pooled: dict[tuple[str, str], stats.Interval]  # (model, method) -> pooled over informative tasks
    pooled_tasks: dict[tuple[str, str], list[str]]
    # NA-LoRA minus each mechanism control (Comparison.method = "nalora", .base = the control's label), pooled alike
    # and keyed by (model, control)
    mechanism: list[Comparison] = field(default_factory=list)
    mechanism_pooled: dict[tuple[str, str], stats.Interval] = field(default_factory=dict)
    mechanism_pooled_tasks: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    def models(self) -> list[str]:
        return sorted({m for m, _, _ in self.cells})

    def task_names(self, model: str) -> list[str]:
        return sorted({t for m, t, _ in self.cells if m == model})

    def informative(self, model: str, task: str) -> bool:
        """False only for tasks marked uninformative (unknown chance counts as informative)."""
        return self.tasks[(model, task)].informative is not False


def method_order(methods: set[str] | list[str]) -> list[str]:
    """NA-LoRA first, then the rest by name (LoRA, the baseline, is never compared with itself)."""
    ms = sorted(set(methods))
    return [m for m in ms if m == "nalora"] + [m for m in ms if m != "nalora"]


def _compare_all(cs: dict[tuple[str, str, str], Cell], ts: dict[tuple[str, str], TaskInfo],
                 pairs: list[tuple[str, str, str, str]]) -> tuple[list[Comparison], dict, dict]:
    """For each ``(model, a, b, key)``: ``a`` minus ``b`` per task where both cells' grids are finished, and the
    pooled estimate over the informative tasks. Returns the comparisons and the pooled intervals and tasks,
    keyed by ``(model, key)``."""
    comps: list[Comparison] = []
    pooled_iv, pooled_tasks = {}, {}
    for model, x, y, key in pairs:
        per_task = []
        for task in sorted({t for m, t, _ in cs if m == model}):
            a, b = cs.get((model, task, x)), cs.get((model, task, y))
            if a is None or b is None or a.missing or b.missing:  # a grid still running is not compared
                continue
            comp = compare(a, b, ts[(model, task)].n)
            if comp is None:
                continue
            comps.append(comp)
            if ts[(model, task)].informative is not False:
                per_task.append(comp)
        p = stats.pooled([c.interval for c in per_task])
        if p is not None:
            pooled_iv[(model, key)] = p
            pooled_tasks[(model, key)] = [c.task for c in per_task]
    return comps, pooled_iv, pooled_tasks


def analyse(records: list[dict], base: str = BASELINE) -> Analysis:
    """Cells, task infos, every method-minus-``base`` comparison and the pooled estimates; and NA-LoRA minus
    each mechanism control (``MECHANISM_CONTROLS``): what the part of NA-LoRA the control removes is worth."""
    cs = cells(records)
    ts = task_infos(records, cs)
    models = sorted({m for m, _, _ in cs})
    pairs = [(model, method, base, method) for model in models
             for method in method_order({me for m, _, me in cs if m == model and me != base})]
    comps, pooled_iv, pooled_tasks = _compare_all(cs, ts, pairs)
    controls = sorted({(m, me) for (m, _, me), c in cs.items()
                       if c.base_method in MECHANISM_CONTROLS and not c.ablation and me != MECHANISM_BASE})
    mech, mech_iv, mech_tasks = _compare_all(cs, ts, [(m, MECHANISM_BASE, me, me) for m, me in controls])
    return Analysis(cs, ts, comps, pooled_iv, pooled_tasks, mech, mech_iv, mech_tasks)
