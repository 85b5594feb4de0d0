"""``nalora-bench steptime``: training step time of each method on one model, the same batch for all.

The grid's ``step_time_s`` comes from runs that share a GPU with other workers, so it is noisy. This tool
measures the controller's overhead alone: one process, one model, fixed-shape batches, every method in
interleaved rounds (so drift of clocks and temperature hits all methods alike), CUDA synchronised only
at the ends of each timed block (the hot loop stays free of host syncs, as in the runner).
Reports the median step time per method and its ratio to ``lora``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path
from typing import Any

import torch

DEFAULT_METHODS = "lora,nalora,nalora_mask,nalora_scale,dora,pissa"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="asset-cache model name, hub id or local dir")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated (default {DEFAULT_METHODS})")
    parser.add_argument("--targets", default="gate,up,down", help="adapter targets (the suites' shared budget)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50, help="timed optimiser steps per round")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps before each round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the methods")
    parser.add_argument("--out", default=None, help="write the measurement as JSON (and .md beside it)")


def time_method(method: str, base: torch.nn.Module, batch: dict, *, targets: tuple[str, ...], rank: int, steps: int,
                warmup: int, device: torch.device) -> float:
    """Seconds per optimiser step of ``method`` (forward, backward, clip, step, zero_grad) over ``steps``,
    on a fresh copy of ``base`` (loaded once: reloading per trial costs more than the trial)."""
    from nalora import inject

    torch.manual_seed(0)
    adapted = inject(copy.deepcopy(base).to(device), method, targets=targets, rank=rank, alpha=2 * rank)
    total = warmup + steps
    opt = adapted.make_optimizer(1e-4, total_steps=total)
    params = [p for p in adapted.model.parameters() if p.requires_grad]
    model = adapted.model.train()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def measure(model_name: str, methods: list[str], *, targets: tuple[str, ...] = ("gate", "up", "down"), rank: int = 8,
            batch_size: int = 8, seq_len: int = 512, steps: int = 50, warmup: int = 10, rounds: int = 3,
            progress: bool = True) -> dict[str, Any]:
    """Median step time per method over ``rounds`` interleaved rounds; ratios to ``lora`` when it is measured."""
    from tqdm.auto import tqdm

    from tasks.common import load_causal_lm

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    base, _ = load_causal_lm(model_name)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (batch_size, seq_len), generator=g)
    batch = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": ids.to(device)}
    times: dict[str, list[float]] = {m: [] for m in methods}
    bar = tqdm(total=rounds * len(methods), desc="steptime", disable=not progress)
    for _ in range(rounds):
        for m in methods:
            times[m].append(time_method(m, base, batch, targets=targets, rank=rank, steps=steps,
                                        warmup=warmup, device=device))
            if device.type == "cuda":  # the trial's model is gone: hand its memory back before the next one
                torch.cuda.empty_cache()
            bar.update(1)
    bar.close()
    median = {m: statistics.median(v) for m, v in times.items()}
    ref = median.get("lora")
    return {
        "model": model_name, "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "targets": list(targets), "rank": rank, "batch_size": batch_size,
        "seq_len": seq_len, "steps": steps, "warmup": warmup, "rounds": rounds,
        "mixed_precision": "bf16" if device.type == "cuda" else "no",
        "step_time_s": times, "median_step_time_s": median,
        "ratio_to_lora": {m: v / ref for m, v in median.items()} if ref else {},
    }


def to_markdown(r: dict[str, Any]) -> str:
    lines = [f"# Step time per method: {r['model']} on {r['device']}", "",
             f"batch {r['batch_size']} x {r['seq_len']} tokens, targets {'+'.join(r['targets'])}, rank {r['rank']}, "
             f"{r['mixed_precision']}, median of {r['rounds']} interleaved rounds of {r['steps']} steps "
             f"(after {r['warmup']} warm-up steps), torch {r['torch']}.", "",
             "| method | median step (ms) | rounds (ms) | vs lora |", "|---|---|---|---|"]
    for m, med in r["median_step_time_s"].items():
        rounds = ", ".join(f"{1e3 * t:.2f}" for t in r["step_time_s"][m])
        ratio = r["ratio_to_lora"].get(m)
        lines.append(f"| {m} | {1e3 * med:.2f} | {rounds} | {'-' if ratio is None else f'{ratio:.3f}'} |")
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> int:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    from nalora import list_methods

    unknown = [m for m in methods if m not in list_methods()]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}; known: {', '.join(list_methods())}")
    for name in ("steps", "rounds", "batch_size", "seq_len", "rank"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0")
    r = measure(args.model, methods, targets=tuple(t for t in args.targets.split(",") if t), rank=args.rank,
                batch_size=args.batch_size, seq_len=args.seq_len, steps=args.steps, warmup=args.warmup,
                rounds=args.rounds)
    text = to_markdown(r)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        from benchmarks.runner.store import atomic_write_json

        atomic_write_json(out, r)
        out.with_suffix(".md").write_text(text)
    return 0
