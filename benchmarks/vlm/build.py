"""Resolve a model spec into towers: ``"ENCODER+LM"`` for the composed VLM, or one encoder for probes.

Encoder names: an asset-cache image encoder (``dinov2-s``), ``timm:<model>`` (random weights: no
gated pretrained vision tower installs offline), the distilled gated ``vit-s-swiglu``
(``benchmarks.vlm.distill``), or ``tiny-dinov2`` / ``tiny-eva02`` / ``tiny-vit-swiglu``.
LM names: an asset-cache causal LM (``smollm2-135m``, ``gemma3-270m``) or ``tiny-byte-llama`` (tests).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from benchmarks.vlm.encoders import ImageTransform, patch_size
from benchmarks.vlm.tiny import TINY_ENCODERS, TINY_IMAGE_SIZE, TINY_LMS, ByteTokenizer

DEFAULT_IMAGE_SIZE = 112  # the offline images are 28-64 px: larger inputs add cost, not information
DEFAULT_VLM = "dinov2-s+smollm2-135m"


@dataclass
class Encoder:
    """A vision tower with its image transform."""

    name: str
    tower: nn.Module
    transform: ImageTransform
    provenance: dict[str, Any] = field(default_factory=dict)


@dataclass
class LanguageModel:
    name: str
    model: nn.Module
    tokenizer: Any
    provenance: dict[str, Any] = field(default_factory=dict)


def split_spec(spec: str) -> tuple[str, str]:
    """``"dinov2-s+smollm2-135m"`` -> ``("dinov2-s", "smollm2-135m")``."""
    parts = spec.split("+")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"VLM spec {spec!r} must be 'ENCODER+LM', e.g. {DEFAULT_VLM!r}")
    return parts[0], parts[1]


def load_encoder(name: str, image_size: int | None = None) -> Encoder:
    """The vision tower ``name`` (frozen-ready, float32, CPU) and its transform."""
    if name in TINY_ENCODERS:
        tower = TINY_ENCODERS[name]()
        return Encoder(name, tower, ImageTransform(image_size or TINY_IMAGE_SIZE), {"source": "random init"})
    size = image_size or DEFAULT_IMAGE_SIZE
    if name.startswith("timm:"):
        import timm

        tower = timm.create_model(name[5:], pretrained=False, num_classes=0, img_size=size).eval()
        cfg = tower.pretrained_cfg or {}
        transform = ImageTransform(size, cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225)))
        return Encoder(name, tower, transform, {"source": "timm random init", "timm": timm.__version__})
    from benchmarks.vlm.distill import DISTILLED_ENCODERS, load_distilled

    if name in DISTILLED_ENCODERS:  # timm towers built by distillation (benchmarks/vlm/distill.py)
        tower, prov = load_distilled(name, size)
        return Encoder(name, tower, ImageTransform(size), prov)
    from benchmarks.assets import load_model

    bundle = load_model(name)
    if bundle.kind != "image_encoder":
        raise ValueError(f"{name!r} is a {bundle.kind}, not an image encoder")
    ps = patch_size(bundle.model)
    if size % ps:
        raise ValueError(f"image_size {size} is not a multiple of {name}'s patch size {ps}")
    return Encoder(name, bundle.model.eval(), ImageTransform.from_processor(bundle.image_processor, size),
                   dict(bundle.provenance or {}))


def load_lm(name: str) -> LanguageModel:
    """The causal LM ``name`` and its tokenizer."""
    if name in TINY_LMS:
        return LanguageModel(name, TINY_LMS[name](), ByteTokenizer(), {"source": "random init"})
    if name.startswith("tiny-"):  # e.g. the language tasks' tiny-llama, which has another tokenizer
        raise ValueError(f"{name!r} is not a composed-VLM test LM; use one of {sorted(TINY_LMS)}")
    from benchmarks.assets import load_model

    bundle = load_model(name)
    if bundle.kind != "causal_lm":
        raise ValueError(f"{name!r} is a {bundle.kind}, not a causal LM")
    return LanguageModel(name, bundle.model.eval(), bundle.tokenizer, dict(bundle.provenance or {}))


def freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device
