"""The zero-shot / chance table of the vision tasks (docs/vlm.md): ``python -m tasks.vlm.zeroshot``.

QA tasks: the composed VLM with its aligned connector and no task training, scored on the first
``limit`` examples of the test split (fixed random order). Probe tasks: the untrained (seeded random)
head, which must sit at chance. Also reported: split sizes, chance (1/K), the majority-class rate.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.vlm.build import DEFAULT_VLM

QA = ("fashion-mnist", "emoji", "cifar10")
PROBE = ("fashion-mnist-probe", "emoji-probe", "cifar10-probe")


def _row(task: Any, setup: Any, limit: int) -> dict[str, Any]:
    splits = task.load_splits()
    test_labels = splits["test"]["label"]
    t0 = time.time()
    metrics = task.evaluate(setup, setup.model, "test", limit=limit, batch_size=16)
    row = {
        "task": task.name, "sizes": {k: len(v) for k, v in splits.items()}, "classes": len(task.classes()),
        "chance": task.chance(), "majority": max(Counter(test_labels).values()) / len(test_labels),
        "zero_shot": metrics, "eval_seconds": round(time.time() - t0, 1),
    }
    if hasattr(task, "_scores"):
        row.update(answer_spread(task, setup, limit))
    return row


def answer_spread(task: Any, setup: Any, limit: int, batch_size: int = 16) -> dict[str, Any]:
    """Which answer the untrained QA model gives (by summed log-prob): its most frequent answer, the share
    of examples that get it, and that class's share of the evaluated sample. A model that always gives one
    answer scores exactly that share, below chance whenever the class is rarer than 1/K in the sample."""
    from benchmarks.vlm.build import device_of
    from tasks.vlm.data import eval_order

    data = task.load_splits()["test"]
    sample = data.select(eval_order(len(data), limit))
    classes = setup.extras["classes"]
    choices = [" " + c for c in classes]
    preds: list[int] = []
    for i in range(0, len(sample), batch_size):
        rows = sample.select(range(i, min(i + batch_size, len(sample))))
        scores = task._scores(setup.model, setup.extras["io"], rows["image"], choices, device_of(setup.model))
        preds += scores.argmax(-1).tolist()
    top, count = Counter(preds).most_common(1)[0]
    gold = sample["label"]
    return {"top_answer": classes[top], "top_answer_share": count / len(preds),
            "top_answer_class_share_of_sample": sum(1 for y in gold if y == top) / len(gold)}


def zero_shot_table(qa: tuple[str, ...] = QA, probe: tuple[str, ...] = PROBE, vlm: str = DEFAULT_VLM,
                    encoder: str = "dinov2-s", limit: int = 200, device: str = "cpu",
                    max_train: int | None = 2000) -> list[dict[str, Any]]:
    """One row per task whose dataset is in the asset cache (absent ones are listed as skipped)."""
    from benchmarks.assets import Cache, cache_dir
    from tasks.registry import get_task

    cache = Cache(cache_dir())
    rows: list[dict[str, Any]] = []
    qa_setup = None
    for name in qa + probe:
        task = get_task(name, max_train=max_train)
        if not cache.has(task.dataset):
            rows.append({"task": name, "skipped": f"{task.dataset} not fetched"})
            continue
        if name in qa:
            if qa_setup is None:  # one model (and one alignment) for every QA task
                qa_setup = task.setup(vlm, device)
            setup = qa_setup
            setup.extras["classes"] = task.classes()
        else:
            setup = task.setup(encoder, device)
        row = _row(task, setup, limit)
        row["model"] = vlm if name in qa else encoder
        if name in qa:
            row["alignment"] = setup.extras.get("alignment")
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """The docs table."""
    lines = ["| task | model | train / val / test | classes | chance | majority | zero-shot acc | acc_norm | n | "
             "top answer (share of answers) | its class's share of the sample |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['task']} | - | {r['skipped']} | | | | | | | | |")
            continue
        s, z = r["sizes"], r["zero_shot"]
        norm = f"{z['acc_norm']:.3f}" if "acc_norm" in z else "-"
        lines.append(f"| {r['task']} | {r['model']} | {s['train']} / {s['validation']} / {s['test']} | "
                     f"{r['classes']} | {r['chance']['acc']:.3f} | {r['majority']:.3f} | {z['acc']:.3f} | "
                     f"{norm} | {int(z['n'])} | " + (f"{r['top_answer']} ({r['top_answer_share']:.2f}) | "
                     f"{r['top_answer_class_share_of_sample']:.2f} |" if "top_answer" in r else "- | - |"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=200, help="test examples per task")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--vlm", default=DEFAULT_VLM)
    ap.add_argument("--encoder", default="dinov2-s")
    ap.add_argument("--qa", nargs="*", default=list(QA))
    ap.add_argument("--probe", nargs="*", default=list(PROBE))
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--out", help="write the markdown table here (default: print)")
    args = ap.parse_args(argv)
    rows = zero_shot_table(tuple(args.qa), tuple(args.probe), args.vlm, args.encoder, args.limit, args.device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    text = markdown(rows)
    if args.out:
        Path(args.out).write_text(
            f"# Zero-shot scores of the vision tasks\n\nGenerated by `python -m tasks.vlm.zeroshot "
            f"--limit {args.limit}` (test split, first n examples in the fixed evaluation order; QA: the composed "
            f"VLM with its aligned connector and no task training; probes: the untrained, seeded head; chance = "
            f"1/K; majority = share of the most frequent class in the test split).\n\n{text}\n")
    print(text)


if __name__ == "__main__":
    main()
