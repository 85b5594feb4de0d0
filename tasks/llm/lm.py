"""Base classes of the causal-LM tasks: ``LMTask`` (data, setup, SFT), ``ChoiceTask``, ``GenerationTask``.

A new language task subclasses ``ChoiceTask`` (multiple choice or classification scored by
log-likelihood) or ``GenerationTask`` (greedy generation, exact match on the final number) and fills in
the ``doc_to_*`` methods; everything the runner calls is inherited.
"""

from __future__ import annotations

import json
import random
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tasks.base import PerExample, Task, TaskSetup
from tasks.common import (
    final_number,
    greedy_generate,
    lm_loss,
    load_causal_lm,
    loglikelihoods,
    sft_collate,
    wants_bos,
)
from tasks.scoring import chance_of_choices, choice_metrics, score_choices

SPLITS = ("train", "validation", "test")
_DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_split_file(path: str | Path) -> datasets.Dataset:  # noqa: F821
    """One split from a local ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` file."""
    import datasets

    path = Path(path)
    if path.suffix not in _DATA_SUFFIXES:
        raise ValueError(f"data file {path}: unsupported type {path.suffix!r}; use one of {sorted(_DATA_SUFFIXES)}")
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    if path.suffix == ".jsonl":  # small files: no builder, no cache files, no progress bars
        with open(path) as f:
            return datasets.Dataset.from_list([json.loads(line) for line in f if line.strip()])
    return datasets.load_dataset(_DATA_SUFFIXES[path.suffix], data_files=str(path), split="train")


def load_data_files(files: dict[str, str | Path]) -> datasets.DatasetDict:  # noqa: F821
    """Raw splits from ``{split name: local file}``."""
    import datasets

    return datasets.DatasetDict({split: load_split_file(path) for split, path in files.items()})


def load_local_splits(data_dir: str | Path) -> datasets.DatasetDict:  # noqa: F821
    """Raw splits from ``data_dir/<split>.{jsonl,json,parquet,csv}`` (a fixture or a user's copy)."""
    folder = Path(data_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"task data folder {folder} does not exist")
    files = {f.stem: f for f in sorted(folder.iterdir()) if f.suffix in _DATA_SUFFIXES}
    if not files:
        raise FileNotFoundError(f"no <split>.jsonl/.json/.parquet/.csv files in {folder}")
    return load_data_files(files)


class LMTask(Task):
    """A causal-LM task: the data side (splits) and the training side (SFT on prompt + answer)."""

    family = "llm"
    dataset_name: str | None = None
    """Hub configuration name (``load_dataset(dataset, dataset_name)``)."""
    split_map: dict[str, str] = {"train": "train", "validation": "validation", "test": "test"}
    """Our split -> the source's split. A source without labelled test data maps ``test`` to its validation."""
    validation_from_train: float = 0
    """If > 0: hold training examples out (fixed seed) as the validation split: a count if >= 1, else a fraction."""
    max_length: int = 512
    """Longest token sequence; longer prompts lose tokens from the left."""
    data_files: dict[str, str] | None = None
    """Local data: ``{source split: file}`` (JSONL / JSON / CSV / Parquet), used instead of ``dataset``."""

    def __init__(self, data_dir: str | Path | None = None) -> None:
        """``data_dir`` replaces the data source with local ``<split>.jsonl`` files (tests, offline copies)."""
        self.data_dir = data_dir
        self._splits = None
        if not type(self).protocol:
            self.protocol = self.default_protocol()

    # -- data ---------------------------------------------------------------------------------------

    def _raw(self) -> datasets.DatasetDict:  # noqa: F821
        if self.data_dir is not None:
            return load_local_splits(self.data_dir)
        if self.data_files:
            return load_data_files(self.data_files)
        if self.requires_network:
            import datasets

            try:
                return datasets.load_dataset(self.dataset, self.dataset_name)
            except Exception as err:
                raise RuntimeError(
                    f"task {self.name!r} needs the hub dataset {self.dataset!r}"
                    f"{' (' + self.dataset_name + ')' if self.dataset_name else ''}, which could not be loaded "
                    f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                    "this task requires network access or a data_dir with local copies"
                ) from err
        from benchmarks.assets import load_dataset

        return load_dataset(self.dataset)

    def load_splits(self) -> datasets.DatasetDict:  # noqa: F821
        """``train`` / ``validation`` / ``test``, mapped from the source's splits (cached per instance)."""
        if self._splits is not None:
            return self._splits
        import datasets

        raw = self._raw()
        out = {}
        for ours, theirs in self.split_map.items():
            if theirs not in raw:
                raise ValueError(
                    f"task {self.name!r}: source split {theirs!r} (for {ours}) not found; have {sorted(raw)}"
                )
            out[ours] = raw[theirs]
        if self.validation_from_train:
            n = self.validation_from_train
            n = int(n) if n >= 1 else float(n)
            if len(out["train"]) < 2 or (isinstance(n, int) and len(out["train"]) <= n):
                raise ValueError(f"task {self.name!r}: cannot hold out {n} of {len(out['train'])} training examples")
            # keep_in_memory: the same split, without writing indices files into the asset cache.
            parts = out["train"].train_test_split(test_size=n, shuffle=True, seed=0, keep_in_memory=True)
            out["train"], out["validation"] = parts["train"], parts["test"]
        missing = [s for s in SPLITS if s not in out]
        if missing:
            raise ValueError(f"task {self.name!r}: no {missing} split (set split_map or validation_from_train)")
        self._splits = datasets.DatasetDict({s: out[s] for s in SPLITS})
        return self._splits

    def example_indices(self, split: str, limit: int | None = None) -> list[int]:
        """Row numbers in ``split`` of the examples ``examples(split, limit)`` returns, in that order.

        With a ``limit``: the first ``limit`` of a seed-0 permutation (``Dataset.shuffle(seed=0)``'s order;
        sources may be class-ordered), otherwise the whole split in order.
        """
        import numpy as np

        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        n = len(self.load_splits()[split])
        if limit is not None and limit < n:
            return np.random.default_rng(0).permutation(n)[:limit].tolist()
        return list(range(n))

    def examples(self, split: str, limit: int | None = None) -> datasets.Dataset:  # noqa: F821
        """``split`` or a fixed subset of ``limit`` examples (seeded shuffle: sources may be class-ordered)."""
        data = self.load_splits()[split] if split in SPLITS else None
        indices = self.example_indices(split, limit)
        # select() keeps the indices in memory (shuffle() would write a cache file into the asset cache).
        return data if len(indices) == len(data) else data.select(indices)

    def heldout_batches(self, setup: TaskSetup, n: int, batch_size: int) -> list[dict]:
        """Up to ``n`` batches (training format) from the validation split: a fixed seed-0 subset of
        ``n * batch_size`` examples, never the training stream (the misalignment diagnostic's data)."""
        data = self.load_splits()["validation"]
        idx = self.example_indices("validation", n * batch_size)
        return [self.collate(setup, [data[i] for i in idx[s : s + batch_size]]) for s in range(0, len(idx), batch_size)]

    # -- model --------------------------------------------------------------------------------------

    def setup(self, model_name: str, device: torch.device | str = "cpu") -> TaskSetup:
        """Load ``model_name`` (asset cache, or a ``tasks.common.TINY_MODELS`` name) for this task."""
        model, tokenizer = load_causal_lm(model_name)
        return self.setup_from(model, tokenizer, device)

    def setup_from(self, model: nn.Module, tokenizer: Any, device: torch.device | str = "cpu") -> TaskSetup:
        """Wrap an already loaded causal LM and tokenizer (tests, notebooks)."""
        return TaskSetup(
            model=model.to(device), trainable=[],
            extras={"tokenizer": tokenizer, "add_bos": wants_bos(model)},
        )

    # -- training -----------------------------------------------------------------------------------

    def train_pair(self, example: dict) -> tuple[str, str]:
        """(prompt, answer) of one training example; the loss covers the answer only."""
        raise NotImplementedError

    append_eos: bool = False

    def collate(self, setup: TaskSetup, examples: list[dict]) -> dict[str, torch.Tensor]:
        return sft_collate(
            setup.extras["tokenizer"], [self.train_pair(ex) for ex in examples], self.max_length,
            add_bos=setup.extras.get("add_bos", False), append_eos=self.append_eos,
        )

    def train_batches(self, setup: TaskSetup, batch_size: int, seed: int) -> Iterator[dict]:
        """Collated batches forever; each epoch is a fresh permutation drawn from ``seed``."""
        data = self.load_splits()["train"]
        if len(data) == 0:
            raise ValueError(f"task {self.name!r}: empty training split")
        epoch = 0
        while True:
            order = list(range(len(data)))
            random.Random(f"{seed}:{epoch}").shuffle(order)
            for start in range(0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size):
                rows = [data[i] for i in order[start : start + batch_size]]
                yield self.collate(setup, rows)
            epoch += 1

    def loss(self, setup: TaskSetup, model: nn.Module, batch: dict) -> torch.Tensor:
        return lm_loss(model, batch)

    # -- helpers ------------------------------------------------------------------------------------

    def default_protocol(self) -> str:
        return ""

    def assets(self, model_name: str) -> list[str]:
        """Local data (``data_dir`` / ``data_files``) needs no dataset asset, only the model's."""
        names = super().assets(model_name)
        if self.data_dir is not None or self.data_files:
            names = [n for n in names if n != self.dataset]
        return names

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(requires_network=self.requires_network, dataset_name=self.dataset_name)
        if self.data_files:
            d["data_files"] = {split: Path(f).name for split, f in self.data_files.items()}
        return d


def _overrides(task: Task, base: type, *names: str) -> bool:
    """Whether ``task``'s class replaces any of ``base``'s methods ``names`` (an older plugin's own scoring)."""
    return any(getattr(type(task), n) is not getattr(base, n) for n in names)


class _EvalMode:
    """Evaluate in eval mode and restore the caller's mode (the runner evaluates mid-training)."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.was_training = model, model.training

    def __enter__(self) -> nn.Module:
        self.model.eval()
        return self.model

    def __exit__(self, *exc) -> None:
        self.model.train(self.was_training)


class ChoiceTask(LMTask):
    """Multiple choice / classification scored by the log-likelihood of each choice (lm-eval style)."""

    answer_format = "choices"
    metrics = {"acc": True, "acc_norm": True}
    selection_metric = "acc"
    report_metric = "acc"
    target_delimiter: str = " "
    num_choices: int | None = None
    """Fixed number of choices (chance = 1/num_choices); ``None``: computed from the test split."""
    share_context: bool = True
    """Score an example's choices after one shared forward of its context (same numbers; False: one sequence
    per choice, the reference that ``benchmarks/perf/eval_time.py`` times it against)."""

    def doc_to_text(self, example: dict) -> str:
        raise NotImplementedError

    def doc_to_choices(self, example: dict) -> list[str]:
        raise NotImplementedError

    def doc_to_label(self, example: dict) -> int:
        raise NotImplementedError

    def requests(self, example: dict) -> list[tuple[str, str]]:
        """(context, continuation) per choice; override for tasks whose context varies (Winogrande)."""
        text = self.doc_to_text(example)
        return [(text, self.target_delimiter + c) for c in self.doc_to_choices(example)]

    def train_pair(self, example: dict) -> tuple[str, str]:
        return self.requests(example)[self.doc_to_label(example)]

    def default_protocol(self) -> str:
        norm = (
            "; acc_norm = argmax of log-likelihood / len(choice text) (characters, as lm-eval)"
            if "acc_norm" in self.metrics else ""
        )
        return (
            f"log-likelihood of each choice after a zero-shot prompt (lm-eval style: delimiter "
            f"{self.target_delimiter!r}, context/continuation tokenised as lm-eval _encode_pair, BOS for Gemma "
            f"only, prompts left-truncated to {self.max_length} tokens); acc = argmax of summed log-likelihood"
            f"{norm}"
        )

    def score(
        self, setup: TaskSetup, model: nn.Module, split: str, limit: int | None = None, batch_size: int = 16,
        share_context: bool | None = None,
    ) -> tuple[list[list[float]], list[list[str]], list[int]]:
        """Per example: the log-likelihood of each choice, the choice texts and the gold index.
        ``share_context``: see the class attribute (None: use it)."""
        data = self.examples(split, limit)
        flat, spans, choices, labels = [], [], [], []
        for ex in data:
            reqs = self.requests(ex)
            spans.append((len(flat), len(flat) + len(reqs)))
            flat.extend(reqs)
            choices.append(self.doc_to_choices(ex))
            labels.append(self.doc_to_label(ex))
        with _EvalMode(model):
            lls = loglikelihoods(
                model, setup.extras["tokenizer"], flat, batch_size=batch_size, max_length=self.max_length,
                add_bos=setup.extras.get("add_bos", False),
                share_context=self.share_context if share_context is None else share_context,
            )
        return [lls[a:b] for a, b in spans], choices, labels

    def metrics_from(self, lls: list[list[float]], choices: list[list[str]], labels: list[int]) -> dict[str, float]:
        metrics = choice_metrics(lls, choices, labels, norm="acc_norm" in self.metrics)
        return {k: v for k, v in metrics.items() if k in self.metrics}

    def _evaluate_choices(
        self, setup: TaskSetup, model: nn.Module, split: str, limit: int | None, batch_size: int
    ) -> tuple[dict[str, float], PerExample]:
        lls, choices, labels = self.score(setup, model, split, limit, batch_size)
        scores = score_choices(lls, choices, labels)
        metrics = self.metrics_from(lls, choices, labels)
        # Per-example predictions follow the reported metric (acc unless a task reports acc_norm).
        key = self.report_metric if self.report_metric in ("acc", "acc_norm") else "acc"
        return metrics, scores.per_example(self.example_indices(split, limit), key)

    def evaluate(
        self, setup: TaskSetup, model: nn.Module, split: str, limit: int | None = None, batch_size: int = 16
    ) -> dict[str, float]:
        return self._evaluate_choices(setup, model, split, limit, batch_size)[0]

    def evaluate_examples(
        self, setup: TaskSetup, model: nn.Module, split: str, limit: int | None = None, batch_size: int = 16
    ) -> tuple[dict[str, float], PerExample | None]:
        if _overrides(self, ChoiceTask, "evaluate", "metrics_from"):
            # A subclass with its own metrics: its evaluate() is the truth, per-example results unknown.
            return super().evaluate_examples(setup, model, split, limit, batch_size)
        return self._evaluate_choices(setup, model, split, limit, batch_size)

    def chance(self) -> dict[str, float]:
        """Uniform guessing: ``1 / num_choices``, or the mean over test examples of ``1 / len(choices)``."""
        if self.num_choices:
            p = 1.0 / self.num_choices
        else:
            cached = self.__dict__.get("_chance")
            if cached is not None:
                return dict(cached)
            try:
                test = self.load_splits()["test"]
                p = chance_of_choices([len(self.doc_to_choices(ex)) for ex in test])
            except Exception:  # noqa: BLE001 - data not available: chance unknown
                return {}
        self._chance = {m: p for m in self.metrics}
        return dict(self._chance)


class GenerationTask(LMTask):
    """Free-text answers: greedy generation, exact match on the final number."""

    answer_format = "free_text"
    metrics = {"exact_match": True}
    selection_metric = "exact_match"
    report_metric = "exact_match"
    append_eos = True  # the model learns to stop after the answer, which keeps generation short
    max_new_tokens: int = 128
    stop: tuple[str, ...] = ("\n\n", "Question:")

    def doc_to_text(self, example: dict) -> str:
        raise NotImplementedError

    def doc_to_target(self, example: dict) -> str:
        """The training continuation (a worked solution ending in ``#### <number>``)."""
        raise NotImplementedError

    def doc_to_answer(self, example: dict) -> str:
        """The gold final number."""
        raise NotImplementedError

    def train_pair(self, example: dict) -> tuple[str, str]:
        return self.doc_to_text(example), self.doc_to_target(example)

    def default_protocol(self) -> str:
        return (
            f"greedy generation after a zero-shot prompt (at most {self.max_new_tokens} new tokens, stop at "
            f"{list(self.stop)} or EOS); exact_match = final number of the generation (after '####' if "
            "present, else the last number; commas, '$' and trailing '.0' ignored) equals the gold number"
        )

    def evaluate(
        self, setup: TaskSetup, model: nn.Module, split: str, limit: int | None = None, batch_size: int = 16
    ) -> dict[str, float]:
        return self._evaluate_generation(setup, model, split, limit, batch_size)[0]

    def evaluate_examples(
        self, setup: TaskSetup, model: nn.Module, split: str, limit: int | None = None, batch_size: int = 16
    ) -> tuple[dict[str, float], PerExample | None]:
        if _overrides(self, GenerationTask, "evaluate"):
            return super().evaluate_examples(setup, model, split, limit, batch_size)
        return self._evaluate_generation(setup, model, split, limit, batch_size)

    def _evaluate_generation(
        self, setup: TaskSetup, model: nn.Module, split: str, limit: int | None, batch_size: int
    ) -> tuple[dict[str, float], PerExample]:
        """Exact match; per example the pred is the final number of the generation ("" if none)."""
        data = self.examples(split, limit)
        if len(data) == 0:
            raise ValueError("no examples to score")
        prompts = [self.doc_to_text(ex) for ex in data]

        def generate(cache: str) -> list[str]:
            return greedy_generate(
                model, setup.extras["tokenizer"], prompts, max_new_tokens=self.max_new_tokens,
                batch_size=batch_size, stop=self.stop, max_length=self.max_length + self.max_new_tokens,
                add_bos=setup.extras.get("add_bos", False), cache=cache,
            )

        with _EvalMode(model):
            cache = setup.extras.get("generation_cache", "dynamic")  # the runner's choice (compiled.Prepared)
            try:
                outs = generate(cache)
            except Exception as e:  # noqa: BLE001 - any failure of the compiled path: the dynamic cache is the reference
                if cache == "dynamic" or isinstance(e, torch.OutOfMemoryError):
                    raise
                # The static cache (its compiled decoding) failed: this and every later evaluation of the run
                # decode eagerly, and the record says why (the runner reads the reason back from the extras).
                reason = f"{cache} cache failed, dynamic from here: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                setup.extras.update(generation_cache="dynamic", generation_cache_fallback=reason)
                warnings.warn(reason, stacklevel=2)
                outs = generate("dynamic")
        preds, correct = [], []
        for ex, out in zip(data, outs):
            gold, pred = final_number(self.doc_to_answer(ex)), final_number(out)
            preds.append(pred or "")
            correct.append(gold is not None and pred == gold)
        ids = [str(i) for i in self.example_indices(split, limit)]
        return {"exact_match": sum(correct) / len(data)}, {"id": ids, "pred": preds, "correct": correct}

    def chance(self) -> dict[str, float]:
        return {"exact_match": 0.0}
