"""The task contract: the only surface the runner uses.

A task owns its data (splits), how an example becomes model input, the training loss and the
evaluation protocol. The runner owns everything else (adapters, optimiser, schedule, seeds, devices,
results). Concrete helpers for the common cases live in ``tasks.common``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

PerExample = dict[str, list]
"""``{"id": [str, ...], "pred": [int | str, ...], "correct": [bool, ...]}``: one entry per evaluated example.
Tasks with choices add ``"answer_nll": [float, ...]`` (``-log softmax`` over the choices' scores of the gold
choice, ``tasks.scoring.answer_nll``) and ``"n_choices": [int, ...]``: the collapse rule's answer-level loss
(``benchmarks.runner.health``); without them only its prediction-share clause applies."""


@dataclass
class TaskSetup:
    """A model prepared for one task: what the runner adapts, trains and evaluates."""

    model: nn.Module
    """The module to adapt (a causal LM, a composed VLM, an image encoder with a head)."""
    trainable: list[str] = field(default_factory=list)
    """Module paths trained by every method besides the adapters (task head, VLM connector)."""
    extras: dict[str, Any] = field(default_factory=dict)
    """Whatever the task needs later: tokenizer, image processor, label token ids, ..."""
    trainable_lr: float | None = None
    """Fixed learning rate of ``trainable`` for methods that bring their own adapters (None: the run's lr).
    A shared full-rank module (the VLM connector) trained at an adapter's lr is a confound: its lr grid would
    measure the module, not the method. ``head`` / ``full`` train it at the run's lr (it is their method)."""
    files: list[str] = field(default_factory=list)
    """Weight files loaded from outside the asset cache (the aligned VLM connector); the run record lists
    them with their sha256 next to the cached models' files."""


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
    fingerprint_ignore: tuple[str, ...] = ("data_dir", "splits", "cache_root")
    """Constructor options left out of ``fingerprint()``: data options are covered by ``data_identity()``
    (their content, not their path), and cache locations do not change results."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "Task":
        obj = super().__new__(cls)
        # The constructor's arguments, for fingerprint(): recorded here so that no subclass (built-in or
        # plugin) has to remember its options itself.
        obj._init_args = (args, dict(kwargs))
        return obj

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

    def evaluate_examples(
        self, setup: TaskSetup, model: nn.Module, split: str, limit: int | None = None, batch_size: int = 16
    ) -> tuple[dict[str, float], PerExample | None]:
        """``(metrics, per_example)`` on ``split``: the metrics of ``evaluate`` plus, per evaluated example,
        its id, the prediction (choice / label index, or the answer string of free-text tasks) and whether
        it is correct. This default gives no per-example results (``None``), so tasks written against the
        older contract keep working; the built-in tasks override it."""
        return self.evaluate(setup, model, split, limit=limit, batch_size=batch_size), None

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
        """Static description written into results and ``nalora-bench list tasks`` (with ``chance``)."""
        out = {
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
        # fingerprint() describes the task without its chance level: chance is derived from the data (which
        # the fingerprint covers separately) and may need a data load or the network.
        if not getattr(self, "_describing_definition", False):
            out["chance"] = self.chance()
        return out

    # -- identity -----------------------------------------------------------------------------------

    def options(self) -> dict[str, Any]:
        """The constructor options of this instance, defaults filled in (``{}`` if they cannot be bound)."""
        args, kwargs = getattr(self, "_init_args", ((), {}))
        try:
            bound = inspect.signature(type(self).__init__).bind(self, *args, **kwargs)
        except (TypeError, ValueError):
            return {"args": list(args), **kwargs}
        bound.apply_defaults()
        params = inspect.signature(type(self).__init__).parameters
        out: dict[str, Any] = {}
        for name, value in list(bound.arguments.items())[1:]:  # drop self
            kind = params[name].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                out.update(value)
            elif kind is inspect.Parameter.VAR_POSITIONAL:
                out[name] = list(value)
            else:
                out[name] = value
        return out

    def definition_files(self) -> list[str]:
        """Files whose text defines this task: the YAML file of a YAML task, else the source file of its class,
        plus that of every registered task it extends (a plugin that changes one option of a built-in is
        defined by both files; abstract bases are left out, so shared machinery does not churn every id)."""
        from tasks.registry import registered_classes

        task_file = getattr(type(self), "_task_file", None)
        if task_file:
            return [str(task_file)]
        registered, files = registered_classes(), []
        for i, cls in enumerate(type(self).__mro__):
            if i and cls not in registered:
                continue
            try:
                f = str(getattr(cls, "_task_file", None) or inspect.getfile(cls))
            except (TypeError, OSError):
                continue
            if f not in files:
                files.append(f)
        return files

    def data_paths(self) -> list[str]:
        """The local files this task's data is read from (``data_dir`` / ``data_files``, or the image files
        a loaded split points to, as ``imagefolder`` leaves them); the run record lists each with its sha256.
        Cached and hub datasets are not local files here (the record names the cached asset's files).
        Override when your ``load_splits`` / ``load_source`` reads files these rules do not see."""
        from tasks.identity import local_data_paths

        return [str(p) for p in local_data_paths(self)]

    def data_identity(self) -> dict[str, Any]:
        """What identifies this task's data, without loading it: the hashes of local data files (``data_dir``),
        the asset cache manifest's sha256 of a cached dataset, a hub id with its revision, or in-memory
        splits' content fingerprints. Override for data that comes from elsewhere."""
        from tasks.identity import data_identity

        return data_identity(self)

    def fingerprint(self) -> str:
        """sha256 of the task's definition (``describe()`` without chance, its source / YAML text, constructor
        options) and its data identity: editing the prompt, labels, code or data gives a new value."""
        from tasks.identity import file_sha256, jsonable

        self._describing_definition = True
        try:
            described = self.describe()
        finally:
            self._describing_definition = False
        options = {k: v for k, v in self.options().items() if k not in self.fingerprint_ignore}
        payload = {
            "class": type(self).__qualname__,
            "describe": described,
            "definition": [file_sha256(f) for f in self.definition_files()],
            "options": options,
            "data": self.data_identity(),
        }
        text = json.dumps(jsonable(payload), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()
