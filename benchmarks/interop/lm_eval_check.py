"""A saved NA-LoRA adapter is a plain peft LoRA adapter: lm-evaluation-harness scores it as we do.

``python -m benchmarks.interop.lm_eval_check --task quartz`` (CPU, a few minutes):

1. trains NA-LoRA for a few steps on the task's training split (the README's "own training loop" API:
   ``inject`` / ``make_optimizer`` / ``Adapted.save``), with a short mask interval so that the mask is
   refreshed and folded into the saved ``B_gate`` (the saved adapter has zero rows there);
2. exports ``limit`` examples of a split as JSONL (the task's own prompt, choices and label) and writes
   an lm-eval task YAML over it (``dataset_path: json``, ``output_type: multiple_choice``);
3. scores the same examples (a) with the task's own evaluator on ``PeftModel.from_pretrained(base,
   adapter_dir)`` and (b) with ``lm_eval.simple_evaluate`` on the ``hf`` model with ``peft=adapter_dir``;
4. compares per example (choice log-likelihoods, argmax of acc and acc_norm) and overall, writes
   ``<out>/lm_eval_<task>.json`` and ``.md``, and exits 1 when the tolerance is exceeded.

The agreement is only meaningful if the adapter changes the scores: the check also measures how far
the adapter moves the log-likelihoods from the base model's and fails when that is not clearly above
the tolerance (lm-eval silently ignoring ``peft=`` would then go unnoticed).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

DEFAULT_OPTIONS = {"mask_interval": 2}  # refresh (and so mask) within the few steps of this check
EFFECT_FACTOR = 10.0  # the adapter must move some log-likelihood by > EFFECT_FACTOR x tolerance


def _log(msg: str) -> None:
    # Long CPU phases (minutes under load) should never be silent.
    print(f"[interop {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class InteropError(RuntimeError):
    """The two evaluators disagree beyond the tolerance, or the check cannot tell them apart."""


@dataclass
class Scores:
    """Per-example scores of one evaluator, in the exported order."""

    ids: list[str]
    lls: list[list[float]]
    """Summed log-likelihood of each choice's continuation."""
    acc: list[int]
    acc_norm: list[int]
    metrics: dict[str, float]
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# the base model as a Hugging Face directory (what lm-eval's ``pretrained=`` loads)


def hf_model_dir(model: str, work: Path) -> Path:
    """A ``from_pretrained`` directory of ``model``: a local dir, an asset-cache model, or a tiny test
    model (``tasks.common.TINY_MODELS``, saved under ``work``)."""
    if Path(model).expanduser().is_dir():
        return Path(model).expanduser().resolve()
    from tasks.common import TINY_MODELS

    if model in TINY_MODELS:
        net, tokenizer = TINY_MODELS[model]()
        out = work / "base"
        net.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
        return out
    from benchmarks.assets.cache import Cache
    from benchmarks.assets.registry import SPECS

    spec = SPECS.get(model)
    if spec is None or spec.kind != "model":
        raise ValueError(f"--model {model!r}: not a local directory, a tiny test model or an asset-cache model")
    path, _ = Cache().require(model)
    return path / "model"


def load_causal(model_dir: Path) -> tuple[torch.nn.Module, Any]:
    """fp32 causal LM and tokenizer from ``model_dir`` (offline)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    net = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True)
    return net.eval(), AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)


# --------------------------------------------------------------------------------------------------
# training and saving


def train_and_save(task: Any, model_dir: Path, adapter_dir: Path, *, steps: int, batch_size: int, lr: float,
                   seed: int, options: dict[str, Any], targets: tuple[str, ...] = ("gate", "up", "down"),
                   rank: int = 8, alpha: float = 16) -> dict[str, Any]:
    """Train NA-LoRA on ``task`` for ``steps`` optimiser steps and ``Adapted.save`` it to ``adapter_dir``."""
    from transformers import set_seed

    from nalora import inject

    net, tokenizer = load_causal(model_dir)
    setup = task.setup_from(net, tokenizer)
    set_seed(seed)
    adapted = inject(setup.model, "nalora", targets=targets, rank=rank, alpha=alpha, method_options=options)
    opt = adapted.make_optimizer(lr=lr, total_steps=steps)
    data = task.train_batches(setup, batch_size, seed)
    adapted.model.train()
    losses = []
    for step in range(1, steps + 1):
        loss = task.loss(setup, adapted.model, next(data))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        _log(f"train step {step}/{steps}: loss {losses[-1]:.4f}")
    adapted.model.eval()
    adapted.save(adapter_dir)
    _log(f"saved the adapter to {adapter_dir}")
    return {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "targets": list(targets),
            "rank": rank, "alpha": alpha, "train_loss": losses, "method_config": adapted.method_config}


def _targets(value: Any) -> str | list[str]:
    """peft's ``target_modules``: a list of names, or one regex string (as NA-LoRA's injector writes it)."""
    return value if isinstance(value, str) else sorted(value or [])


def saved_adapter_summary(adapter_dir: Path) -> dict[str, Any]:
    """From the saved weights: adapted modules per kind (``gate_proj``: 30, ...) and the rows of the
    ``B_gate`` matrices that are exactly zero (the folded NA-LoRA mask)."""
    from safetensors.torch import load_file

    state = load_file(str(adapter_dir / "adapter_model.safetensors"))
    kinds: dict[str, int] = {}
    zero = total = 0
    for key, tensor in state.items():
        if ".lora_A." in key:
            kind = key.split(".lora_A.")[0].rsplit(".", 1)[-1]
            kinds[kind] = kinds.get(kind, 0) + 1
        if "gate_proj" in key and "lora_B" in key:
            zero += int((tensor == 0).all(dim=1).sum())
            total += tensor.shape[0]
    return {"modules": dict(sorted(kinds.items())), "masked_gate_rows": {"zero_rows": zero, "rows": total}}


# --------------------------------------------------------------------------------------------------
# the shared examples and the lm-eval task over them


def export_docs(task: Any, split: str, limit: int | None) -> list[dict[str, Any]]:
    """``{id, context, choices, label}`` of the examples the task's evaluator scores (same order).

    Raises ``ValueError`` for tasks whose context varies per choice (not one lm-eval multiple_choice doc).
    """
    docs = []
    for i, ex in enumerate(task.examples(split, limit)):
        context, choices = task.doc_to_text(ex), [str(c) for c in task.doc_to_choices(ex)]
        expected = [(context, task.target_delimiter + c) for c in choices]
        if task.requests(ex) != expected:
            raise ValueError(f"task {task.name!r}: requests differ from (prompt, delimiter + choice); "
                             "its context varies per choice, which this check does not export")
        docs.append({"id": str(ex.get("id", i)), "context": context, "choices": choices,
                     "label": int(task.doc_to_label(ex))})
    if not docs:
        raise ValueError(f"task {task.name!r}: no {split} examples to compare")
    return docs


def lm_eval_task_yaml(name: str, data_file: Path, delimiter: str, cache_dir: Path) -> str:
    """An lm-eval task over ``data_file``: the exported prompt, choices and label, zero-shot."""
    import yaml

    spec = {
        "task": name,
        "dataset_path": "json",
        # datasets' own cache under the work dir: nothing written to the user's HF cache
        "dataset_kwargs": {"data_files": {"test": str(data_file)}, "cache_dir": str(cache_dir)},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "context",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "target_delimiter": delimiter,
        "num_fewshot": 0,
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    return yaml.safe_dump(spec, sort_keys=False)


# --------------------------------------------------------------------------------------------------
# the two evaluators


def _per_example(lls: list[list[float]], choices: list[list[str]], labels: list[int]) -> tuple[list[int], list[int]]:
    """Per-example acc / acc_norm (0/1) with the project's own rule (``tasks.common.choice_metrics``)."""
    from tasks.common import choice_metrics

    acc, acc_norm = [], []
    for ll, ch, gold in zip(lls, choices, labels):
        m = choice_metrics([ll], [ch], [gold], norm=True)
        acc.append(int(m["acc"]))
        acc_norm.append(int(m["acc_norm"]))
    return acc, acc_norm


def project_scores(task: Any, model_dir: Path, adapter_dir: Path, split: str, limit: int | None,
                   batch_size: int) -> tuple[Scores, list[list[float]]]:
    """The task's evaluator (``score`` + ``metrics_from``, i.e. ``evaluate``) on base + saved adapter;
    also the base model's log-likelihoods (adapter disabled) to measure the adapter's effect."""
    from peft import PeftModel

    net, tokenizer = load_causal(model_dir)
    model = PeftModel.from_pretrained(net, str(adapter_dir)).eval()
    setup = task.setup_from(model, tokenizer)
    _log(f"project evaluator: scoring {split} with the saved adapter")
    lls, choices, labels = task.score(setup, model, split, limit, batch_size)
    metrics = task.metrics_from(lls, choices, labels)
    acc, acc_norm = _per_example(lls, choices, labels)
    _log(f"project evaluator: scoring {split} with the adapter disabled (base model)")
    with model.disable_adapter():
        base_lls, _, _ = task.score(setup, model, split, limit, batch_size)
    ids = [str(ex.get("id", i)) for i, ex in enumerate(task.examples(split, limit))]
    # acc_norm for tasks that report acc only (sarcasm): the same rule, from the same log-likelihoods
    metrics = {"acc": metrics["acc"], "acc_norm": metrics.get("acc_norm", sum(acc_norm) / len(acc_norm)),
               **{k: v for k, v in metrics.items() if k not in ("acc", "acc_norm")}}
    return Scores(ids, lls, acc, acc_norm, metrics), base_lls


def lm_eval_scores(task_dir: Path, task_name: str, model_dir: Path, adapter_dir: Path | None, batch_size: int) -> Scores:
    """``lm_eval.simple_evaluate`` with the ``hf`` model, ``peft=adapter_dir`` (none: the base model), on the
    exported task."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    _log(f"lm_eval: task {task_name}, hf model{' with peft=' if adapter_dir is not None else ' (no adapter)'}")
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    model_args = {"pretrained": str(model_dir), "dtype": "float32", "device": "cpu"}
    if adapter_dir is not None:
        model_args["peft"] = str(adapter_dir)
    out = simple_evaluate(
        model="hf", model_args=model_args,
        tasks=[task_name], batch_size=batch_size, task_manager=manager, log_samples=True, bootstrap_iters=0,
    )
    if out is None or task_name not in out.get("samples", {}):
        raise InteropError(f"lm_eval returned no samples for task {task_name!r}")
    samples = sorted(out["samples"][task_name], key=lambda s: s["doc_id"])
    lls = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    res = out["results"][task_name]
    return Scores(
        ids=[str(s["doc"]["id"]) for s in samples], lls=lls,
        acc=[int(s["acc"]) for s in samples], acc_norm=[int(s["acc_norm"]) for s in samples],
        metrics={"acc": float(res["acc,none"]), "acc_norm": float(res["acc_norm,none"])},
        extra={"lm_eval_version": out.get("versions", {}).get(task_name), "config": out.get("config", {})},
    )


# --------------------------------------------------------------------------------------------------
# comparison


def _argmax(values: list[float]) -> int:
    # first index among equal maxima: the rule of both choice_metrics and numpy.argmax
    return max(range(len(values)), key=lambda j: (values[j], -j))


def compare(ours: Scores, theirs: Scores, docs: list[dict], base_lls: list[list[float]], tol: float) -> dict[str, Any]:
    """Per-example and overall agreement; ``ok`` only if every criterion holds (see ``criteria``)."""
    if ours.ids != theirs.ids:
        raise InteropError(f"the evaluators scored different examples: {ours.ids[:3]}... vs {theirs.ids[:3]}...")
    lens = [len(d["choices"]) for d in docs]
    for name, s in (("project", ours), ("lm_eval", theirs)):
        if [len(x) for x in s.lls] != lens:
            raise InteropError(f"{name}: number of scored choices differs from the exported choices")
    diffs = [abs(a - b) for la, lb in zip(ours.lls, theirs.lls) for a, b in zip(la, lb)]
    effect = [abs(a - b) for la, lb in zip(ours.lls, base_lls) for a, b in zip(la, lb)]
    norm = [[ll[j] / max(len(d["choices"][j]), 1) for j in range(len(ll))] for ll, d in zip(ours.lls, docs)]
    norm_t = [[ll[j] / max(len(d["choices"][j]), 1) for j in range(len(ll))] for ll, d in zip(theirs.lls, docs)]
    n = len(docs)
    same_pred = sum(_argmax(a) == _argmax(b) for a, b in zip(ours.lls, theirs.lls))
    same_pred_norm = sum(_argmax(a) == _argmax(b) for a, b in zip(norm, norm_t))
    same_acc = sum(a == b for a, b in zip(ours.acc, theirs.acc))
    same_acc_norm = sum(a == b for a, b in zip(ours.acc_norm, theirs.acc_norm))
    base_flips = sum(_argmax(a) != _argmax(b) for a, b in zip(ours.lls, base_lls))
    from tasks.common import choice_metrics

    base_metrics = choice_metrics(base_lls, [d["choices"] for d in docs], [d["label"] for d in docs], norm=True)
    max_diff, max_effect = max(diffs), max(effect)
    criteria = {
        f"every choice log-likelihood within {tol:g} (abs)": max_diff <= tol,
        "same argmax (acc prediction) on every example": same_pred == n,
        "same argmax of length-normalised log-likelihood (acc_norm prediction) on every example": same_pred_norm == n,
        "same per-example acc and acc_norm": same_acc == n and same_acc_norm == n,
        "same overall acc and acc_norm": all(abs(ours.metrics[m] - theirs.metrics[m]) < 1e-12 for m in ("acc", "acc_norm")),
        f"the adapter moves some log-likelihood by more than {EFFECT_FACTOR:g} x tolerance": max_effect > EFFECT_FACTOR * tol,
    }
    return {
        "n": n, "choices": sum(lens), "tolerance_abs_ll": tol,
        "max_abs_ll_diff": max_diff, "mean_abs_ll_diff": sum(diffs) / len(diffs),
        "same_pred": same_pred, "same_pred_norm": same_pred_norm, "same_acc": same_acc, "same_acc_norm": same_acc_norm,
        "metrics": {"project": ours.metrics, "lm_eval": theirs.metrics},
        "adapter_effect": {"max_abs_ll_change_vs_base": max_effect, "mean_abs_ll_change_vs_base": sum(effect) / len(effect),
                           "pred_changed_vs_base": base_flips, "base_model_metrics": base_metrics},
        "criteria": criteria, "ok": all(criteria.values()),
    }


# --------------------------------------------------------------------------------------------------
# the whole check


def run_check(task_name: str, *, model: str = "smollm2-135m", split: str = "test", limit: int | None = 100,
              steps: int = 8, batch_size: int = 2, lr: float = 1e-3, seed: int = 0, tol: float = 1e-3,
              eval_batch_size: int = 16, options: dict[str, Any] | None = None, data_dir: str | None = None,
              work_dir: str | Path | None = None) -> dict[str, Any]:
    """Train, save, score with both evaluators and compare; returns the comparison record (see module doc)."""
    from tasks.registry import get_task

    task = get_task(task_name, **({"data_dir": data_dir} if data_dir else {}))
    if getattr(task, "answer_format", None) not in ("choices", "labels") or not hasattr(task, "score"):
        raise ValueError(f"--task {task_name!r}: only log-likelihood choice tasks can be compared with lm-eval")
    options = dict(DEFAULT_OPTIONS if options is None else options)
    with tempfile.TemporaryDirectory(prefix="nalora-interop-") as tmp:
        work = Path(work_dir) if work_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        docs = export_docs(task, split, limit)  # before training: bad task/split fails before any work
        model_dir = hf_model_dir(model, work)
        _log(f"{task_name}: {len(docs)} {split} examples; training NA-LoRA on {model} for {steps} steps")
        adapter_dir = work / "adapter"
        training = train_and_save(task, model_dir, adapter_dir, steps=steps, batch_size=batch_size, lr=lr,
                                  seed=seed, options=options)
        t_train = time.time() - t0

        data_file = work / "lm_eval_task" / f"{task_name}_{split}.jsonl"
        data_file.parent.mkdir(parents=True, exist_ok=True)
        data_file.write_text("".join(json.dumps(d) + "\n" for d in docs))
        lm_task = "nalora_interop_" + "".join(c if c.isalnum() else "_" for c in task_name)
        yaml_text = lm_eval_task_yaml(lm_task, data_file, task.target_delimiter, work / "hf_datasets")
        (data_file.parent / f"{lm_task}.yaml").write_text(yaml_text)

        t1 = time.time()
        ours, base_lls = project_scores(task, model_dir, adapter_dir, split, limit, eval_batch_size)
        t_ours = time.time() - t1
        t2 = time.time()
        theirs = lm_eval_scores(data_file.parent, lm_task, model_dir, adapter_dir, eval_batch_size)
        t_theirs = time.time() - t2
        result = compare(ours, theirs, docs, base_lls, tol)
        adapter_files = sorted(p.name for p in adapter_dir.iterdir())
        adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
        saved = saved_adapter_summary(adapter_dir)

    from benchmarks.runner.provenance import git_state, hardware, package_versions

    return {
        "check": "lm-eval interop: saved NA-LoRA adapter scored by the project's evaluator and by lm_eval (hf, peft=)",
        "task": task_name, "split": split, "limit": limit, "model": model,
        "protocol": task.protocol,
        "training": training,
        "adapter": {"files": adapter_files, "peft_type": adapter_config.get("peft_type"),
                    "target_modules": _targets(adapter_config.get("target_modules")),
                    "r": adapter_config.get("r"), "lora_alpha": adapter_config.get("lora_alpha"),
                    **saved},
        "lm_eval": {"version": importlib.metadata.version("lm_eval"), "task": lm_task, "task_yaml": yaml_text.replace(str(work), "<work>"),
                    "model_args": "pretrained=<model dir>,peft=<adapter dir>,dtype=float32,device=cpu",
                    "batch_size": eval_batch_size},
        "comparison": result,
        "per_example": [
            {"id": d["id"], "label": d["label"], "project_ll": a, "lm_eval_ll": b, "base_ll": c,
             "project_acc": pa, "lm_eval_acc": la, "project_acc_norm": pn, "lm_eval_acc_norm": ln}
            for d, a, b, c, pa, la, pn, ln in zip(docs, ours.lls, theirs.lls, base_lls, ours.acc, theirs.acc,
                                                   ours.acc_norm, theirs.acc_norm)
        ],
        "timing_s": {"train_and_save": round(t_train, 1), "project_eval": round(t_ours, 1), "lm_eval": round(t_theirs, 1)},
        "threads": torch.get_num_threads(),
        "versions": {**package_versions(), "lm_eval": importlib.metadata.version("lm_eval")},
        "git": git_state(), "hardware": hardware(),
    }


def render_md(rec: dict[str, Any]) -> str:
    """A short summary of ``rec`` (every number from the record)."""
    c, a = rec["comparison"], rec["adapter"]
    m, e = c["metrics"], c["adapter_effect"]
    lines = [
        f"# lm-eval interop: `{rec['task']}` ({rec['split']}, n = {c['n']})",
        "",
        f"Generated by `python -m benchmarks.interop.lm_eval_check --task {rec['task']}` (see docs/interop.md); "
        f"do not edit. Model `{rec['model']}`, NA-LoRA trained {rec['training']['steps']} steps "
        f"(batch {rec['training']['batch_size']}, lr {rec['training']['lr']:g}, seed {rec['training']['seed']}), "
        f"saved with `Adapted.save` as a peft `{a['peft_type']}` adapter (r = {a['r']}, modules "
        f"{', '.join(f'{k} x {v}' for k, v in a['modules'].items())}; {a['masked_gate_rows']['zero_rows']} of {a['masked_gate_rows']['rows']} "
        f"B_gate rows zero: the folded mask). lm_eval {rec['lm_eval']['version']}, `hf` model with `peft=`; fp32, CPU. "
        "A few training steps only: the numbers show that the two evaluators agree, not how well NA-LoRA learns the task.",
        "",
        "| metric | project evaluator | lm_eval | same per example |",
        "|---|---|---|---|",
        f"| acc | {m['project']['acc']:.4f} | {m['lm_eval']['acc']:.4f} | {c['same_acc']}/{c['n']} |",
        f"| acc_norm | {m['project']['acc_norm']:.4f} | {m['lm_eval']['acc_norm']:.4f} | {c['same_acc_norm']}/{c['n']} |",
        "",
        f"Base model without the adapter (project evaluator): acc {e['base_model_metrics']['acc']:.4f}, "
        f"acc_norm {e['base_model_metrics']['acc_norm']:.4f}.",
        "",
        f"- Choice log-likelihoods ({c['choices']} over {c['n']} examples): max |diff| {c['max_abs_ll_diff']:.3g}, "
        f"mean {c['mean_abs_ll_diff']:.3g} (tolerance {c['tolerance_abs_ll']:g}).",
        f"- Same argmax: {c['same_pred']}/{c['n']} (acc), {c['same_pred_norm']}/{c['n']} (acc_norm).",
        f"- The adapter moves the log-likelihoods by up to {c['adapter_effect']['max_abs_ll_change_vs_base']:.3g} "
        f"(mean {c['adapter_effect']['mean_abs_ll_change_vs_base']:.3g}) from the base model's and changes "
        f"{c['adapter_effect']['pred_changed_vs_base']} of {c['n']} predictions: lm_eval scoring the base model "
        "instead (ignoring `peft=`) would exceed the tolerance.",
        "",
        "| criterion | holds |",
        "|---|---|",
        *[f"| {k} | {'yes' if v else '**NO**'} |" for k, v in c["criteria"].items()],
        "",
        f"Result: **{'agree' if c['ok'] else 'DISAGREE'}**. Wall time (s): "
        + ", ".join(f"{k} {v}" for k, v in rec["timing_s"].items()) + f"; {rec['threads']} torch thread(s).",
        "",
    ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", default="quartz", help="a registered log-likelihood choice task (default quartz)")
    parser.add_argument("--model", default="smollm2-135m", help="asset-cache model, local HF dir or tiny-llama")
    parser.add_argument("--split", default="test", choices=("validation", "test"))
    parser.add_argument("--limit", type=int, default=100, help="examples compared (a fixed seeded subset)")
    parser.add_argument("--steps", type=int, default=8, help="NA-LoRA optimiser steps")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tol", type=float, default=1e-3, help="max abs difference of a choice log-likelihood")
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the machine is shared)")
    parser.add_argument("--data-dir", default=None, help="local <split>.jsonl files replacing the task's data")
    parser.add_argument("--out", default="results/interop", help="folder for lm_eval_<task>.json and .md")
    parser.add_argument("--work-dir", default=None,
                        help="keep the base model dir, adapter and lm-eval task here (default: a temp dir, removed)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.interop.lm_eval_check", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    # Everything is local: never wait on (or fail at) the unreachable hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        parser.error("lm_eval is not installed: pip install 'nalora-bench[interop]' (lm-eval>=0.4)")
    rec = run_check(args.task, model=args.model, split=args.split, limit=args.limit, steps=args.steps,
                    batch_size=args.batch_size, lr=args.lr, seed=args.seed, tol=args.tol,
                    eval_batch_size=args.eval_batch_size, data_dir=args.data_dir, work_dir=args.work_dir)
    from benchmarks.runner.store import atomic_write_json, atomic_write_text

    out = Path(args.out)
    atomic_write_json(out / f"lm_eval_{args.task}.json", rec)
    atomic_write_text(out / f"lm_eval_{args.task}.md", render_md(rec))
    c = rec["comparison"]
    print(render_md(rec))
    if not c["ok"]:
        failed = [k for k, v in c["criteria"].items() if not v]
        print(f"FAIL: project evaluator and lm_eval disagree: {'; '.join(failed)} (written to {out})")
        return 1
    print(f"ok: written {out / f'lm_eval_{args.task}.json'} and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
