"""Vision QA tasks: "What is shown in the image?" answered in text, scored by log-likelihood.

The model is a VLM (the composed ``ENCODER+LM`` with an aligned connector, or ``hub:<id>``).
Training: answer-only cross-entropy on `` <class name>``. Evaluation (lm-eval protocol, scored by
``tasks.scoring`` like every language choice task): every class name is a choice, continued after the
delimiter ``" "``; ``acc`` = argmax of the summed log-probability of the choice tokens, ``acc_norm`` =
argmax of that log-probability divided by ``len(class name)`` characters (without the delimiter).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from benchmarks.vlm.align import AlignConfig
from benchmarks.vlm.build import DEFAULT_VLM, device_of
from benchmarks.vlm.io import ComposedIO, sequence_logprobs
from tasks.base import PerExample, Task, TaskSetup
from tasks.registry import register_task
from tasks.scoring import score_choices
from tasks.vlm.data import SOURCES, cap_train, class_names, epochs, eval_order, to_device

PROMPT = "Question: What is shown in the image? Answer:"
TARGET_DELIMITER = " "
# Choice sequences per scoring forward (images x classes), a bound on the logits' memory: an evaluation forward
# holds eval_batch_size images up to it. On an H200, 256 images of 10 classes scored with the same predictions as
# 16, 4.1x faster per example (results/perf/h200/eval_batch_fashion-mnist.json); it was 160 (16 such images).
MAX_SEQS_PER_FORWARD = 2560
# The aligned connector is a full-rank module every method trains. At an adapter's learning rate (1e-3 and
# up, AdamW) it is rewritten within a few dozen steps, the image signal is lost and runs collapse to the
# class prior (train loss ln(K)); see docs/vlm.md. So adapter methods train it at this fixed rate.
CONNECTOR_LR = 1e-4


class VisionQATask(Task):
    """A classification dataset posed as image QA over its class names."""

    family = "vlm"
    answer_format = "choices"
    metrics = {"acc": True, "acc_norm": True}
    selection_metric = "acc"
    report_metric = "acc"
    default_model = DEFAULT_VLM
    protocol = ("image + 'Question: What is shown in the image? Answer:'; choices = ' <class name>' "
                "(lower case); acc = argmax summed log-prob, acc_norm = argmax log-prob / len(class name) "
                "characters without the leading space (lm-eval)")

    def __init__(self, max_train: int | None = 2000, image_size: int | None = None, grid: int = 2,
                 align: bool = True, align_config: AlignConfig | None = None, cache_root: str | None = None,
                 splits: Any = None, connector_lr: float | None = CONNECTOR_LR):
        if connector_lr is not None and not (isinstance(connector_lr, (int, float)) and connector_lr >= 0):
            raise ValueError(f"connector_lr must be a number >= 0 (0 = frozen) or None, got {connector_lr!r}")
        self.connector_lr = connector_lr
        self.max_train = max_train
        self.image_size, self.grid, self.align = image_size, grid, align
        self.align_config = align_config or AlignConfig()
        self.cache_root = cache_root
        self._splits = None if splits is None else cap_train(splits, self.max_train)

    def load_source(self) -> Any:
        """The raw data: a ``datasets.DatasetDict`` with ``train`` / ``validation`` / ``test`` splits, an
        ``image`` column and a ``label`` ``ClassLabel`` whose names are the classes. Default: the asset
        ``dataset``; a plugin with local images overrides this (see docs/adding_a_task.md)."""
        from benchmarks.assets import load_dataset

        return load_dataset(self.dataset)

    def load_splits(self) -> Any:
        """``load_source()`` with ``train`` capped to ``max_train`` examples (a fixed random subset)."""
        if self._splits is None:
            self._splits = cap_train(self.load_source(), self.max_train)
        return self._splits

    def classes(self) -> list[str]:
        return class_names(self.load_splits()["train"])

    def assets(self, model_name: str) -> list[str]:
        """Besides the model and data: the datasets the connector is aligned on (composed VLMs only)."""
        extra = list(self.align_config.sources) if self.align and "+" in model_name else []
        return [*super().assets(model_name), *extra]

    def setup(self, model_name: str, device: torch.device | str = "cpu") -> TaskSetup:
        from benchmarks.vlm.factory import build_vlm

        build = build_vlm(model_name, device, image_size=self.image_size, grid=self.grid, align=self.align,
                          align_config=self.align_config, cache_root=self.cache_root)
        trainable = getattr(build.io, "trainable", ["connector"])
        connector = (build.alignment or {}).get("path")
        return TaskSetup(model=build.model, trainable=list(trainable), trainable_lr=self.connector_lr,
                         files=[connector] if connector else [],
                         extras={"io": build.io, "classes": self.classes(), "alignment": build.alignment,
                                 "provenance": build.provenance, "spec": build.spec})

    def train_batches(self, setup: TaskSetup, batch_size: int, seed: int) -> Iterator[dict]:
        train, io, classes = self.load_splits()["train"], setup.extras["io"], setup.extras["classes"]
        for idx in epochs(len(train), batch_size, seed):
            rows = train.select(idx)
            yield io.batch(rows["image"], [PROMPT] * len(idx), [" " + classes[y] for y in rows["label"]])

    def loss(self, setup: TaskSetup, model: nn.Module, batch: dict) -> torch.Tensor:
        return model(**to_device(batch, device_of(model))).loss

    def heldout_batches(self, setup: TaskSetup, n: int, batch_size: int) -> list[dict]:
        """Up to ``n`` training-format batches from the validation split (fixed order, never the train stream)."""
        data, io, classes = self.load_splits()["validation"], setup.extras["io"], setup.extras["classes"]
        order = eval_order(len(data), n * batch_size)
        out = []
        for i in range(0, len(order), batch_size):
            rows = data.select(order[i : i + batch_size])
            out.append(io.batch(rows["image"], [PROMPT] * len(rows), [TARGET_DELIMITER + classes[y] for y in rows["label"]]))
        return out

    def evaluate(self, setup: TaskSetup, model: nn.Module, split: str, limit: int | None = None,
                 batch_size: int = 16) -> dict[str, float]:
        return self._evaluate_qa(setup, model, split, limit, batch_size)[0]

    def evaluate_examples(self, setup: TaskSetup, model: nn.Module, split: str, limit: int | None = None,
                          batch_size: int = 16) -> tuple[dict[str, float], PerExample | None]:
        if type(self).evaluate is not VisionQATask.evaluate:  # a subclass's own metrics
            return super().evaluate_examples(setup, model, split, limit, batch_size)
        return self._evaluate_qa(setup, model, split, limit, batch_size)

    @torch.no_grad()
    def _evaluate_qa(self, setup: TaskSetup, model: nn.Module, split: str, limit: int | None,
                     batch_size: int) -> tuple[dict[str, float], PerExample]:
        data, io, classes = self.load_splits()[split], setup.extras["io"], setup.extras["classes"]
        order = eval_order(len(data), limit)
        per_forward = max(1, min(batch_size, MAX_SEQS_PER_FORWARD // len(classes)))
        was_training, device = model.training, device_of(model)
        model.eval()
        lls: list[list[float]] = []
        labels: list[int] = []
        try:
            for i in range(0, len(order), per_forward):
                rows = data.select(order[i : i + per_forward])
                scores = self._scores(model, io, rows["image"], [TARGET_DELIMITER + c for c in classes], device)
                lls.extend(scores.float().cpu().tolist())
                labels.extend(int(y) for y in rows["label"])
        finally:
            model.train(was_training)
        if not lls:
            return {"acc": float("nan"), "acc_norm": float("nan"), "n": 0.0}, {"id": [], "pred": [], "correct": []}
        scored = score_choices(lls, [classes] * len(lls), labels)
        result = scored.metrics(norm=True)
        result["n"] = float(len(order))
        key = self.report_metric if self.report_metric in ("acc", "acc_norm") else "acc"
        return result, scored.per_example(order, key)

    @staticmethod
    def _scores(model: nn.Module, io: Any, images: list, choices: list[str], device: Any) -> torch.Tensor:
        """``(N, K)`` summed choice log-probs; the composed VLM shares the prompt's KV cache."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if isinstance(io, ComposedIO) and hasattr(base, "score_choices"):
            # peft injects adapters in place, so the base module runs with them.
            prompt = list(io.tokenizer.encode(PROMPT, add_special_tokens=True))
            ids = [list(io.tokenizer.encode(c, add_special_tokens=False)) for c in choices]
            return base.score_choices(io.transform.stack(images).to(device), prompt, ids)
        batch = to_device(io.choice_batch(images, [PROMPT] * len(images), choices), device)
        return sequence_logprobs(model(**batch).logits, batch["labels"]).view(len(images), len(choices))

    def chance(self) -> dict[str, float]:
        """Every example has every class as a choice: ``1 / number of classes``."""
        k = len(self.classes())
        return {"acc": 1.0 / k, "acc_norm": 1.0 / k}

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["options"] = {"connector_lr": self.connector_lr, "max_train": self.max_train,
                        "image_size": self.image_size, "grid": self.grid,
                        "align": self.align, "prompt": PROMPT}
        return d


@register_task("fashion-mnist")
class FashionMNISTQA(VisionQATask):
    dataset = "fashion-mnist"
    source = SOURCES["fashion-mnist"]


@register_task("emoji")
class EmojiQA(VisionQATask):
    dataset = "emoji"
    source = SOURCES["emoji"]


@register_task("cifar10")
class Cifar10QA(VisionQATask):
    dataset = "cifar10"
    source = SOURCES["cifar10"]
