"""The task contract: the only surface the runner uses.

A task owns its data (splits), how an example becomes model input, the training loss and the
evaluation protocol. The runner owns everything else (adapters, optimiser, schedule, seeds, devices,
results). Concrete helpers for the common cases live in ``tasks.common``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn


@dataclass
class TaskSetup:
    """A model prepared for one task: what the runner adapts, trains and evaluates."""

    model: nn.Module
    """The module to adapt (a causal LM, a composed VLM, an image encoder with a head)."""
    trainable: list[str] = field(default_factory=list)
    """Module paths trained by every method besides the adapters (task head, VLM connector)."""
    extras: dict[str, Any] = field(default_factory=dict)
    """Whatever the task needs later: tokenizer, image processor, label token ids, ..."""


class Task(ABC):
    """One benchmark task. Subclass, set the class attributes, register with ``@register_task``."""

    name: str = ""
    family: str = "llm"  # "llm" | "vlm"
    dataset: str = ""  # asset-cache dataset name or hub dataset id
    source: str = ""  # human-readable provenance of the data
    answer_format: str = "choices"  # "choices" | "labels" | "free_text"
    metrics: dict[str, bool] = {}  # metric name -> higher is better
    selection_metric: str = "acc"  # validation metric that selects hyperparameters
    report_metric: str = "acc"  # test metric that is reported
    protocol: str = ""  # the scoring protocol, written into every result
    default_model: str = "smollm2-135m"
    requires_network: bool = False  # hub-only tasks

    @abstractmethod
    def load_splits(self) -> "datasets.DatasetDict":  # noqa: F821
        """Return the ``train`` / ``validation`` / ``test`` splits (raw examples)."""

    @abstractmethod
    def setup(self, model_name: str, device: torch.device | str = "cpu") -> TaskSetup:
        """Load ``model_name`` and wrap it for this task (head, connector, ...)."""

    @abstractmethod
    def train_batches(self, setup: TaskSetup, batch_size: int, seed: int) -> Iterator[dict]:
        """Yield training batches forever (reshuffled each epoch with ``seed``)."""

    @abstractmethod
    def loss(self, setup: TaskSetup, model: nn.Module, batch: dict) -> torch.Tensor:
        """Training loss of ``model`` (the adapted module) on ``batch``."""

    @abstractmethod
    def evaluate(
        self, setup: TaskSetup, model: nn.Module, split: str, limit: int | None = None, batch_size: int = 16
    ) -> dict[str, float]:
        """Metrics of ``model`` on ``split`` (``validation`` or ``test``), at most ``limit`` examples."""

    def units(self, batch: dict) -> int:
        """Throughput units in ``batch``: real tokens for text, images for vision."""
        if "attention_mask" in batch:
            return int(batch["attention_mask"].sum())
        for key in ("pixel_values", "images"):
            if key in batch:
                return int(batch[key].shape[0])
        return 0

    def assets(self, model_name: str) -> list[str]:
        """Asset-cache names a run on ``model_name`` needs (``run_all.sh`` fetches them first): the model's
        parts (``encoder+lm``) and the dataset; hub ids (``org/name``) and ``kind:name`` specs are not assets."""
        names = [part for part in model_name.split("+") if part and "/" not in part and ":" not in part]
        if self.dataset and "/" not in self.dataset:
            names.append(self.dataset)
        return names

    def chance(self) -> dict[str, float]:
        """Chance level of each metric (uniform guessing); used to sanity-check zero-shot scores."""
        return {}

    def describe(self) -> dict[str, Any]:
        """Static description written into results and ``nalora-bench list tasks``."""
        return {
            "name": self.name,
            "family": self.family,
            "dataset": self.dataset,
            "source": self.source,
            "answer_format": self.answer_format,
            "metrics": dict(self.metrics),
            "selection_metric": self.selection_metric,
            "report_metric": self.report_metric,
            "protocol": self.protocol,
        }
