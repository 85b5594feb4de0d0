"""Vision probe tasks (VTAB-style): a linear head on the image encoder's CLS feature.

Every method trains the head (``trainable=["head"]``); the ``head`` method alone is linear probing,
adapter methods add their adapters on the encoder. The untrained head is a seeded random init,
so the zero-step score is at chance up to sampling noise.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from benchmarks.vlm.build import device_of, freeze, load_encoder
from benchmarks.vlm.composed import VLMOutput
from benchmarks.vlm.encoders import hidden_size, pooled_feature
from tasks.base import PerExample, Task, TaskSetup
from tasks.registry import register_task
from tasks.scoring import score_choices
from tasks.vlm.data import SOURCES, cap_train, class_names, epochs, eval_order, to_device


class ImageClassifier(nn.Module):
    """``vision_tower`` -> CLS feature -> ``head`` (Linear); forward returns loss and logits."""

    def __init__(self, vision_tower: nn.Module, num_classes: int):
        super().__init__()
        self.vision_tower = vision_tower
        self.head = nn.Linear(hidden_size(vision_tower), num_classes)
        self.config = getattr(vision_tower, "config", None) or getattr(vision_tower, "pretrained_cfg", None)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **_: object) -> VLMOutput:
        logits = self.head(pooled_feature(self.vision_tower, pixel_values))
        loss = None if labels is None else nn.functional.cross_entropy(logits.float(), labels)
        return VLMOutput(loss=loss, logits=logits)


class VisionProbeTask(Task):
    """Image classification with a linear head; metric: top-1 accuracy."""

    family = "vlm"
    answer_format = "labels"
    metrics = {"acc": True}
    default_model = "dinov2-s"
    protocol = "linear head on the encoder's CLS feature, cross-entropy; acc = top-1 over all classes"

    def __init__(self, max_train: int | None = 2000, image_size: int | None = None, splits: Any = None):
        self.max_train, self.image_size = max_train, image_size
        self._splits = None if splits is None else cap_train(splits, max_train)

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

    def setup(self, model_name: str, device: torch.device | str = "cpu") -> TaskSetup:
        if "+" in model_name or model_name.startswith("hub:"):
            raise ValueError(f"probe tasks take an image encoder, not a VLM spec: {model_name!r}")
        enc = load_encoder(model_name, self.image_size)
        torch.manual_seed(0)  # the head's init: the zero-step score is reproducible
        model = ImageClassifier(freeze(enc.tower), len(self.classes())).to(device)
        return TaskSetup(model=model, trainable=["head"],
                         extras={"transform": enc.transform, "classes": self.classes(),
                                 "provenance": enc.provenance})

    def train_batches(self, setup: TaskSetup, batch_size: int, seed: int) -> Iterator[dict]:
        train, transform = self.load_splits()["train"], setup.extras["transform"]
        for idx in epochs(len(train), batch_size, seed):
            rows = train.select(idx)
            yield {"pixel_values": transform.stack(rows["image"]), "labels": torch.tensor(rows["label"])}

    def loss(self, setup: TaskSetup, model: nn.Module, batch: dict) -> torch.Tensor:
        return model(**to_device(batch, device_of(model))).loss

    def heldout_batches(self, setup: TaskSetup, n: int, batch_size: int) -> list[dict]:
        """Up to ``n`` training-format batches from the validation split (fixed order, never the train stream)."""
        data, transform = self.load_splits()["validation"], setup.extras["transform"]
        order = eval_order(len(data), n * batch_size)
        out = []
        for i in range(0, len(order), batch_size):
            rows = data.select(order[i : i + batch_size])
            out.append({"pixel_values": transform.stack(rows["image"]), "labels": torch.tensor(list(rows["label"]))})
        return out

    def evaluate(self, setup: TaskSetup, model: nn.Module, split: str, limit: int | None = None,
                 batch_size: int = 16) -> dict[str, float]:
        return self._evaluate_probe(setup, model, split, limit, batch_size)[0]

    def evaluate_examples(self, setup: TaskSetup, model: nn.Module, split: str, limit: int | None = None,
                          batch_size: int = 16) -> tuple[dict[str, float], PerExample | None]:
        if type(self).evaluate is not VisionProbeTask.evaluate:  # a subclass's own metrics
            return super().evaluate_examples(setup, model, split, limit, batch_size)
        return self._evaluate_probe(setup, model, split, limit, batch_size)

    @torch.no_grad()
    def _evaluate_probe(self, setup: TaskSetup, model: nn.Module, split: str, limit: int | None,
                        batch_size: int) -> tuple[dict[str, float], PerExample]:
        data, transform = self.load_splits()[split], setup.extras["transform"]
        order = eval_order(len(data), limit)
        was_training, device = model.training, device_of(model)
        model.eval()
        lls: list[list[float]] = []
        gold: list[int] = []
        try:
            for i in range(0, len(order), batch_size):
                rows = data.select(order[i : i + batch_size])
                logits = model(pixel_values=transform.stack(rows["image"]).to(device)).logits
                # Class log-probabilities: the head's choice scores, scored like every choice task (tasks.scoring).
                lls.extend(torch.log_softmax(logits.float(), -1).cpu().tolist())
                gold.extend(int(y) for y in rows["label"])
        finally:
            model.train(was_training)
        if not lls:
            return {"acc": float("nan"), "n": 0.0}, {"id": [], "pred": [], "correct": []}
        scored = score_choices(lls, [setup.extras["classes"]] * len(lls), gold)
        return {"acc": scored.metrics(norm=False)["acc"], "n": float(len(order))}, scored.per_example(order, "acc")

    def chance(self) -> dict[str, float]:
        return {"acc": 1.0 / len(self.classes())}

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["options"] = {"max_train": self.max_train, "image_size": self.image_size, "feature": "cls"}
        return d


@register_task("fashion-mnist-probe")
class FashionMNISTProbe(VisionProbeTask):
    dataset = "fashion-mnist"
    source = SOURCES["fashion-mnist"]


@register_task("emoji-probe")
class EmojiProbe(VisionProbeTask):
    dataset = "emoji"
    source = SOURCES["emoji"]


@register_task("cifar10-probe")
class Cifar10Probe(VisionProbeTask):
    dataset = "cifar10"
    source = SOURCES["cifar10"]
