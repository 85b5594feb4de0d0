"""``build_vlm``: spec -> composed VLM with an aligned connector, plus the batch builder for tasks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.vlm.align import AlignConfig, load_or_align
from benchmarks.vlm.build import freeze, load_encoder, load_lm, split_spec
from benchmarks.vlm.composed import ComposedVLM
from benchmarks.vlm.io import ComposedIO


@dataclass
class VLMBuild:
    """A ready VLM: the module to adapt, how to make its batches, and where it came from."""

    model: torch.nn.Module
    io: Any  # ComposedIO | HubIO
    spec: str
    alignment: dict[str, Any] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)


def build_vlm(spec: str, device: torch.device | str = "cpu", *, image_size: int | None = None, grid: int = 2,
              connector_hidden: int | None = None, align: bool = True, align_config: AlignConfig | None = None,
              cache_root: str | Path | None = None, align_pairs: tuple[Sequence, Sequence] | None = None,
              seed: int = 0) -> VLMBuild:
    """Compose ``ENCODER+LM`` (see ``benchmarks.vlm.build``) or load ``hub:<model id>``.

    Both towers come frozen (the adapter method decides what trains); the connector is aligned
    once and cached unless ``align=False`` (then it is a seeded random init, recorded as such).
    """
    if spec.startswith("hub:"):
        from benchmarks.vlm.hub import load_hub_vlm

        return load_hub_vlm(spec[4:], device)
    enc_name, lm_name = split_spec(spec)
    enc = load_encoder(enc_name, image_size)
    lm = load_lm(lm_name)
    torch.manual_seed(seed)  # the connector's init is part of what "unaligned" means
    vlm = ComposedVLM(freeze(enc.tower), freeze(lm.model), grid=grid, connector_hidden=connector_hidden)
    vlm.to(device)
    record = None
    if align:
        record = load_or_align(vlm, enc.transform, lm.tokenizer, encoder=enc_name, lm=lm_name,
                               cfg=align_config or AlignConfig(), cache_root=cache_root, pairs=align_pairs)
    io = ComposedIO(lm.tokenizer, enc.transform, vlm.num_image_tokens)
    return VLMBuild(vlm, io, spec, record, {"encoder": enc.provenance, "lm": lm.provenance,
                                            "image_size": enc.transform.size, "grid": grid})


