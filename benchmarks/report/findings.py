"""``findings.md`` (what the numbers say, every number generated) and the README's generated results section."""

from __future__ import annotations

import math
import re
import statistics
from pathlib import Path

from benchmarks.report import tables as T
from benchmarks.report.analysis import (
    BAD_STATUSES,
    BASELINE,
    MECHANISM_BASE,
    MECHANISM_CONTROLS,
    Analysis,
    method_order,
)
from benchmarks.runner.health import RULE_VERSION, rule_version
from benchmarks.runner.store import atomic_write_text

START, END = "<!-- results:start -->", "<!-- results:end -->"


def _iv(iv, scale: float) -> str:
    return f"{iv.mean * scale:+.2f} {T.iv_text(iv, scale)}"


def _verdict(iv, method: str, base: str = BASELINE) -> str:
    ex = iv.excludes_zero
    if ex is None:
        return "no interval (too few seeds and no per-example results)"
    if not ex:
        return "the interval includes 0: no difference resolved"
    text = f"the interval excludes 0: {method} {'above' if iv.mean > 0 else 'below'} {base}"
    if iv.seeds == 1:  # resampling test examples of one training run says nothing about seed-to-seed variation
        text += " for this one seed (the interval covers test-example sampling only, not training randomness)"
    return text


def _runs_line(records: list[dict]) -> str:
    counts = {s: 0 for s in ("ok", *BAD_STATUSES)}
    for r in records:
        counts[r.get("status") if r.get("status") in counts else "failed"] += 1
    gpus = sorted({(r.get("provenance", {}).get("hardware") or {}).get("gpu") or "CPU" for r in records})
    seeds = sorted({int(r["config"]["seed"]) for r in records})
    steps = sorted({(r["config"].get("training") or {}).get("steps") for r in records} - {None})
    batch = sorted({(r["config"].get("training") or {}).get("batch_size") for r in records} - {None})
    # A status is never re-derived here: a record keeps the verdict of the collapse rule that judged it.
    versions = [rule_version(r.get("health")) for r in records]
    older = sum(1 for v in versions if v is not None and v < RULE_VERSION)
    return (f"{len(records)} reported runs: " + ", ".join(f"{v} {k}" for k, v in counts.items())
            + _trained_share(records)
            + f"; seeds {', '.join(map(str, seeds))}; {'/'.join(map(str, steps))} optimiser steps of batch "
            f"{'/'.join(map(str, batch))}; hardware: {', '.join(gpus)}."
            + (f" {older} of these runs were judged by an older collapse rule (v1: per-token train loss, blind to "
               f"collapse on answers of several tokens; docs/protocol.md) and keep that status." if older else ""))


def _trained_share(records: list[dict]) -> str:
    """`` (trained without collapse or divergence: ...)``: per task family, the share of finished runs (failed ones
    left out: they say nothing about training) whose status is ``ok``."""
    fams: dict[str, list[int]] = {}
    for r in records:
        if r.get("status") in ("ok", "collapsed", "diverged"):
            n = fams.setdefault((r.get("meta") or {}).get("family") or "?", [0, 0])
            n[0] += r["status"] == "ok"
            n[1] += 1
    if not fams:
        return ""
    return " (trained without collapse or divergence: " + ", ".join(
        f"{fam} {ok} of {n}, {100 * ok / n:.1f}%" for fam, (ok, n) in sorted(fams.items())) + ")"


def model_findings(an: Analysis, model: str) -> list[str]:
    """Bullet points for one model, each a sentence built from the analysis."""
    scale = T.scale_of(an, model)
    u = T.unit(scale)
    cells = sorted((c for c in an.cells.values() if c.model == model), key=lambda c: (c.task, c.method))
    out = []
    sel = [c for c in cells if c.selected_lr is not None]
    edge = [c for c in sel if c.edge]
    bound = [c for c in edge if c.at_bound]
    out.append(f"Selected lr at an edge of the lrs run in {len(edge)} of {len(sel)} cells"
               + (f" ({len(bound)} at the documented bound)" if bound else "")
               + (": " + ", ".join(f"{c.task}/{c.method} ({c.edge})" for c in edge[:12])
                  + (f" and {len(edge) - 12} more (tables/selection.md)" if len(edge) > 12 else "") if edge else "") + ".")
    partial = [c for c in cells if c.missing]
    if partial:
        out.append(f"Grid still running in {len(partial)} of {len(cells)} cells (provisional, {T.PARTIAL}; left out of "
                   "averages, paired comparisons and pooled estimates): "
                   + ", ".join(f"{c.task}/{c.method} ({c.missing})" for c in partial[:8])
                   + (f" and {len(partial) - 8} more (tables/selection.md)" if len(partial) > 8 else "") + ".")
    bad = {s: sum(c.counts.get(s, 0) for c in cells) for s in BAD_STATUSES}
    if any(bad.values()):
        worst = sorted(cells, key=lambda c: (-sum(c.counts.get(s, 0) for s in BAD_STATUSES), c.task, c.method))[:5]
        out.append("Runs not ok: " + ", ".join(f"{v} {k}" for k, v in bad.items() if v) + "; most in "
                   + ", ".join(f"{c.task}/{c.method} ({T.mark(c).strip()})" for c in worst if T.mark(c).strip("†‡◊ ")) + ".")
    else:
        out.append("Every run finished ok (none collapsed, diverged or failed).")
    infos = [an.tasks[(model, t)] for t in an.task_names(model)]
    unin = [i for i in infos if i.informative is False]
    unknown = [i for i in infos if i.informative is None]
    if unin:
        out.append("Uninformative at this model size (no method beats chance, exact binomial p >= 0.05): "
                   + ", ".join(f"{i.task} (best p = {i.best_p:.2g}, chance {i.chance:.3g})" for i in unin)
                   + "; left out of averages and pooled estimates.")
    if unknown:
        out.append("Chance level not recorded (no `task_info.chance`), so not tested against chance: "
                   + ", ".join(i.task for i in unknown) + ".")
    if len(infos) > len(unin) + len(unknown):
        out.append("Beat chance (exact binomial p < 0.05 for at least one method): "
                   + ", ".join(f"{i.task} (p = {i.best_p:.2g})" for i in infos if i.informative) + ".")
    ns = [f"{i.task} n = {i.n}{' (inferred from the scores)' if i.n_source == 'inferred' else ''}" for i in infos if i.n]
    if ns:
        out.append("Test split sizes: " + ", ".join(ns) + ".")
    for method in method_order({c.method for c in an.comparisons if c.model == model}):
        comps = [c for c in an.comparisons if c.model == model and c.method == method]
        p = an.pooled.get((model, method))
        per = "; ".join(f"{c.task} {_iv(c.interval, scale)} (MDE {T._fmt(c.interval.mde * scale, 2)}, "
                        f"{c.interval.seeds} seed{'s' if c.interval.seeds != 1 else ''})" for c in comps)
        text = f"{method} minus {BASELINE} ({u}, per task, 95% interval, smallest detectable difference): {per}."
        if p is not None:
            text += (f" Pooled over {len(an.pooled_tasks[(model, method)])} task(s) not marked uninformative: {_iv(p, scale)}; "
                     + _verdict(p, method) + ".")
        out.append(text)
    out += _mechanism_lines(an, model, scale, u)
    main = [c for c in cells if not c.is_control and c.mean is not None]
    tasks = [t for t in an.task_names(model) if an.informative(model, t)]
    methods = sorted({c.method for c in main})
    common = [t for t in tasks if all(an.cells.get((model, t, m)) and an.cells[(model, t, m)].finished
                                      for m in methods)]
    if common and methods:
        avg = {m: sum(an.cells[(model, t, m)].mean for t in common) / len(common) * scale for m in methods}
        order = sorted(methods, key=lambda m: (-avg[m], m))
        out.append(f"Main table, mean over {len(common)} informative task(s): " + ", ".join(
            f"{m} {avg[m]:.2f}" for m in order) + ".")
    mem: dict[str, list[float]] = {}
    for c in cells:
        for r in c.runs.values():
            v = (r.get("perf") or {}).get("peak_gpu_mem_mib")
            if isinstance(v, (int, float)) and math.isfinite(v):
                mem.setdefault(c.base_method, []).append(float(v))
    if mem:
        out.append("Peak GPU memory per run, median over selected ok runs (MiB): " + ", ".join(
            f"{m} {statistics.median(v):.0f}" for m, v in sorted(mem.items())) + ".")
    return out


def _mechanism_lines(an: Analysis, model: str, scale: float, u: str) -> list[str]:
    """One sentence per mechanism control: NA-LoRA minus it, per task and pooled (tables/mechanism_<model>.md)."""
    out = []
    comps = [c for c in an.mechanism if c.model == model]
    for control in sorted({c.base for c in comps}):
        cell = next(c for c in an.cells.values() if c.model == model and c.method == control)
        per = "; ".join(f"{c.task} {_iv(c.interval, scale)} (MDE {T._fmt(c.interval.mde * scale, 2)})"
                        for c in comps if c.base == control)
        text = (f"What the controls say: {MECHANISM_BASE} minus {control} ({u}; the control takes away "
                f"{MECHANISM_CONTROLS.get(cell.base_method, 'part of NA-LoRA')}): {per}.")
        p = an.mechanism_pooled.get((model, control))
        if p is not None:
            text += f" Pooled: {_iv(p, scale)}; " + _verdict(p, MECHANISM_BASE, control) + "."
        out.append(text)
    return out


def substitution_lines(records: list[dict]) -> list[str]:
    """One sentence per stand-in that ran instead of a built asset (``meta.substituted``), with its run count."""
    groups: dict[tuple[str, str, str], int] = {}
    for r in records:
        sub = dict((r.get("meta") or {}).get("substituted") or {})
        why = str(sub.pop("why", ""))
        for asset, stand_in in sorted(sub.items()):
            key = (asset, str(stand_in), why)
            groups[key] = groups.get(key, 0) + 1
    return [f"**Stand-in model**: {n} run(s) used `{stand_in}` in place of `{asset}` ({why or 'no reason recorded'}); "
            f"their numbers say nothing about `{asset}`." for (asset, stand_in, why), n in sorted(groups.items())]


def run_time_line(records: list[dict]) -> str:
    """Median wall time of a run and the share of it spent evaluating (``perf.eval_s / perf.wall_s``), per
    hardware, model and task; "" when no record has timings. Runs share a GPU when a pool runs several per
    GPU, so a run's wall time is not GPU time."""
    groups: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
    for r in records:
        perf = r.get("perf") or {}
        wall, ev = perf.get("wall_s"), perf.get("eval_s")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (wall, ev)) or wall <= 0:
            continue
        gpu = (r.get("provenance", {}).get("hardware") or {}).get("gpu") or "CPU"
        groups.setdefault((gpu, r["config"]["model"], r["config"]["task"]), []).append((float(wall), float(ev) / wall))
    if not groups:
        return ""
    return ("Run time, median over the runs with timings (wall time of one run, several runs sharing a GPU; "
            "evaluation share = evaluation seconds / wall seconds): " + "; ".join(
                f"{task} on {model} ({gpu}): {statistics.median(w for w, _ in v):.0f} s, evaluation "
                f"{100 * statistics.median(e for _, e in v):.0f}% ({len(v)} runs)"
                for (gpu, model, task), v in sorted(groups.items())) + ".")


def gpu_time_line(results: Path | None, records: list[dict]) -> str:
    """The GPU time the folder's grid invocations took (``invocations.jsonl``, written by the runner) and the runs
    that finished in them; "" without a ledger (folders from before it)."""
    from benchmarks.runner import ledger

    g = ledger.gpu_hours(results, records) if results is not None else None
    if g is None:
        return ""
    if not g["invocations"]:
        return "GPU time: the ledger (invocations.jsonl) records no invocation on a GPU."
    killed = (f"; {g['killed']} ended without their end line (killed from outside) and count to their last "
              "heartbeat" if g["killed"] else "")
    rate = f", {g['runs'] / g['gpu_hours']:.0f} runs per GPU-hour" if g["gpu_hours"] > 0 else ""
    return (f"GPU time: {g['gpu_hours']:.2f} GPU-hours (wall time x GPUs) in {g['invocations']} grid invocation(s) on "
            f"{', '.join(g['gpus'])} (invocations.jsonl{killed}); {g['runs']} of the {g['records']} reported runs "
            f"finished inside them{rate}. Runs from before the ledger are not counted.")


def findings_text(an: Analysis, records: list[dict], level: int = 2, results: Path | None = None) -> str:
    h = "#" * level
    parts = [f"{_runs_line(records)}\n"] + [f"{line}\n" for line in substitution_lines(records)]
    for line in (run_time_line(records), gpu_time_line(results, records)):
        if line:
            parts.append(f"{line}\n")
    for model in an.models():
        parts.append(f"{h} {model}\n\n" + "\n".join(f"- {line}" for line in model_findings(an, model)) + "\n")
    return "\n".join(parts)


def write_findings(an: Analysis, records: list[dict], results: Path) -> Path:
    """``findings.md``: generated statements of what the results say."""
    text = ("# Findings\n\nGenerated by `nalora-bench report` from the run JSONs in `runs/`; every number is computed, "
            "none typed. Tables: `tables/`; definitions: docs/results.md.\n\n" + findings_text(an, records, results=results))
    p = results / "findings.md"
    atomic_write_text(p, text)
    return p


def check_readme(path: Path) -> str:
    """The README's text, after checking it has exactly one pair of result markers (one-line error otherwise)."""
    if not path.is_file():
        raise FileNotFoundError(f"--readme {path}: no such file")
    text = path.read_text()
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"{path}: needs one '{START}' line followed by one '{END}' line around its results section")
    return text


def _demote(md: str, by: int = 2) -> str:
    return re.sub(r"^(#+) ", lambda m: "#" * (len(m.group(1)) + by) + " ", md, flags=re.M)


def readme_section(an: Analysis, records: list[dict], files: dict[str, str], results: Path, readme: Path) -> str:
    """The generated results section: findings, main tables and NA-LoRA's paired intervals."""
    try:
        rel = Path(results).resolve().relative_to(readme.resolve().parent).as_posix()
    except ValueError:
        rel = Path(results).as_posix()
    out = [f"### `{rel}`: {', '.join(an.models())}\n",
           f"Generated by `nalora-bench report --results {rel} --readme {readme.name}` from the committed run JSONs "
           f"(do not edit between the markers). Everything is in [`{rel}/`]({rel}/): run JSONs, `leaderboard.csv`, "
           f"[`findings.md`]({rel}/findings.md), `tables/`, `plots/` and `index.html` (open it in a browser).\n",
           findings_text(an, records, level=4, results=results)]
    for name in sorted(files):
        if name.startswith(("main_", "towers_", "paired_", "mechanism_")) or name == "tuning.md":
            out.append(f"`tables/{name}`:\n\n" + _demote(files[name]))
    return "\n".join(out)


def update_readme(path: Path, text: str, an: Analysis, records: list[dict], files: dict[str, str], results: Path) -> Path:
    """Replace the text between the result markers of ``path`` with the generated section."""
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = head + START + "\n" + readme_section(an, records, files, results, path) + "\n" + END + tail
    atomic_write_text(path, new)
    return path
