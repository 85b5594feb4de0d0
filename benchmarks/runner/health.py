"""Is a trained run a result or a degenerate one? The collapse rule of docs/protocol.md (rule version 2).

A run is **collapsed** when, on the validation split,
  (a) its predictions are overwhelmingly one answer: the most frequent predicted answer has a share
      >= ``TOP_SHARE`` (0.9); or
  (b) its selection metric is not above chance (one-sided exact binomial test, p >= ``ALPHA`` = 0.05,
      chance from ``Task.chance()``) while its **answer NLL** is within ``NLL_TOL`` (5%) of the NLL of
      uniform answers: the mean over examples of ``-log softmax`` of the gold choice among the K choices'
      summed log-likelihoods (``tasks.scoring.answer_nll``) against the mean of ``ln K``. They are equal
      when the model's choice distribution is uniform, however the choices tokenise (the model learned the
      answer format, not the task); the band is a heuristic: answers that depend on the input only weakly
      can also fall in it, and at chance accuracy they are as uninformative.
Clause (b) needs choices: a free-text task (chance 0, no answer NLL) or a task without per-example answer
NLLs is judged by clause (a) alone, and the record says so (``clauses``). A model confidently wrong at
chance (answer NLL far above ln K) is not collapsed: it is a task beyond the model, which the report's
chance test marks uninformative.

Rule version 1 (records whose ``health.rule`` has no ``version``) compared the final *per-token* train
loss with ln(1/chance) in clause (b), which holds for one-token answers only. Records keep the status
they were judged with; ``rule_version`` tells the report which rule that was.
Diverged runs (NaN/inf loss or gradients) never get here: ``train.Diverged`` stops them.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from typing import Any

RULE_VERSION = 2
TOP_SHARE = 0.9
ALPHA = 0.05
NLL_TOL = 0.05


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
    saw the same examples), ``correct`` as a "0110..." string and ``pred``; for tasks with choices also
    ``answer_nll`` (mean over examples of the gold choice's ``-log softmax``) and ``uniform_nll`` (mean of
    ``ln K``), what clause (b) compares, so the decision can be recomputed from the record."""
    ids = [str(i) for i in per_example.get("id", [])]
    correct = per_example.get("correct", [])
    out: dict[str, Any] = {
        "n": len(correct),
        "ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
        "correct": "".join("1" if c else "0" for c in correct),
        "pred": list(per_example.get("pred", [])),
    }
    nll, ks = per_example.get("answer_nll") or [], per_example.get("n_choices") or []
    if correct and len(nll) == len(ks) == len(correct):
        out["answer_nll"] = sum(float(v) for v in nll) / len(nll)  # nan if any example's scores were not finite
        out["uniform_nll"] = sum(math.log(k) for k in ks) / len(ks)
    return out


def rule_version(health: dict[str, Any] | None) -> int | None:
    """The collapse-rule version a record's ``health`` entry was judged with (1 before versions were
    recorded), or None for a record without one (failed or diverged runs)."""
    if not health:
        return None
    return int((health.get("rule") or {}).get("version", 1))


def _top_share_clause(preds: list, out: dict[str, Any]) -> str:
    if not preds:
        return "not applicable: no per-example predictions"
    (top, count), = Counter(map(str, preds)).most_common(1)
    out["top_pred"], out["top_pred_share"] = top, count / len(preds)
    if out["top_pred_share"] < TOP_SHARE:
        return "not fired"
    out["reasons"].append(f"(a) prediction share: {100 * out['top_pred_share']:.1f}% of {len(preds)} validation "
                          f"predictions are {top!r} (>= {100 * TOP_SHARE:.0f}%)")
    return "fired"


def _chance_clause(val_metrics: dict[str, float], metric: str, chance: dict[str, float] | None,
                   pe: dict[str, Any], out: dict[str, Any]) -> str:
    p0 = (chance or {}).get(metric)
    value = val_metrics.get(metric)
    if p0 is None or not 0 < p0 < 1:
        return (f"not applicable: chance of {metric!r} is {p0!r} (free-text answers have no choices)"
                if p0 is not None else f"not applicable: no chance level for {metric!r}")
    if value is None or not math.isfinite(value):
        return f"not applicable: validation {metric!r} is {value!r}"
    out["chance"] = p0
    nll, uniform = pe.get("answer_nll"), pe.get("uniform_nll")
    if nll is None or uniform is None or not math.isfinite(nll) or uniform <= 0:
        return "not applicable: the task gives no finite answer NLL over choices (answer_nll)"
    out["answer_nll"], out["uniform_nll"] = nll, uniform
    n = pe.get("n")
    if n:
        out["val_vs_chance_p"] = binom_sf(round(value * n), n, p0)
    at_chance = out["val_vs_chance_p"] >= ALPHA if out["val_vs_chance_p"] is not None else value <= p0
    uniform_answers = abs(nll - uniform) <= NLL_TOL * uniform
    if not (at_chance and uniform_answers):
        return "not fired"
    test = f"binomial p = {out['val_vs_chance_p']:.3g}, n = {n}" if out["val_vs_chance_p"] is not None else "n unknown"
    out["reasons"].append(
        f"(b) chance with uniform answers: validation {metric} {value:.3f} is not above chance {p0:.3f} ({test}) and "
        f"the answer NLL {nll:.3f} is within {100 * NLL_TOL:.0f}% of the uniform-answer NLL (mean ln K) {uniform:.3f}")
    return "fired"


def assess(*, val_metrics: dict[str, float], selection_metric: str, chance: dict[str, float] | None,
           per_example: dict[str, Any] | None, final_train_loss: float | None = None) -> dict[str, Any]:
    """The ``health`` entry of a record: ``collapsed``, ``reasons`` (one line per clause that fired, with its
    numbers), ``clauses`` ("fired" / "not fired" / "not applicable: why" for ``a`` and ``b``), the numbers
    behind them and the ``rule`` (version and constants).

    ``per_example`` is the compact validation entry (``compact``). ``final_train_loss`` is recorded for
    readers only: a per-token loss says nothing about answers of several tokens, so no clause uses it.
    """
    pe = per_example or {}
    out: dict[str, Any] = {"collapsed": False, "reasons": [], "top_pred_share": None, "top_pred": None,
                           "val_vs_chance_p": None, "chance": None, "answer_nll": None, "uniform_nll": None,
                           "final_train_loss": final_train_loss,
                           "rule": {"version": RULE_VERSION, "top_share": TOP_SHARE, "alpha": ALPHA, "nll_tol": NLL_TOL}}
    out["clauses"] = {"a": _top_share_clause(list(pe.get("pred") or []), out),
                      "b": _chance_clause(val_metrics, selection_metric, chance, pe, out)}
    out["collapsed"] = bool(out["reasons"])
    return out
