"""``nalora-bench steptime``: training step time and peak memory of each method on one model and batch.

One process, one model, one fixed batch; every candidate (method x variant, plus with ``--reference``
a plain peft loop, a compiled peft loop and HF Trainer + peft) is built once and then timed in
``--rounds`` interleaved rounds (the starting candidate rotates each round), so that clock and
temperature drift hit all alike. A round is ``--warmup`` untimed steps then ``--steps`` timed ones,
timed with CUDA events on a GPU (no host sync inside the timed block) and ``perf_counter`` on CPU.
Reported: median step time with its IQR and range, peak memory, and the per-round ratios of every
method to ``lora`` of the same variant (median and IQR of the paired ratios).

Each candidate's build (model, adapter, ``prepare_model``) and first step, compilation included, are timed
once (``build_s``), and the graphs dynamo compiles for it are counted (``graphs``): the compile cost.

A candidate that runs past ``--candidate-timeout`` seconds in its build (compilation included) or in one
round is recorded as timed out (where) and left out of the later rounds; the others go on (a recompiling
model once stalled a whole command).

With ``--profile N``, each candidate then runs N more steps under ``torch.profiler``: per step, the wall time
under the profiler, the GPU's busy time (the kernels' and copies' durations added up), that busy time's share of
the wall time, and the kernels and the aten operators the step dispatched. A share well below 1 says the GPU waits
for the host (launches, Python), which no concurrency on the GPU side (more workers, MPS) can hide; on a CPU only
the operator count is there. The profiler's own cost inflates the wall time, so the timed rounds stay the figure
of record.

Variants of the project's runner step: ``eager`` (today's step: fp32 master weights under bf16 autocast,
the model's own loss), ``lean`` (``prepare_model`` without compile: frozen weights in bf16, chunked loss),
``compiled`` (``prepare_model``: lean + ``torch.compile``, its default scope: each repeated block, as runs
compile), ``compiled_model`` (the same with the whole model compiled, the earlier scope).

``--stack K``: also ``METHOD+VARIANT+stackK`` for each method and variant, K runs of the method stepped together on
K batches (``benchmarks/runner/stacked.py``: one base forward, each run its own adapters, optimiser, clip and, for
NA-LoRA, controller). Its step trains K runs: the ratio ``M+V / (M+V+stackK per run)`` is how many more runs per
GPU-hour stacking would give at this shape.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import signal
import statistics
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

DEFAULT_METHODS = "lora,nalora,nalora_mask,nalora_scale,dora,pissa"
VARIANTS = ("eager", "lean", "compiled", "compiled_model")
_SCOPES = {"compiled": "regional", "compiled_model": "model"}  # variant -> prepare_model's compile_scope
REFERENCES = ("peft", "peft+compile", "hf_trainer+peft")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m",
                        help="asset-cache model name, hub id, local dir, or a config *.json (random weights)")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated (default {DEFAULT_METHODS})")
    parser.add_argument("--variants", default="eager,compiled",
                        help=f"runner-step variants, comma-separated from {','.join(VARIANTS)}")
    parser.add_argument("--reference", action="store_true",
                        help="also time a plain peft loop, a compiled peft loop and HF Trainer + peft (LoRA)")
    parser.add_argument("--targets", default="gate,up,down", help="adapter targets (the suites' shared budget)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=30, help="timed optimiser steps per round")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before each round")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds over the candidates (>= 9 for a spread)")
    parser.add_argument("--candidate-timeout", type=float, default=900.0,
                        help="seconds one candidate may spend in its build or in one round before it is recorded "
                             "as timed out and dropped (0: no limit; POSIX main thread only)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after the rounds, N profiled steps per candidate: GPU busy time per step against its "
                             "wall time, kernels and aten operators per step (0: none)")
    parser.add_argument("--stack", default="", metavar="K[,K...]",
                        help="also time K runs of each method stepped together (one base forward, each run its "
                             "own adapters) for each K and variant (default: none)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (tests: aot_eager)")
    parser.add_argument("--out", default=None,
                        help="folder for steptime.json and steptime.md (a path ending in .json: that file and .md beside it)")


# ------------------------------------------------------------------------------------------------
# timing


class _Timer:
    """CUDA events on a GPU (queued, no sync until ``seconds``), ``perf_counter`` on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.t0 = self.t1 = 0.0
        if self.cuda:
            self.e0, self.e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def start(self) -> None:
        if self.cuda:
            self.e0.record()
        else:
            self.t0 = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            self.e1.record()
        else:
            self.t1 = time.perf_counter()

    def seconds(self) -> float:
        if self.cuda:
            self.e1.synchronize()
            return self.e0.elapsed_time(self.e1) / 1e3
        return self.t1 - self.t0


def _mem_now(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


@dataclass
class Candidate:
    """One thing timed: ``build()`` once, then ``run(n, timer)`` runs ``n`` steps (timer around the last ones)."""

    name: str
    group: str  # "runner" | "reference"
    method: str
    variant: str
    build: Callable[[], Callable[[int, int, _Timer], None]]
    info: dict = field(default_factory=dict)
    step_s: list[float] = field(default_factory=list)
    peak_bytes: list[int] = field(default_factory=list)
    resident_bytes: int = 0
    runner: Callable[[int, int, _Timer], None] | None = None
    timed_out: str | None = None  # "build" or "round N" when it ran past the per-candidate limit
    build_s: float = 0.0  # wall time of build() and the first step (compilation included)
    graphs: int = 0  # graphs dynamo compiled while this candidate ran (build and rounds)
    profile: dict | None = None  # profile_steps' result (--profile)
    stack: int = 1  # runs trained by one step (--stack)


class CandidateTimeout(Exception):
    """A candidate ran past ``--candidate-timeout`` (raised from SIGALRM inside its build or round)."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise ``CandidateTimeout`` in the block after ``seconds`` (wall clock); no limit when ``seconds`` <= 0
    or where SIGALRM cannot be used (not POSIX, not the main thread). Python code only is interrupted: a
    single native call (one kernel, one compiler subprocess wait) ends first."""
    usable = seconds > 0 and hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise CandidateTimeout(f"over {seconds:g} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _loop(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: dict, device: torch.device,
          params: list[torch.nn.Parameter], *, clip: Callable[[], Any] | None = None) -> Callable[[int, int, _Timer], None]:
    """The runner's step (train.py): autocast forward, backward, clip, optimiser step, zero_grad. ``clip``
    (default: ``params`` clipped to norm 1) serves stacked runs (each clipped on its own)."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    clip = clip or (lambda: torch.nn.utils.clip_grad_norm_(params, 1.0))

    def step() -> None:
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        clip()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def run(warmup: int, steps: int, timer: _Timer) -> None:
        for _ in range(warmup):
            step()
        timer.start()
        for _ in range(steps):
            step()
        timer.stop()

    return run


def _runner_candidate(method: str, variant: str, base: torch.nn.Module, batch: dict, device: torch.device, *,
                      targets: tuple[str, ...], rank: int, total_steps: int, backend: str) -> Candidate:
    def build() -> Callable:
        from benchmarks.runner.compiled import prepare_model
        from nalora import inject

        torch.manual_seed(0)
        adapted = inject(copy.deepcopy(base).to(device), method, targets=targets, rank=rank, alpha=2 * rank)
        opt = adapted.make_optimizer(1e-4, total_steps=total_steps)
        model = adapted.model.train()
        if variant != "eager":
            prep = prepare_model(model, compile=variant in _SCOPES, bf16_frozen=True, method=method,
                                 mixed_precision="bf16" if device.type == "cuda" else "no", light_loss=True,
                                 backend=backend, compile_scope=_SCOPES.get(variant, "regional"))
            cand.info["prepare"] = prep
        return _loop(model, opt, batch, device, [p for p in model.parameters() if p.requires_grad])

    cand = Candidate(name=method if variant == "eager" else f"{method}+{variant}", group="runner", method=method,
                     variant=variant, build=build)
    return cand


class _Optimizers:
    """Stacked runs' optimisers, stepped as one (each its own param groups, hooks and state)."""

    def __init__(self, opts: list[torch.optim.Optimizer]) -> None:
        self.opts = opts

    def step(self) -> None:
        for o in self.opts:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.opts:
            o.zero_grad(set_to_none=set_to_none)


def _stacked_candidate(method: str, k: int, variant: str, base: torch.nn.Module, batch: dict, device: torch.device, *,
                       targets: tuple[str, ...], rank: int, total_steps: int, backend: str) -> Candidate:
    """``k`` runs of ``method`` (seeds 0..k-1, one set of frozen weights) stepped together on ``k`` batches
    (``benchmarks.runner.stacked``): each run its own optimiser and, for NA-LoRA, controller; clipped per run."""
    def build() -> Callable:
        from benchmarks.runner.compiled import prepare_model
        from benchmarks.runner.stacked import shared_copy, stack_runs
        from nalora import inject

        shared = copy.deepcopy(base).to(device)
        runs, opts = [], []
        for seed in range(k):
            torch.manual_seed(seed)
            runs.append(inject(shared_copy(shared), method, targets=targets, rank=rank, alpha=2 * rank))
            opts.append(runs[-1].make_optimizer(1e-4, total_steps=total_steps))
        model = stack_runs(runs).train()
        if variant != "eager":
            cand.info["prepare"] = prepare_model(
                model, compile=variant in _SCOPES, bf16_frozen=True, method=method,
                mixed_precision="bf16" if device.type == "cuda" else "no", light_loss=True, backend=backend,
                compile_scope=_SCOPES.get(variant, "regional"))
        g = torch.Generator().manual_seed(1)
        rows, length = k * batch["input_ids"].shape[0], batch["input_ids"].shape[1]
        ids = torch.randint(0, base.config.vocab_size, (rows, length), generator=g).to(device)
        stacked = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        groups = [[p for p in r.model.parameters() if p.requires_grad] for r in runs]
        # the stacked model's loss is the sum of the runs' own mean losses (stack_runs)
        return _loop(model, _Optimizers(opts), stacked, device, [],
                     clip=lambda: [torch.nn.utils.clip_grad_norm_(ps, 1.0) for ps in groups])

    cand = Candidate(name=f"{method}+stack{k}" if variant == "eager" else f"{method}+{variant}+stack{k}",
                     group="stacked", method=method, variant=variant, build=build, stack=k)
    return cand


def _peft_model(base: torch.nn.Module, targets: tuple[str, ...], rank: int, device: torch.device) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    from nalora.discovery import find_gated_ffns

    unknown = set(targets) - {"gate", "up", "down"}
    if unknown:
        raise ValueError(f"--reference supports targets gate, up, down; got {sorted(unknown)}")
    names = [getattr(f, t) for f in find_gated_ffns(base) for t in targets]
    torch.manual_seed(0)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=sorted(set(names)))
    return get_peft_model(copy.deepcopy(base).to(device), cfg).train()


def _reference_candidates(base: torch.nn.Module, batch: dict, device: torch.device, *, targets: tuple[str, ...],
                          rank: int, backend: str) -> list[Candidate]:
    fused = {"fused": True} if device.type == "cuda" else {}

    def peft_loop(compiled: bool) -> Callable:
        def build() -> Callable:
            model = _peft_model(base, targets, rank, device)
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-4, **fused)
            runner_model = torch.compile(model, backend=backend) if compiled else model
            return _loop(runner_model, opt, batch, device, params)
        return build

    def hf_trainer() -> Callable:
        from transformers import Trainer, TrainerCallback, TrainingArguments

        model = _peft_model(base, targets, rank, device)
        rows = [{k: v[i].cpu() for k, v in batch.items()} for i in range(batch["input_ids"].shape[0])]
        out_dir = tempfile.mkdtemp(prefix="steptime-trainer-")

        class Data(torch.utils.data.Dataset):
            def __len__(self) -> int:
                return 10**6

            def __getitem__(self, i: int) -> dict:
                return rows[i % len(rows)]

        class Clock(TrainerCallback):
            """Starts the timer when the warm-up steps are done and stops it after the last step."""

            def __init__(self, warmup: int, steps: int, timer: _Timer) -> None:
                self.warmup, self.last, self.timer = warmup, warmup + steps, timer

            def on_step_begin(self, args, state, control, **kw):
                if state.global_step == self.warmup:
                    self.timer.start()

            def on_step_end(self, args, state, control, **kw):
                if state.global_step == self.last:
                    self.timer.stop()

        def run(warmup: int, steps: int, timer: _Timer) -> None:
            args = TrainingArguments(
                output_dir=out_dir, max_steps=warmup + steps, per_device_train_batch_size=len(rows),
                learning_rate=1e-4, lr_scheduler_type="constant", max_grad_norm=1.0, bf16=device.type == "cuda",
                optim="adamw_torch_fused" if device.type == "cuda" else "adamw_torch", logging_strategy="no",
                save_strategy="no", report_to=[], disable_tqdm=True, remove_unused_columns=False,
                dataloader_num_workers=0, use_cpu=device.type != "cuda")
            Trainer(model=model, args=args, train_dataset=Data(), callbacks=[Clock(warmup, steps, timer)]).train()

        return run

    return [Candidate("peft", "reference", "lora", "peft", peft_loop(False)),
            Candidate("peft+compile", "reference", "lora", "peft+compile", peft_loop(True)),
            Candidate("hf_trainer+peft", "reference", "lora", "hf_trainer", hf_trainer)]


# ------------------------------------------------------------------------------------------------
# statistics


def spread(xs: list[float]) -> dict[str, Any]:
    """Median, IQR (inclusive quartiles) and range of ``xs``."""
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return {"median": statistics.median(xs), "iqr": [q[0], q[2]], "min": min(xs), "max": max(xs), "n": len(xs)}


def _ratios(cands: dict[str, Candidate]) -> dict[str, dict]:
    """Per-round paired ratios of each runner candidate to ``lora`` of the same variant (time and peak memory)."""
    out: dict[str, dict] = {}
    by = {(c.method, c.variant): c for c in cands.values() if c.group == "runner"}
    for (m, v), c in by.items():
        ref = by.get(("lora", v))
        if ref is None or m == "lora" or not c.step_s or not ref.step_s:
            continue  # (a candidate timed out in its build has no rounds; one timed out later pairs its first ones)
        entry = {"time": spread([a / b for a, b in zip(c.step_s, ref.step_s)])}
        if c.peak_bytes and ref.peak_bytes and all(ref.peak_bytes):
            entry["peak_memory"] = spread([a / b for a, b in zip(c.peak_bytes, ref.peak_bytes)])
        out[f"{c.name} / {ref.name}"] = entry
    for c in cands.values():  # stacked: one run's step alone against a stacked step's share per run
        ref = by.get((c.method, c.variant))
        if c.group == "stacked" and ref is not None and c.step_s and ref.step_s:
            out[f"{ref.name} / ({c.name} per run)"] = {
                "time": spread([b / (a / c.stack) for a, b in zip(c.step_s, ref.step_s)])}
    comps = {"lora+compiled": ("peft+compile", "hf_trainer+peft", "peft", "lora")}
    for mine, others in comps.items():
        if mine not in cands:
            continue
        for other in others:
            if other in cands and cands[other].step_s and cands[mine].step_s:
                out[f"{other} / {mine}"] = {"time": spread([a / b for a, b in zip(cands[other].step_s, cands[mine].step_s)])}
    return out


# ------------------------------------------------------------------------------------------------
# measurement


def _load_base(model_name: str) -> tuple[torch.nn.Module, str]:
    """The base model and where its weights come from. A ``*.json`` path is a Hugging Face config: the
    model is built from it with random fp32 weights (step time does not depend on the values; this is how
    the GPU machine, which has no asset cache, times the real architecture: benchmarks/perf/configs/)."""
    if model_name.endswith(".json") and Path(model_name).is_file():
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.for_model(**_read_json(model_name))
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval(), f"random init from {model_name}"
    from tasks.common import load_causal_lm

    return load_causal_lm(model_name)[0], "pretrained"


def _read_json(path: str) -> dict:
    import json

    d = json.loads(Path(path).read_text())
    d.pop("_model_name_or_path", None)
    return d


def profile_steps(runner: Callable[[int, int, "_Timer"], None], steps: int, device: torch.device) -> dict[str, Any]:
    """``steps`` steps of ``runner`` under ``torch.profiler``, after one unprofiled step: per step, the wall time
    (ms, profiler included), the GPU's busy time (ms: every kernel, copy and memset added up; one stream, so
    nothing overlaps), its share of the wall time, kernels and aten operators; GPU fields None on a CPU."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    runner(1, 0, _Timer(device))
    if cuda:
        torch.cuda.synchronize()
    with warnings.catch_warnings():  # "clears events at the end of each cycle": there is one cycle, no schedule
        warnings.filterwarnings("ignore", message=".*Profiler clears events.*")
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            t0 = time.perf_counter()
            runner(0, steps, _Timer(device))
            if cuda:
                torch.cuda.synchronize()
            wall_ms = 1e3 * (time.perf_counter() - t0)
        events = prof.events()
    on_gpu = [e for e in events if e.device_type == DeviceType.CUDA]
    busy_ms = sum(e.time_range.elapsed_us() for e in on_gpu) / 1e3
    ops = sum(1 for e in events if e.device_type == DeviceType.CPU and e.name.startswith("aten::"))
    return {"steps": steps, "wall_ms": wall_ms / steps, "gpu_busy_ms": busy_ms / steps if cuda else None,
            "gpu_busy_share": busy_ms / wall_ms if cuda and wall_ms > 0 else None,
            "gpu_ops": len(on_gpu) / steps if cuda else None, "aten_ops": ops / steps,
            "top_self_cpu": _top_self_cpu(prof.key_averages(), steps)}


def _top_self_cpu(averages: Any, steps: int, n: int = 12) -> list[dict[str, Any]]:
    """The ``n`` host operators with the most self CPU time per step: where a host-bound step's time goes
    (calls and self CPU ms per step, and the GPU time their own kernels took)."""
    rows = sorted((a for a in averages if a.self_cpu_time_total > 0), key=lambda a: -a.self_cpu_time_total)[:n]
    return [{"name": a.key, "calls": a.count / steps, "self_cpu_ms": a.self_cpu_time_total / 1e3 / steps,
             "self_device_ms": getattr(a, "self_device_time_total", 0) / 1e3 / steps} for a in rows]


@contextlib.contextmanager
def _count_graphs(c: Candidate) -> Iterator[None]:
    """Add the graphs dynamo compiles inside the block to ``c.graphs`` (its global counter, read before and after)."""
    from benchmarks.runner.compiled import dynamo_graphs

    before = dynamo_graphs()
    try:
        yield
    finally:
        c.graphs += dynamo_graphs() - before


def measure(model_name: str, methods: list[str], *, variants: tuple[str, ...] = ("eager", "compiled"),
            reference: bool = False, targets: tuple[str, ...] = ("gate", "up", "down"), rank: int = 8,
            batch_size: int = 8, seq_len: int = 512, steps: int = 30, warmup: int = 5, rounds: int = 9,
            compile_backend: str = "inductor", candidate_timeout: float = 0.0, progress: bool = True,
            checkpoint: Callable[[dict[str, Any]], None] | None = None, profile: int = 0,
            stack: tuple[int, ...] = ()) -> dict[str, Any]:
    """Time every candidate over ``rounds`` interleaved rounds on one fixed batch; see the module doc.

    ``checkpoint(result)`` is called after every round with the rounds so far (a command stopped by a
    time limit still leaves its finished rounds). ``candidate_timeout`` (seconds, 0: none): a candidate's
    build or round that runs longer is recorded as timed out and the candidate is dropped from later rounds.
    ``profile``: steps per candidate of ``profile_steps`` after the rounds (0: none). ``stack``: the K of the
    stacked LoRA candidates (``--stack``)."""
    from tqdm.auto import tqdm

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    base, weights = _load_base(model_name)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (batch_size, seq_len), generator=g)
    batch = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": ids.to(device)}
    total = rounds * (warmup + steps) + warmup  # NA-LoRA's schedule spans every step it will take

    cands: dict[str, Candidate] = {}
    for v in variants:
        for m in methods:
            c = _runner_candidate(m, v, base, batch, device, targets=targets, rank=rank, total_steps=total,
                                  backend=compile_backend)
            cands[c.name] = c
    for v in variants:
        for m in methods:
            for k in stack:
                c = _stacked_candidate(m, k, v, base, batch, device, targets=targets, rank=rank, total_steps=total,
                                       backend=compile_backend)
                cands[c.name] = c
    if reference:
        for c in _reference_candidates(base, batch, device, targets=targets, rank=rank, backend=compile_backend):
            cands[c.name] = c
    order = list(cands.values())
    bar = tqdm(total=len(order) * (rounds + 1), desc="steptime", disable=not progress)
    for c in order:  # build + first (compiling) steps, outside the timed rounds; resident memory measured here
        before, t0 = _mem_now(device), time.perf_counter()
        try:
            with time_limit(candidate_timeout), _count_graphs(c):
                c.runner = c.build()
                c.runner(1, 1, _Timer(device))
                if device.type == "cuda":
                    torch.cuda.synchronize()
        except CandidateTimeout as err:
            c.timed_out = "build"
            print(f"steptime: {c.name} timed out in its build ({err}); left out", file=sys.stderr)
        c.build_s = time.perf_counter() - t0
        c.resident_bytes = _mem_now(device) - before
        bar.update(1)

    def result() -> dict[str, Any]:
        return _assemble(model_name, weights, device, targets, rank, batch_size, seq_len, steps, warmup,
                         r + 1, compile_backend, candidate_timeout, order, cands)

    for r in range(rounds):
        for c in order[r % len(order):] + order[: r % len(order)]:
            bar.update(1)
            if c.timed_out:
                continue
            timer = _Timer(device)
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(device)
            start = _mem_now(device)
            try:
                with time_limit(candidate_timeout), _count_graphs(c):
                    c.runner(warmup, steps, timer)
                    seconds = timer.seconds()
            except CandidateTimeout as err:
                c.timed_out = f"round {r}"
                print(f"steptime: {c.name} timed out in round {r} ({err}); left out from here", file=sys.stderr)
                continue
            c.step_s.append(seconds / steps)
            if device.type == "cuda":
                c.peak_bytes.append(c.resident_bytes + torch.cuda.max_memory_allocated(device) - start)
        if checkpoint is not None:
            checkpoint(result())
    for c in order if profile > 0 else []:
        if c.timed_out or c.variant == "hf_trainer":  # its run() builds a Trainer: the setup would be profiled too
            continue
        try:
            with time_limit(candidate_timeout), _count_graphs(c):
                c.profile = profile_steps(c.runner, profile, device)
        except CandidateTimeout as err:
            print(f"steptime: {c.name} timed out in its profiled steps ({err})", file=sys.stderr)
    bar.close()
    return result()


def _assemble(model_name: str, weights: str, device: torch.device, targets: tuple[str, ...], rank: int,
              batch_size: int, seq_len: int, steps: int, warmup: int, rounds: int, compile_backend: str,
              candidate_timeout: float, order: list[Candidate], cands: dict[str, Candidate]) -> dict[str, Any]:
    """The measurement so far as a JSON-able dict (``rounds``: rounds finished)."""
    def cand_json(c: Candidate) -> dict:
        d = {"group": c.group, "method": c.method, "variant": c.variant, "step_s": c.step_s,
             "resident_mib": c.resident_bytes / 2**20, "build_s": c.build_s, "graphs": c.graphs}
        if c.step_s:
            d["step_ms"] = spread([1e3 * s for s in c.step_s])
        if c.stack > 1:
            d["runs_per_step"] = c.stack
            if c.step_s:
                d["per_run_step_ms"] = spread([1e3 * s / c.stack for s in c.step_s])
        if c.timed_out:
            d["timed_out"] = c.timed_out
        if c.peak_bytes:
            d["peak_mib"] = spread([b / 2**20 for b in c.peak_bytes])
        if "prepare" in c.info:
            d["prepare"] = c.info["prepare"].to_dict()
        if c.profile is not None:
            d["profile"] = c.profile
        return d

    eager = {c.name: c for c in order if c.group == "runner" and c.variant == "eager"}
    median = {n: statistics.median(c.step_s) for n, c in eager.items() if c.step_s}
    return {
        "model": model_name, "weights": weights, "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "targets": list(targets), "rank": rank, "batch_size": batch_size,
        "seq_len": seq_len, "steps": steps, "warmup": warmup, "rounds": rounds,
        "timer": "cuda events" if device.type == "cuda" else "perf_counter",
        "mixed_precision": "bf16" if device.type == "cuda" else "no", "compile_backend": compile_backend,
        "candidates": {c.name: cand_json(c) for c in order},
        "ratios": _ratios(cands),
        # kept from the first version of this tool (eager runner step only)
        "candidate_timeout_s": candidate_timeout,
        "step_time_s": {n: c.step_s for n, c in eager.items()}, "median_step_time_s": median,
        "ratio_to_lora": {n: v / median["lora"] for n, v in median.items()} if "lora" in median else {},
    }


def to_markdown(r: dict[str, Any]) -> str:
    """The measurement as markdown tables (every number read from ``r``)."""
    lines = [f"# Step time: {r['model']} on {r['device']}", "",
             f"batch {r['batch_size']} x {r['seq_len']} tokens, targets {'+'.join(r['targets'])}, rank {r['rank']}, "
             f"{r['mixed_precision']} autocast, {r['rounds']} interleaved rounds of {r['steps']} steps after "
             f"{r['warmup']} untimed ones, timed with {r['timer']}, torch {r['torch']}.", "",
             "| candidate | median step (ms) | IQR (ms) | min-max (ms) | peak memory (MiB) | step setup "
             "| build + first step (s) | graphs |",
             "|---|---|---|---|---|---|---|---|"]
    for name, c in r["candidates"].items():
        if "step_ms" not in c:
            lines.append(f"| {name} | timed out ({c.get('timed_out', 'no rounds')}) | - | - | - | {c['group']} "
                         f"| {c.get('build_s', 0):.1f} | {c.get('graphs', '-')} |")
            continue
        s = c["step_ms"]
        if c.get("timed_out"):
            name = f"{name} (timed out in {c['timed_out']})"
        peak = f"{c['peak_mib']['median']:.0f}" if "peak_mib" in c else "-"
        prep = c.get("prepare")
        how = c["group"] if prep is None else (
            (f"compiled ({prep.get('compile_scope') or 'model'})" if prep["compiled"]
             else f"eager: {prep['compile_reason']}")
            + f", {prep['bf16_frozen_params']} bf16 frozen, loss {prep['loss']}")
        if c.get("runs_per_step"):
            how += f"; {c['runs_per_step']} runs per step, {c['per_run_step_ms']['median']:.2f} ms per run"
        lines.append(f"| {name} | {s['median']:.2f} | {s['iqr'][0]:.2f}-{s['iqr'][1]:.2f} | "
                     f"{s['min']:.2f}-{s['max']:.2f} | {peak} | {how} | {c.get('build_s', 0):.1f} | {c.get('graphs', '-')} |")
    profiled = {n: c["profile"] for n, c in r["candidates"].items() if c.get("profile")}
    if profiled:
        f = lambda x, d=2: "-" if x is None else f"{x:.{d}f}"  # noqa: E731
        lines += ["", f"Profiled steps ({next(iter(profiled.values()))['steps']} per candidate, torch.profiler; its "
                  "overhead is in the wall time; busy = kernels, copies and memsets added up):", "",
                  "| candidate | wall per step (ms) | GPU busy per step (ms) | busy share | GPU ops per step "
                  "| aten ops per step |", "|---|---|---|---|---|---|"]
        for name, p in profiled.items():
            lines.append(f"| {name} | {f(p['wall_ms'])} | {f(p['gpu_busy_ms'])} | {f(p['gpu_busy_share'])} "
                         f"| {f(p['gpu_ops'], 0)} | {f(p['aten_ops'], 0)} |")
        lines += ["", "Host operators with the most self CPU time per profiled step (top 6 of each candidate; the "
                  "JSON has 12):", "", "| candidate | operator | calls per step | self CPU ms per step | own GPU ms "
                  "per step |", "|---|---|---|---|---|"]
        for name, p in profiled.items():
            for op in p.get("top_self_cpu", [])[:6]:
                lines.append(f"| {name} | `{op['name']}` | {op['calls']:.0f} | {op['self_cpu_ms']:.2f} "
                             f"| {op['self_device_ms']:.2f} |")
    if r["ratios"]:
        lines += ["", "Paired per-round ratios (median, IQR):", "",
                  "| ratio | time | time IQR | peak memory |", "|---|---|---|---|"]
        for name, e in r["ratios"].items():
            t = e["time"]
            mem = f"{e['peak_memory']['median']:.3f}" if "peak_memory" in e else "-"
            lines.append(f"| {name} | {t['median']:.3f} | {t['iqr'][0]:.3f}-{t['iqr'][1]:.3f} | {mem} |")
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> int:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    from nalora import list_methods

    unknown = [m for m in methods if m not in list_methods()]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}; known: {', '.join(list_methods())}")
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        raise ValueError(f"--variants: unknown {bad[0] if bad else '(none)'!r}; known: {', '.join(VARIANTS)}")
    try:
        stack = tuple(int(k) for k in args.stack.split(",") if k.strip())
    except ValueError:
        raise ValueError(f"--stack: comma-separated integers >= 2, got {args.stack!r}") from None
    if any(k < 2 for k in stack):
        raise ValueError(f"--stack: each K must be >= 2 (runs stepped together), got {args.stack!r}")
    for name in ("steps", "rounds", "batch_size", "seq_len", "rank"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0")
    if args.warmup < 0:
        raise ValueError("--warmup must be >= 0")
    if args.profile < 0:
        raise ValueError(f"--profile must be >= 0 steps, got {args.profile}")
    if not args.candidate_timeout >= 0:
        raise ValueError(f"--candidate-timeout must be >= 0 seconds, got {args.candidate_timeout}")
    out = None
    if args.out:
        out = Path(args.out)
        if out.suffix != ".json":
            out = out / "steptime.json"
        out.parent.mkdir(parents=True, exist_ok=True)

    def save(r: dict[str, Any]) -> None:
        if out is not None:
            from benchmarks.runner.store import atomic_write_json

            atomic_write_json(out, r)
            out.with_suffix(".md").write_text(to_markdown(r))

    r = measure(args.model, methods, variants=variants, reference=args.reference,
                targets=tuple(t for t in args.targets.split(",") if t), rank=args.rank, batch_size=args.batch_size,
                seq_len=args.seq_len, steps=args.steps, warmup=args.warmup, rounds=args.rounds,
                compile_backend=args.compile_backend, candidate_timeout=args.candidate_timeout, checkpoint=save,
                profile=args.profile, stack=stack)
    save(r)
    print(to_markdown(r))
    return 0
