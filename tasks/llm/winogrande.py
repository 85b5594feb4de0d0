"""WinoGrande (hub) with lm-eval's partial scoring: the context varies, the continuation is shared."""

from __future__ import annotations

from tasks.llm.lm import ChoiceTask
from tasks.registry import register_task


@register_task("winogrande")
class WinoGrande(ChoiceTask):
    """Each option fills the blank; score the text after the blank given the sentence up to it."""

    dataset = "allenai/winogrande"
    dataset_name = "winogrande_xl"
    requires_network = True
    source = "WinoGrande XL (Sakaguchi et al. 2020), hub allenai/winogrande (as lm-eval); test = official validation"
    split_map = {"train": "train", "test": "validation"}
    validation_from_train = 0.1
    metrics = {"acc": True}  # one shared continuation: length normalisation changes nothing
    num_choices = 2
    protocol = (
        "partial log-likelihood after a zero-shot prompt (lm-eval winogrande): context = sentence up to the blank with each "
        "option filled in, continuation = the rest of the sentence; acc = argmax of summed log-likelihood"
    )

    def doc_to_text(self, example: dict) -> str:
        return example["sentence"]

    def doc_to_choices(self, example: dict) -> list[str]:
        return [example["option1"], example["option2"]]

    def doc_to_label(self, example: dict) -> int:
        return int(example["answer"]) - 1  # "1" / "2"

    def requests(self, example: dict) -> list[tuple[str, str]]:
        sentence = example["sentence"]
        cut = sentence.index("_")
        continuation = " " + sentence[cut + 1 :].strip()
        return [(sentence[:cut] + option, continuation) for option in self.doc_to_choices(example)]
