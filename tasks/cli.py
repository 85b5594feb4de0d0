"""``nalora-bench list {tasks,methods,models,datasets}`` and the zero-shot table script.

Zero-shot table (docs/tasks_table.md), reproducible with::

    python -m tasks.cli zeroshot --model smollm2-135m --limit 100 --threads 1 --out docs/tasks_table.md
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

WHAT = ("tasks", "methods", "models", "datasets")
MIN_TEST = 1000  # protocol v2: prefer test splits of at least this many examples (the table names smaller ones)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``nalora-bench list``."""
    parser.add_argument("what", choices=WHAT, help="what to list")
    parser.add_argument("--include-path", action="append", default=[], metavar="DIR",
                        help="also load the .py and .yaml task files in DIR (repeatable)")
    parser.add_argument("--family", choices=("llm", "vlm"), help="tasks of one family only")


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _hub_cached(dataset: str) -> bool:
    """Whether the datasets cache already holds ``dataset`` (never asks the hub)."""
    try:
        from pathlib import Path

        import datasets

        root = Path(datasets.config.HF_DATASETS_CACHE)
        return any(root.glob(dataset.replace("/", "___") + "*"))
    except Exception:  # noqa: BLE001
        return False


def split_sizes(task: Any) -> str:
    """``train/validation/test`` sizes if the data is available locally, else ``not fetched``."""
    try:
        if getattr(task, "data_dir", None) is None:
            if task.requires_network:
                if not _hub_cached(task.dataset):
                    return "not fetched (hub)"
                import datasets
                import huggingface_hub.constants as hub_constants

                # A cached hub dataset loads offline; make sure nothing waits on the network.
                old = (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE)
                datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
                try:
                    splits = task.load_splits()
                finally:
                    datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = old
                return "/".join(str(len(splits[s])) for s in ("train", "validation", "test"))
            try:
                from benchmarks.assets import SPECS, Cache

                if task.dataset in SPECS and not Cache().has(task.dataset):
                    return "not fetched"
            except ImportError:
                return "not fetched (no asset cache)"
        splits = task.load_splits()
        return "/".join(str(len(splits[s])) for s in ("train", "validation", "test"))
    except Exception as err:  # noqa: BLE001 - one task's data problem must not hide the others
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return f"unavailable ({type(err).__name__}: {first})" if first else f"unavailable ({type(err).__name__})"


def _list_tasks(args: argparse.Namespace, out=None) -> int:
    out = out or sys.stdout  # resolved at call time: tests and callers may swap sys.stdout
    from tasks.registry import get_task, list_tasks, load_tasks, task_source

    errors = load_tasks(include_paths=args.include_path)
    rows = []
    for name in list_tasks(args.family):
        try:
            task = get_task(name)
            rows.append([name, task.family, split_sizes(task), task_source(name), task.source or task.dataset])
        except Exception as err:  # noqa: BLE001
            first = str(err).splitlines()[0] if str(err) else ""
            rows.append([name, "?", f"broken ({type(err).__name__}: {first})", task_source(name), ""])
    print(_table(["task", "family", "train/val/test", "origin", "source"], rows), file=out)
    if errors:
        print(f"\n{len(errors)} task file(s) failed to load:", file=out)
        for err in errors:
            print(f"  {err}", file=out)
        return 1
    return 0


def _list_methods(out=None) -> int:
    out = out or sys.stdout
    from nalora import list_methods

    for name in list_methods():
        print(name, file=out)
    return 0


def _list_assets(kind: str, out=None) -> int:
    out = out or sys.stdout
    try:
        from benchmarks.assets import SPECS, Cache
    except ImportError as err:
        raise RuntimeError(f"the asset cache (benchmarks.assets) is not importable: {err}") from err
    cache = Cache()
    rows = [
        [s.name, "fetched" if cache.has(s.name) else "not fetched", "yes (not in --all)" if s.heavy else "no", s.license,
         s.description]
        for s in SPECS.values() if s.kind == kind
    ]
    if kind == "model":  # random test models: built in place, nothing to fetch
        from tasks.common import tiny_model_names

        rows += [[n, "built in", "no", "-", "random tiny test model (no download)"] for n in tiny_model_names()]
    print(_table(["name", "status", "heavy", "license", "description"], rows), file=out)
    return 0


def main(args: argparse.Namespace) -> int:
    """Run ``nalora-bench list``."""
    if args.what == "tasks":
        return _list_tasks(args)
    if args.what == "methods":
        return _list_methods()
    return _list_assets("model" if args.what == "models" else "dataset")


# --------------------------------------------------------------------------------------------------
# zero-shot table


def zeroshot_row(task: Any, setup: Any, limit: int | None, batch_size: int = 8) -> dict[str, Any]:
    """Split sizes, zero-shot test metrics, chance and majority-class rate of one task."""
    splits = task.load_splits()
    test = task.examples("test", limit)
    t0 = time.time()
    top_share = None
    if hasattr(task, "score") and hasattr(task, "metrics_from"):
        # Same numbers as evaluate(), plus how often the model gives its favourite answer: a model that
        # always says "no" scores the majority rate without any skill, and the table should show it.
        lls, choices, labels = task.score(setup, setup.model, "test", limit=limit, batch_size=batch_size)
        metrics = task.metrics_from(lls, choices, labels)
        preds = [max(range(len(ll)), key=lambda j: (ll[j], -j)) for ll in lls]
        top_share = max(preds.count(v) for v in set(preds)) / len(preds)
    else:
        metrics = task.evaluate(setup, setup.model, "test", limit=limit, batch_size=batch_size)
    row = {
        "task": task.name, "sizes": {s: len(splits[s]) for s in ("train", "validation", "test")},
        "n_eval": len(test), "metrics": metrics, "chance": task.chance(), "report": task.report_metric,
        "seconds": time.time() - t0, "top_answer_share": top_share,
    }
    if task.answer_format in ("choices", "labels") and hasattr(task, "doc_to_label"):
        labels = [task.doc_to_label(ex) for ex in test]
        row["majority"] = max(labels.count(v) for v in set(labels)) / len(labels)
    return row


def _model_description(model: str) -> str:
    try:
        from benchmarks.assets import SPECS

        return SPECS[model].description
    except Exception:  # noqa: BLE001 - tiny test models are not assets
        return "random-weight test model" if model.startswith("tiny-") else "not an asset-cache model"


def render_table(rows: list[dict[str, Any]], model: str, limit: int | None) -> str:
    """The markdown of docs/tasks_table.md."""
    subset = f"a fixed subset of at most {limit} test examples (seeded shuffle, seed 0)" if limit else "the full test split"
    lines = [
        "# Zero-shot scores of the built-in language tasks",
        "",
        (f"Model `{model}` ({_model_description(model)}), no training, evaluated on {subset} with each task's "
         "own protocol (`Task.protocol`). Chance = uniform guessing over the choices; majority = accuracy of "
         "always answering the most frequent gold label of the evaluated examples; top answer = share of "
         "examples where the model gives its most frequent answer (by `acc`), 1.000 = a constant answer."),
        "",
        ("Reproduce: `python -m tasks.cli zeroshot --model " + model + (f" --limit {limit}" if limit else "")
         + " --threads 1 --out docs/tasks_table.md`"),
        "",
        "| task | train / val / test | evaluated | metric | zero-shot | chance | majority | top answer | other metrics |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['task']} | - | - | - | {r['error']} | - | - | - | - |")
            continue
        sizes = " / ".join(str(r["sizes"][s]) for s in ("train", "validation", "test"))
        m = r["report"]
        others = ", ".join(f"{k} {v:.3f}" for k, v in r["metrics"].items() if k != m) or "-"
        chance = r["chance"].get(m)
        maj, top = r.get("majority"), r.get("top_answer_share")
        lines.append(
            f"| {r['task']} | {sizes} | {r['n_eval']} | {m} | {r['metrics'][m]:.3f} | "
            f"{'-' if chance is None else f'{chance:.3f}'} | {'-' if maj is None else f'{maj:.3f}'} | "
            f"{'-' if top is None else f'{top:.3f}'} | {others} |"
        )
    small = [f"{r['task']} ({r['sizes']['test']})" for r in rows if "sizes" in r and r["sizes"]["test"] < MIN_TEST]
    if small:
        lines += ["", (f"Test splits under {MIN_TEST:,} examples (one standard error of a 50% accuracy is above "
                       f"{50 / MIN_TEST ** 0.5:.1f} points): " + ", ".join(small)
                       + ". The offline assets hash 10% of a source into its test split (the source has "
                       "no larger labelled test set), so a larger test split would shrink training; read "
                       "differences on these tasks with their intervals.")]
    return "\n".join(lines) + "\n"


def zeroshot_main(argv: list[str] | None = None) -> int:
    """``python -m tasks.cli zeroshot``: measure and write the zero-shot table."""
    p = argparse.ArgumentParser(prog="python -m tasks.cli zeroshot", description="zero-shot table of the offline LLM tasks")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--limit", type=int, default=100, help="test examples per task (fixed subset)")
    p.add_argument("--tasks", nargs="*", help="default: every built-in llm task that needs no network")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", help="write the markdown here (default: print)")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 avoids spin-waiting on a shared machine)")
    args = p.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from tasks.common import load_causal_lm
    from tasks.registry import get_task, list_tasks, load_tasks

    torch.manual_seed(0)
    load_tasks()
    names = args.tasks or [n for n in list_tasks("llm") if not get_task(n).requires_network]
    model, tokenizer = load_causal_lm(args.model)
    rows = []
    for name in names:
        task = get_task(name)
        try:
            row = zeroshot_row(task, task.setup_from(model, tokenizer), args.limit, args.batch_size)
        except Exception as err:  # noqa: BLE001 - report the failing task, keep measuring the others
            row = {"task": name, "error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}
        print(row, file=sys.stderr, flush=True)
        rows.append(row)
    text = render_table(rows, args.model, args.limit)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "zeroshot":
        sys.exit(zeroshot_main(sys.argv[2:]))
    sys.exit("usage: python -m tasks.cli zeroshot [--model M] [--limit N] [--tasks ...] [--out FILE]")
