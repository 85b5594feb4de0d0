"""HellaSwag (hub), with lm-eval's preprocessing; needs Python for the text clean-up."""

from __future__ import annotations

import re

from tasks.llm.lm import ChoiceTask
from tasks.registry import register_task


def _preprocess(text: str) -> str:
    # lm-eval hellaswag/utils.py: WikiHow artefacts out, double spaces collapsed.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


@register_task("hellaswag")
class HellaSwag(ChoiceTask):
    """4-way sentence completion; the context is ``activity_label: ctx_a Ctx_b``."""

    dataset = "Rowan/hellaswag"
    requires_network = True
    source = "HellaSwag (Zellers et al. 2019), hub Rowan/hellaswag (as lm-eval); test = official validation"
    split_map = {"train": "train", "test": "validation"}  # the hub test split has no labels
    validation_from_train = 0.1
    num_choices = 4

    def doc_to_text(self, example: dict) -> str:
        ctx = example["ctx_a"] + " " + example["ctx_b"].capitalize()
        return _preprocess(example["activity_label"] + ": " + ctx)

    def doc_to_choices(self, example: dict) -> list[str]:
        return [_preprocess(e) for e in example["endings"]]

    def doc_to_label(self, example: dict) -> int:
        return int(example["label"])
