"""The one scoring module of every choice task (language and vision): ``acc`` and ``acc_norm`` from the
log-likelihood of each choice, computed as lm-evaluation-harness computes them.

lm-eval's ``ConfigurableTask.process_results`` (``output_type: multiple_choice``)::

    choices = self.doc_to_choice(doc)                       # the choice texts, without target_delimiter
    completion_len = np.array([float(len(i)) for i in choices])
    pred = np.argmax(lls); pred_norm = np.argmax(lls / completion_len)

so ``acc`` is the argmax of the summed log-likelihoods and ``acc_norm`` the argmax of the log-likelihood
divided by ``len(choice)``: Python characters of the choice text *without* its leading delimiter (the
space before a class name or an answer is not counted). Ties go to the first choice (``np.argmax``).
Pure Python: no torch, usable by any layer that computes log-likelihoods.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


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

    def metrics(self, norm: bool = True) -> dict[str, float]:
        """``{"acc": ..., "acc_norm": ...}`` (``acc_norm`` only if ``norm``)."""
        n = len(self.gold)
        out = {"acc": sum(self.correct("acc")) / n}
        if norm:
            out["acc_norm"] = sum(self.correct("acc_norm")) / n
        return out


def score_choices(
    lls: Sequence[Sequence[float]], choices: Sequence[Sequence[str]], labels: Sequence[int]
) -> ChoiceScores:
    """Predictions from per-example choice log-likelihoods ``lls`` and choice texts ``choices``
    (without the leading delimiter); ``labels`` are the gold indices."""
    if not lls:
        raise ValueError("no examples to score")
    if not len(lls) == len(choices) == len(labels):
        raise ValueError(f"{len(lls)} score rows, {len(choices)} choice lists and {len(labels)} labels differ")
    pred, pred_norm = [], []
    for ll, ch, gold in zip(lls, choices, labels):
        if len(ll) != len(ch):
            raise ValueError(f"{len(ll)} log-likelihoods for {len(ch)} choices")
        if not 0 <= gold < len(ch):
            raise ValueError(f"label {gold} out of range for {len(ch)} choices")
        pred.append(_argmax(ll))
        pred_norm.append(_argmax([ll[j] / choice_length(ch[j]) for j in range(len(ll))]))
    return ChoiceScores(pred, pred_norm, [int(g) for g in labels])


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
