"""Split handling shared by the vision tasks: loading, the train cap, fixed evaluation order."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from benchmarks.vlm.align import display_name, label_names

# Where each image dataset comes from (shared by its QA and probe tasks).
SOURCES = {
    "fashion-mnist": "Fashion-MNIST (Debian dataset-fashion-mnist, MIT), 10 clothing classes",
    "emoji": "Google Noto emoji images (npm emoji-datasource-google) with their emoji categories",
    "cifar10": "CIFAR-10 test set via BIG-bench (heavy asset: `nalora-bench fetch cifar10`)",
}


def load_capped(dataset: str, max_train: int | None, seed: int = 0) -> Any:
    """The asset-cache splits with ``train`` capped to ``max_train`` examples (fixed random subset)."""
    from benchmarks.assets import load_dataset

    return cap_train(load_dataset(dataset), max_train, seed)


def cap_train(splits: Any, max_train: int | None, seed: int = 0) -> Any:
    """``splits`` with ``train`` reduced to a seeded random subset of ``max_train`` (None: all)."""
    for name in ("train", "validation", "test"):
        if name not in splits:
            raise ValueError(f"dataset has no {name!r} split (has: {', '.join(splits)})")
    if max_train is not None and max_train < len(splits["train"]):
        if max_train <= 0:
            raise ValueError(f"max_train must be positive, got {max_train}")
        order = np.random.default_rng(seed).permutation(len(splits["train"]))[:max_train]
        splits["train"] = splits["train"].select(sorted(order.tolist()))
    return splits


def class_names(split: Any) -> list[str]:
    """Display names of the classes (lower case), as captions and answers use them."""
    names = [display_name(n) for n in label_names(split)]
    if len(set(names)) != len(names):
        raise ValueError(f"class names collide after normalisation: {names}")
    return names


def eval_order(n: int, limit: int | None) -> list[int]:
    """A fixed random order of a split (sources can be class-ordered), truncated to ``limit``."""
    order = np.random.default_rng(1234).permutation(n).tolist()
    return order if limit is None else order[:limit]


def epochs(n: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Index batches forever, reshuffled every epoch from ``seed``; the last short batch is kept."""
    if n == 0:
        raise ValueError("training split is empty")
    epoch = 0
    while True:
        order = np.random.default_rng([seed, epoch]).permutation(n).tolist()
        for i in range(0, n, batch_size):
            yield order[i : i + batch_size]
        epoch += 1


def to_device(batch: dict, device: Any) -> dict:
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
