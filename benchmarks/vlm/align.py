"""Connector alignment (LLaVA stage 1): train only the connector on image-caption pairs, cache it.

Encoder and LM stay frozen; captions are ``"a picture of a {name}"`` with the class name
(Fashion-MNIST, CIFAR-10) or the emoji's own name (not its category, which the emoji task asks
for). Only train splits are used; a held-out loss on validation pairs is recorded before and after.
The result is cached per (encoder, LM, image size, connector shape, alignment config) under
``<asset cache>/vlm-connectors/``, so every transfer run starts from the same aligned connector.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from benchmarks.progress_env import progress_enabled
from benchmarks.vlm.composed import ComposedVLM
from benchmarks.vlm.encoders import ImageTransform, patch_tokens, pool_grid
from benchmarks.vlm.io import text_batch

ALIGN_VERSION = 1


@dataclass(frozen=True)
class AlignConfig:
    """What the aligned connector depends on; every field is part of the cache key."""

    sources: tuple[str, ...] = ("fashion-mnist", "emoji")
    per_source: int = 128
    eval_per_source: int = 32
    steps: int = 60
    batch_size: int = 8
    lr: float = 3e-3
    seed: int = 0
    template: str = "a picture of a {name}"


def display_name(name: str) -> str:
    """Class names as they appear in captions and answers: lower case, single spaces."""
    return " ".join(str(name).replace("_", " ").split()).lower()


def label_names(split: Any) -> list[str]:
    """Class names of a dataset split: the ``label`` ClassLabel's names, else a ``label_names`` feature."""
    feat = split.features.get("label")
    names = getattr(feat, "names", None)
    if not names:
        names = getattr(split.features.get("label_names"), "names", None)
    if not names:
        raise ValueError("dataset has no label names (expected a ClassLabel 'label' feature)")
    return list(names)


def caption_pairs(split: Any, n: int, seed: int, template: str) -> list[tuple[Image.Image, str]]:
    """``n`` (image, caption) pairs from ``split`` in a fixed random order; uses a ``name`` column if any."""
    order = np.random.default_rng(seed).permutation(len(split))[:n]
    rows = split.select(order.tolist())
    names = rows["name"] if "name" in split.column_names else None
    classes = None if names is not None else label_names(split)
    pairs = []
    for i, row in enumerate(rows):
        name = names[i] if names is not None else classes[row["label"]]
        pairs.append((row["image"], template.format(name=display_name(name))))
    return pairs


def alignment_pairs(cfg: AlignConfig, split: str) -> list[tuple[Image.Image, str]]:
    """Caption pairs of every source dataset (asset cache) for ``split``."""
    from benchmarks.assets import load_dataset

    n = cfg.per_source if split == "train" else cfg.eval_per_source
    pairs: list[tuple[Image.Image, str]] = []
    for src in cfg.sources:
        pairs += caption_pairs(load_dataset(src)[split], n, cfg.seed, cfg.template)
    return pairs


def cache_key(encoder: str, lm: str, image_size: int, grid: int, connector_hidden: int | None,
              cfg: AlignConfig) -> str:
    blob = json.dumps({"encoder": encoder, "lm": lm, "image_size": image_size, "grid": grid,
                       "connector_hidden": connector_hidden, "align": asdict(cfg), "v": ALIGN_VERSION},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _atomic_write(path: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@torch.no_grad()
def _pooled_features(vlm: ComposedVLM, transform: ImageTransform, images: Sequence[Image.Image],
                     device: torch.device, chunk: int = 64) -> torch.Tensor:
    # The tower is frozen during alignment: encode every image once, train on cached tokens.
    out = []
    for i in range(0, len(images), chunk):
        x = transform.stack(images[i : i + chunk]).to(device)
        out.append(pool_grid(patch_tokens(vlm.vision_tower, x), vlm.connector.grid))
    return torch.cat(out)


def _caption_loss(vlm: ComposedVLM, feats: torch.Tensor, text: dict, idx: torch.Tensor) -> torch.Tensor:
    device = feats.device
    return vlm.forward_embeds(vlm.connector.project(feats[idx]), text["input_ids"][idx].to(device),
                              text["attention_mask"][idx].to(device), text["labels"][idx].to(device)).loss


def align_connector(vlm: ComposedVLM, transform: ImageTransform, tokenizer: Any,
                    train_pairs: Sequence[tuple[Image.Image, str]],
                    eval_pairs: Sequence[tuple[Image.Image, str]], cfg: AlignConfig,
                    progress: bool | None = None) -> dict[str, Any]:
    """Train ``vlm.connector`` in place on caption pairs (towers frozen); returns the loss record.

    Shows a bar (encoding, then steps with the loss) unless ``progress`` is False or, when it is None,
    ``--no-progress`` is in effect: on a CPU with real towers this takes a minute, which must not be silent.
    """
    from tqdm.auto import tqdm

    if not train_pairs:
        raise ValueError("alignment needs at least one image-caption pair")
    device = next(vlm.parameters()).device
    t0 = time.time()
    was_training = vlm.training
    vlm.eval()  # no dropout in the frozen towers
    req = {n: p.requires_grad for n, p in vlm.named_parameters()}
    for n, p in vlm.named_parameters():
        p.requires_grad_(n.startswith("connector."))

    def prep(pairs: Sequence[tuple[Image.Image, str]]) -> tuple[torch.Tensor, dict]:
        feats = _pooled_features(vlm, transform, [im for im, _ in pairs], device)
        # Empty prompt: the caption follows the image tokens directly; loss on the whole caption.
        return feats, text_batch(tokenizer, [""] * len(pairs), [c for _, c in pairs])

    @torch.no_grad()
    def eval_loss(feats: torch.Tensor, text: dict) -> float | None:
        if feats.shape[0] == 0:
            return None
        losses = [float(_caption_loss(vlm, feats, text, torch.arange(i, min(i + 32, feats.shape[0]))))
                  for i in range(0, feats.shape[0], 32)]
        return float(np.mean(losses))

    bar = tqdm(total=cfg.steps, desc="align connector: encoding images", unit="step", leave=False,
               disable=not (progress_enabled() if progress is None else progress))
    train_feats, train_text = prep(train_pairs)
    eval_feats, eval_text = prep(eval_pairs) if eval_pairs else (torch.zeros(0), {})
    encode_s = time.time() - t0
    bar.set_description("align connector")
    before = eval_loss(eval_feats, eval_text)
    opt = torch.optim.AdamW(vlm.connector.parameters(), lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    n = train_feats.shape[0]
    history = []
    for step in range(cfg.steps):
        idx = torch.randint(n, (min(cfg.batch_size, n),), generator=gen)
        loss = _caption_loss(vlm, train_feats, train_text, idx)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        history.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{history[-1]:.3f}", refresh=False)
    bar.close()
    after = eval_loss(eval_feats, eval_text)
    for n_, p in vlm.named_parameters():
        p.requires_grad_(req[n_])
    vlm.train(was_training)
    k = max(1, min(10, len(history)))
    return {
        "train_pairs": len(train_pairs), "eval_pairs": len(eval_pairs), "steps": cfg.steps,
        "train_loss_first10": float(np.mean(history[:k])) if history else None,
        "train_loss_last10": float(np.mean(history[-k:])) if history else None,
        "eval_loss_before": before, "eval_loss_after": after,
        "encode_seconds": round(encode_s, 1), "seconds": round(time.time() - t0, 1), "device": str(device),
    }


def connector_dir(root: Path, encoder: str, lm: str, key: str) -> Path:
    safe = f"{encoder}+{lm}".replace("/", "_").replace(":", "_")
    return Path(root) / "vlm-connectors" / f"{safe}-{key}"


def load_or_align(vlm: ComposedVLM, transform: ImageTransform, tokenizer: Any, *, encoder: str, lm: str,
                  cfg: AlignConfig, cache_root: Path | None = None,
                  pairs: tuple[Sequence, Sequence] | None = None) -> dict[str, Any]:
    """Load the cached aligned connector into ``vlm``, aligning (and caching) it first if absent.

    ``pairs`` = (train, eval) caption pairs overrides the asset-cache sources (tests, custom data).
    Returns the alignment record (also stored as ``alignment.json`` next to the weights).
    """
    from safetensors.torch import load_file, save_file

    if cache_root is None:
        from benchmarks.assets import cache_dir

        cache_root = cache_dir()
    image_size = transform.size
    key = cache_key(encoder, lm, image_size, vlm.connector.grid, vlm.connector.proj_in.out_features, cfg)
    if pairs is not None:  # custom data must never be mistaken for the default alignment
        captions = json.dumps([[c for _, c in pairs[0]], [c for _, c in pairs[1]]])
        key = hashlib.sha256((key + captions).encode()).hexdigest()[:16]
    folder = connector_dir(Path(cache_root), encoder, lm, key)
    weights, record_path = folder / "connector.safetensors", folder / "alignment.json"
    if weights.exists() and record_path.exists():
        device = next(vlm.connector.parameters()).device
        vlm.connector.load_state_dict(load_file(str(weights), device=str(device)))
        record = json.loads(record_path.read_text())
        record.update(cached=True, path=str(weights))
        return record
    train_pairs, eval_pairs = pairs if pairs is not None else (
        alignment_pairs(cfg, "train"), alignment_pairs(cfg, "validation"))
    record = align_connector(vlm, transform, tokenizer, train_pairs, eval_pairs, cfg)
    record.update({"encoder": encoder, "lm": lm, "image_size": image_size, "grid": vlm.connector.grid,
                   "config": asdict(cfg), "key": key, "version": ALIGN_VERSION,
                   "custom_pairs": pairs is not None})
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in vlm.connector.state_dict().items()}
    _atomic_write(weights, lambda tmp: save_file(state, tmp))
    # The record is written last: its presence marks a complete entry.
    _atomic_write(record_path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2)))
    record.update(cached=False, path=str(weights))  # where the weights are: not stored, the cache may move
    return record
