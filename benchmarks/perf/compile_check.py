"""Pre-flight check of the compiled training step on a real model, on any machine (a CPU is enough).

Trains ``--steps`` steps of one method twice from the same seed, eagerly and through ``prepare_model(compile=True)``
(the runner's compiled path, ``--backend aot_eager`` by default: dynamo's graphs and guards without inductor's
code generation, so the losses must match eager exactly), over batches whose sequence length cycles through
``--lengths``, with an evaluation forward under ``eager_mode`` midway as in a run. Prints both loss curves, the
largest difference, and how many graphs dynamo built (a bounded count means no recompile per length or per
mask refresh). Exits 1 when the losses differ by more than ``--tol``.

``python3 -m benchmarks.perf.compile_check --model smollm2-135m --method nalora [--lengths 64 128 192 256]``
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from typing import Any

import torch


def _batches(lengths: list[int], batch: int, vocab: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, vocab, (batch, n), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def _train(base: torch.nn.Module, method: str, batches: list[dict], compiled: bool, backend: str,
           seed: int) -> tuple[list[float], dict[str, Any]]:
    from benchmarks.runner.compiled import eager_mode, prepare_model
    from nalora import inject

    torch.manual_seed(seed)
    adapted = inject(copy.deepcopy(base), method, targets=("gate", "up", "down"), rank=8, alpha=16)
    opt = adapted.make_optimizer(1e-3, total_steps=len(batches))
    model = adapted.model.train()
    prep = prepare_model(model, compile=compiled, bf16_frozen=False, light_loss=True, method=method,
                         mixed_precision="no", backend=backend)
    losses = []
    for i, batch in enumerate(batches):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if i == len(batches) // 2:  # a run's periodic evaluation: eager, no grad, another shape
            model.eval()
            with torch.no_grad(), eager_mode(model):
                model(input_ids=batch["input_ids"][:, :20])
            model.train()
    return losses, prep.to_dict()


def check(model_name: str, method: str, lengths: list[int], *, steps: int, batch: int = 2,
          backend: str = "aot_eager", seed: int = 0, base: torch.nn.Module | None = None) -> dict[str, Any]:
    """Eager and compiled losses of the same training, the largest difference and dynamo's graph count.
    ``base``: an already loaded model (else ``model_name`` is loaded)."""
    from torch._dynamo.utils import counters

    from benchmarks.runner.compiled import dynamo_graphs

    if base is None:
        from benchmarks.assets.models import load_model

        base = load_model(model_name).model
    vocab = int(base.config.vocab_size)
    batches = _batches([lengths[i % len(lengths)] for i in range(steps)], batch, vocab, seed)
    eager, _ = _train(base, method, batches, False, backend, seed)
    counters.clear()
    compiled, step = _train(base, method, batches, True, backend, seed)
    return {"model": model_name, "method": method, "backend": backend, "lengths": lengths, "steps": steps,
            "step": step, "graphs": dynamo_graphs(),
            "max_abs_loss_diff": max(abs(a - b) for a, b in zip(eager, compiled)),
            "eager_losses": eager, "compiled_losses": compiled}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="asset name, local directory or hub id")
    p.add_argument("--method", default="nalora")
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 64, 192, 256, 320])
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--backend", default="aot_eager", help="torch.compile backend (inductor: real code generation)")
    p.add_argument("--tol", type=float, default=0.0, help="largest loss difference accepted (aot_eager: exact)")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    a = p.parse_args(argv)
    if a.steps < 2 or any(n < 1 for n in a.lengths):
        p.error("--steps must be >= 2 and every --lengths value >= 1")
    r = check(a.model, a.method, a.lengths, steps=a.steps, backend=a.backend)
    print(f"{r['model']} {r['method']} ({r['backend']}): {r['steps']} steps over lengths {r['lengths']}; "
          f"compiled {r['step'].get('compile_scope')} x {r['step'].get('compiled_blocks')}; graphs {r['graphs']}; "
          f"largest loss difference {r['max_abs_loss_diff']:.3g}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(r, f, indent=1)
    return 0 if r["max_abs_loss_diff"] <= a.tol else 1


if __name__ == "__main__":
    sys.exit(main())
