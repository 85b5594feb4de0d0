"""Selection misalignment (NALORA.md diagnostics): how much an adapter moves the gates' selection weights."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from nalora.activations import has_partition, normalize_activation, regime_thresholds, selection


def _gate_part(out: torch.Tensor, f: Any) -> torch.Tensor:
    dim = int(getattr(f, "chunk_dim", -1))
    if f.layout == "packed" and f.gate_rows is not None:
        rows = f.gate_rows
        out = out.narrow(dim, rows.start or 0, len(range(out.shape[dim])[rows]))
    return out if dim in (-1, out.dim() - 1) else out.movedim(dim, -1)


def _run(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


def snapshot_trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the trainable parameters: the reference state for ``selection_misalignment``."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@contextlib.contextmanager
def parameters_swapped(model: nn.Module, values: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Inside the block, the named parameters of ``model`` hold ``values``; restored afterwards."""
    params = dict(model.named_parameters())
    missing = sorted(set(values) - set(params))
    if missing:
        raise ValueError(f"reference state names parameters the model does not have, e.g. {missing[0]!r}")
    kept = {n: params[n].detach().clone() for n in values}
    try:
        with torch.no_grad():
            for n, v in values.items():
                params[n].copy_(v)
        yield
    finally:
        with torch.no_grad():
            for n, v in kept.items():
                params[n].copy_(v)


@torch.no_grad()
def selection_misalignment(
    model: nn.Module,
    ffns: Sequence[Any],
    batches: Iterable[Any],
    adapter_name: str = "default",
    tol: float = 0.1,
    reference: Mapping[str, torch.Tensor] | Callable[[], contextlib.AbstractContextManager] | None = None,
) -> dict[str, Any]:
    """Trained model vs its reference state on held-out ``batches``, per gate channel and real token.

    ``misalignment``: mean ``|s(g + dg) - s(g)|``; ``regime_change``: fraction of (token, channel) pairs
    whose regime (suppressed / selecting / linear, ``|k-1| <= tol``) differs (over FFNs with a partition;
    NaN if none). Real tokens: a batch dict's 2-D ``attention_mask`` when its shape matches, else all.
    ``dg`` includes the effect of changes upstream.

    ``reference``: the state ``g`` is measured in. ``None``: the adapter switched off (peft
    ``disable_adapter()``), right for adapters that start at zero (LoRA, DoRA, NA-LoRA). A mapping of
    parameter name -> value (``snapshot_trainable`` taken before training) measures against the model as
    it was before training: needed where the adapter starts non-zero on a modified base (PiSSA) and for
    full fine-tuning. Or a callable returning a context manager that switches the reference on.
    """
    if not ffns:
        raise ValueError("selection_misalignment needs at least one gated FFN")
    if reference is None:
        if not hasattr(model, "disable_adapter"):
            raise ValueError(f"{type(model).__name__} has no disable_adapter(): pass reference=snapshot_trainable(...) "
                             "taken before training")
        active = getattr(model, "active_adapter", adapter_name)
        if active != adapter_name:
            raise ValueError(f"adapter {adapter_name!r} is not the active adapter ({active!r}); set_adapter it first")
        reference = model.disable_adapter
    elif isinstance(reference, Mapping):
        values = reference
        reference = lambda: parameters_swapped(model, values)  # noqa: E731
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    acts = [normalize_activation(f.activation, strict=True) for f in ffns]
    thr = [regime_thresholds(a, tol) if has_partition(a) else None for a in acts]
    gates = [base.get_submodule(f.gate) for f in ffns]
    captured: dict[int, torch.Tensor] = {}
    hooks = [g.register_forward_hook(lambda m, a, o, i=i: captured.__setitem__(i, _gate_part(o, ffns[i])))
             for i, g in enumerate(gates)]
    was_training = model.training
    model.eval()
    sums = [{"mis": 0.0, "chg": 0.0, "n": 0.0} for _ in ffns]
    n_batches = 0
    try:
        for batch in batches:
            n_batches += 1
            captured.clear()
            _run(model, batch)
            on = dict(captured)
            captured.clear()
            with reference():
                _run(model, batch)
            off = dict(captured)
            am = batch.get("attention_mask") if isinstance(batch, dict) else None
            for i, f in enumerate(ffns):
                if i not in on or i not in off:
                    continue  # this FFN did not run on this batch (e.g. no image in a VLM batch)
                g1, g0 = on[i].float(), off[i].float()
                w = None
                if torch.is_tensor(am) and tuple(am.shape) == tuple(g1.shape[:-1]):
                    w = am.to(g1.dtype)[..., None]
                d = (selection(acts[i], g1) - selection(acts[i], g0)).abs()
                chg = None
                if thr[i] is not None:
                    z_min, z_lin = thr[i]
                    r1 = (g1 >= z_min).long() + (g1 >= z_lin).long()
                    r0 = (g0 >= z_min).long() + (g0 >= z_lin).long()
                    chg = (r1 != r0).to(g1.dtype)
                if w is None:
                    n = float(d.numel())
                else:
                    d, chg = d * w, None if chg is None else chg * w
                    n = float(w.sum()) * g1.shape[-1]
                sums[i]["mis"] += float(d.sum())
                sums[i]["chg"] += float("nan") if chg is None else float(chg.sum())
                sums[i]["n"] += n
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if n_batches == 0:
        raise ValueError("selection_misalignment got no batches")
    per_layer = {}
    for f, s in zip(ffns, sums):
        n = max(s["n"], 1e-12)
        per_layer[f.name] = {"misalignment": s["mis"] / n, "regime_change": s["chg"] / n, "pairs": s["n"]}
    total = sum(s["n"] for s in sums)
    part = [s for s, t in zip(sums, thr) if t is not None]
    part_n = sum(s["n"] for s in part)
    return {
        "misalignment": sum(s["mis"] for s in sums) / max(total, 1e-12),
        "regime_change": sum(s["chg"] for s in part) / part_n if part_n > 0 else float("nan"),
        "pairs": total,
        "per_layer": per_layer,
    }
