"""Image encoders as VLM vision towers: patch tokens, a pooled feature, and the image transform.

Supports transformers vision models (DINOv2, ViT, ... returning ``last_hidden_state``) and timm
ViT-style models (``forward_features`` + ``num_prefix_tokens``, e.g. ``eva02_*`` with a gated SwiGLU MLP).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _is_timm(tower: nn.Module) -> bool:
    return hasattr(tower, "forward_features") and hasattr(tower, "num_prefix_tokens")


def _num_prefix_tokens(tower: nn.Module) -> int:
    if _is_timm(tower):
        return int(tower.num_prefix_tokens)
    cfg = getattr(tower, "config", None)
    # DINOv2-with-registers keeps register tokens between CLS and the patches.
    return 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)


def all_tokens(tower: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Final (normalised) hidden states of every token, ``(B, prefix + patches, D)``."""
    if _is_timm(tower):
        return tower.forward_features(pixel_values)
    out = tower(pixel_values=pixel_values)
    if not hasattr(out, "last_hidden_state"):
        raise TypeError(f"vision tower {type(tower).__name__} returns no last_hidden_state")
    return out.last_hidden_state


def patch_tokens(tower: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Patch tokens only (CLS / register tokens dropped), ``(B, N, D)`` with N a square grid."""
    tokens = all_tokens(tower, pixel_values)[:, _num_prefix_tokens(tower) :]
    side = math.isqrt(tokens.shape[1])
    if side * side != tokens.shape[1]:
        raise ValueError(f"patch tokens ({tokens.shape[1]}) do not form a square grid; use a square image size")
    return tokens


def pooled_feature(tower: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """One feature per image: the CLS token (mean of patches when the tower has no prefix token)."""
    tokens = all_tokens(tower, pixel_values)
    if _num_prefix_tokens(tower) == 0:
        return tokens.mean(dim=1)
    return tokens[:, 0]


def pool_grid(tokens: torch.Tensor, grid: int) -> torch.Tensor:
    """Average-pool a square patch grid ``(B, N, D)`` to ``grid x grid`` tokens (0 keeps all)."""
    if grid <= 0:
        return tokens
    b, n, d = tokens.shape
    side = math.isqrt(n)
    x = tokens.transpose(1, 2).reshape(b, d, side, side)
    x = nn.functional.adaptive_avg_pool2d(x, grid)
    return x.flatten(2).transpose(1, 2)


def hidden_size(tower: nn.Module) -> int:
    """Width of the tower's tokens."""
    if _is_timm(tower):
        return int(tower.num_features)
    return int(tower.config.hidden_size)


def patch_size(tower: nn.Module) -> int:
    """Patch size in pixels (image sizes must be a multiple of it)."""
    if _is_timm(tower):
        ps = tower.patch_embed.patch_size
        return int(ps[0] if isinstance(ps, (tuple, list)) else ps)
    return int(tower.config.patch_size)


@dataclass
class ImageTransform:
    """PIL image -> normalised float tensor ``(3, size, size)``; batches with ``stack``.

    A plain resize (no crop): the offline images are small, centred objects (28-64 px) and
    cropping would cut them.
    """

    size: int
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.mode == "RGBA":
            # Emoji PNGs are transparent: composite on white, as they are displayed.
            bg = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(bg, image)
        image = image.convert("RGB").resize((self.size, self.size), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.std, dtype=torch.float32)[:, None, None]
        return (x - mean) / std

    def stack(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.stack([self(im) for im in images])

    @classmethod
    def from_processor(cls, processor: object | None, size: int) -> ImageTransform:
        """Take mean/std from a transformers image processor when there is one."""
        mean = getattr(processor, "image_mean", None) or IMAGENET_MEAN
        std = getattr(processor, "image_std", None) or IMAGENET_STD
        return cls(size=size, mean=tuple(mean), std=tuple(std))
