"""The one scoring module of every choice task (language and vision): ``acc`` and ``acc_norm`` from the
log-likelihood of each choice, computed as lm-evaluation-harness computes them.

lm-eval's ``ConfigurableTask.process_results`` (``output_type: multiple_choice``)::

    choices = self.doc_to_choice(doc)                       # the choice texts, without target_delimiter
    completion_len = np.array([float(len(i)) for i in choices])
    pred = np.argmax(lls); pred_norm = np.argmax(lls / completion_len)

so ``acc`` is the argmax of the summed log-likelihoods and ``acc_norm`` the argmax of the log-likelihood
divided by ``len(choice)``: Python characters of the choice text *without* its leading delimiter (the
space before a class name or an answer is not counted). Ties go to the first choice (``np.argmax``).
Besides the predictions, each example gets its **answer NLL**: ``-log softmax(lls)[gold]``, the negative
log-probability of the gold choice when the model's choice distribution is the softmax over the K choices'
summed log-likelihoods. Its mean is ``ln K`` when that distribution is uniform, whatever the
tokenisation of the choices (the collapse rule of ``benchmarks.runner.health`` compares the two).
Pure Python: no torch, usable by any layer that computes log-likelihoods.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field


def _argmax(values: Sequence[float]) -> int:
    # First index of the maximum, as np.argmax / torch.argmax break ties.
    return max(range(len(values)), key=lambda j: (values[j], -j))


def choice_length(choice: str) -> int:
    """The length ``acc_norm`` divides by: characters of the choice text (at least 1)."""
    return max(len(choice), 1)


@dataclass(frozen=True)
class ChoiceScores:
    """Per-example predictions of a choice task (one entry per example, in order)."""

    pred: list[int]
    """Argmax of the summed log-likelihoods (``acc``)."""
    pred_norm: list[int]
    """Argmax of the log-likelihood per character of the choice (``acc_norm``)."""
    gold: list[int]
    answer_nll: list[float] = field(default_factory=list)
    """``-log softmax(lls)[gold]`` per example (nan when an example's log-likelihoods are not finite)."""
    n_choices: list[int] = field(default_factory=list)
    """Number of choices of each example."""

    def correct(self, metric: str = "acc") -> list[bool]:
        """Whether each example is right under ``metric`` (``acc`` or ``acc_norm``)."""
        preds = self.predictions(metric)
        return [p == g for p, g in zip(preds, self.gold)]

    def predictions(self, metric: str = "acc") -> list[int]:
        """The predicted choice index of each example under ``metric``."""
        if metric == "acc":
            return list(self.pred)
        if metric == "acc_norm":
            return list(self.pred_norm)
        raise ValueError(f"unknown choice metric {metric!r}; expected 'acc' or 'acc_norm'")

    def per_example(self, ids: Sequence[str], metric: str = "acc") -> dict[str, list]:
        """The ``Task.evaluate_examples`` entry (``tasks.base.PerExample``): id, prediction and correctness under
        ``metric``, plus ``answer_nll`` and ``n_choices`` (the collapse rule's answer-level loss)."""
        if len(ids) != len(self.gold):
            raise ValueError(f"{len(ids)} ids for {len(self.gold)} scored examples")
        return {"id": [str(i) for i in ids], "pred": self.predictions(metric), "correct": self.correct(metric),
                "answer_nll": list(self.answer_nll), "n_choices": list(self.n_choices)}

    def metrics(self, norm: bool = True) -> dict[str, float]:
        """``{"acc": ..., "acc_norm": ...}`` (``acc_norm`` only if ``norm``)."""
        n = len(self.gold)
        out = {"acc": sum(self.correct("acc")) / n}
        if norm:
            out["acc_norm"] = sum(self.correct("acc_norm")) / n
        return out


def answer_nll(lls: Sequence[float], gold: int) -> float:
    """``-log softmax(lls)[gold]``: the gold choice's negative log-probability among the choices (``logsumexp``
    form, stable for very negative log-likelihoods); nan when a log-likelihood is not finite."""
    if not all(math.isfinite(v) for v in lls):
        return math.nan
    top = max(lls)
    return top + math.log(sum(math.exp(v - top) for v in lls)) - lls[gold]


def score_choices(
    lls: Sequence[Sequence[float]], choices: Sequence[Sequence[str]], labels: Sequence[int]
) -> ChoiceScores:
    """Predictions from per-example choice log-likelihoods ``lls`` and choice texts ``choices``
    (without the leading delimiter); ``labels`` are the gold indices."""
    if not lls:
        raise ValueError("no examples to score")
    if not len(lls) == len(choices) == len(labels):
        raise ValueError(f"{len(lls)} score rows, {len(choices)} choice lists and {len(labels)} labels differ")
    pred, pred_norm, nll = [], [], []
    for ll, ch, gold in zip(lls, choices, labels):
        if len(ll) != len(ch):
            raise ValueError(f"{len(ll)} log-likelihoods for {len(ch)} choices")
        if not 0 <= gold < len(ch):
            raise ValueError(f"label {gold} out of range for {len(ch)} choices")
        pred.append(_argmax(ll))
        pred_norm.append(_argmax([ll[j] / choice_length(ch[j]) for j in range(len(ll))]))
        nll.append(answer_nll(ll, gold))
    return ChoiceScores(pred, pred_norm, [int(g) for g in labels], nll, [len(ch) for ch in choices])


def choice_metrics(
    lls: Sequence[Sequence[float]], choices: Sequence[Sequence[str]], labels: Sequence[int], norm: bool = True
) -> dict[str, float]:
    """``acc`` (and ``acc_norm``) from per-example choice log-likelihoods, as lm-eval computes them."""
    return score_choices(lls, choices, labels).metrics(norm)


def chance_of_choices(choice_counts: Sequence[int]) -> float:
    """Expected accuracy of uniform guessing: the mean over examples of ``1 / number of choices``."""
    if not choice_counts:
        raise ValueError("no examples: chance level undefined")
    return sum(1.0 / k for k in choice_counts) / len(choice_counts)
