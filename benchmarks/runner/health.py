"""Is a trained run a result or a degenerate one? The collapse rule of docs/protocol.md.

A run is **collapsed** when, on the validation split,
  (a) its predictions are overwhelmingly one answer: the most frequent predicted answer has a share
      >= ``TOP_SHARE`` (0.9), or
  (b) its selection metric is not above chance (one-sided exact binomial test, p >= ``ALPHA`` = 0.05,
      chance from ``Task.chance()``) while its final train loss is within ``LOSS_TOL`` (5%) of the
      entropy of uniform answers, ln(1 / chance): the model learned the answer format, not the task.
Diverged runs (NaN/inf loss or gradients) never get here: ``train.Diverged`` stops them.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from typing import Any

TOP_SHARE = 0.9
ALPHA = 0.05
LOSS_TOL = 0.05


def binom_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p): the one-sided p-value of k successes against chance ``p``."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    # Sum in log space: exact for the few thousand examples of a validation split.
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p) + (n - i) * math.log1p(-p)
            for i in range(k, n + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs))


def compact(per_example: dict[str, list]) -> dict[str, Any]:
    """The record form of per-example results: ``n``, ``ids_sha256`` (paired analyses check that two runs
    saw the same examples), ``correct`` as a "0110..." string and ``pred``."""
    ids = [str(i) for i in per_example.get("id", [])]
    correct = per_example.get("correct", [])
    return {
        "n": len(correct),
        "ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
        "correct": "".join("1" if c else "0" for c in correct),
        "pred": list(per_example.get("pred", [])),
    }


def assess(*, val_metrics: dict[str, float], selection_metric: str, chance: dict[str, float] | None,
           per_example: dict[str, Any] | None, final_train_loss: float | None) -> dict[str, Any]:
    """The ``health`` entry of a record: ``collapsed`` and the numbers behind the decision.

    ``per_example`` is the compact validation entry (``compact``); without it rule (a) cannot be checked
    and rule (b) uses no test (both are reported as ``None``), so plugins without per-example results
    are judged on what they give.
    """
    out: dict[str, Any] = {"collapsed": False, "reasons": [], "top_pred_share": None, "top_pred": None,
                           "val_vs_chance_p": None, "chance": None, "final_train_loss": final_train_loss,
                           "uniform_entropy": None, "rule": {"top_share": TOP_SHARE, "alpha": ALPHA, "loss_tol": LOSS_TOL}}
    preds = (per_example or {}).get("pred") or []
    if preds:
        (top, count), = Counter(map(str, preds)).most_common(1)
        out["top_pred"], out["top_pred_share"] = top, count / len(preds)
        if out["top_pred_share"] >= TOP_SHARE:
            out["reasons"].append(f"{100 * out['top_pred_share']:.0f}% of validation predictions are {top!r}")
    p0 = (chance or {}).get(selection_metric)
    value = val_metrics.get(selection_metric)
    if p0 is not None and 0 < p0 < 1 and value is not None and math.isfinite(value):
        out["chance"] = p0
        n = (per_example or {}).get("n")
        if n:
            k = round(value * n)
            out["val_vs_chance_p"] = binom_sf(k, n, p0)
        entropy = math.log(1 / p0)
        out["uniform_entropy"] = entropy
        in_band = out["val_vs_chance_p"] >= ALPHA if out["val_vs_chance_p"] is not None else value <= p0
        flat = final_train_loss is not None and abs(final_train_loss - entropy) <= LOSS_TOL * entropy
        if in_band and flat:
            out["reasons"].append(f"validation {selection_metric} {value:.3f} is not above chance {p0:.3f} and the "
                                  f"train loss {final_train_loss:.3f} sits at ln(1/chance) = {entropy:.3f}")
    out["collapsed"] = bool(out["reasons"])
    return out
