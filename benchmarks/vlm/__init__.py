"""The composed VLM (image encoder -> connector -> causal LM), its aligned-connector cache, hub VLMs."""

from benchmarks.vlm.align import AlignConfig, align_connector, load_or_align
from benchmarks.vlm.build import DEFAULT_IMAGE_SIZE, DEFAULT_VLM, load_encoder, load_lm
from benchmarks.vlm.composed import ComposedVLM, Connector, VLMOutput
from benchmarks.vlm.encoders import ImageTransform, patch_tokens, pooled_feature
from benchmarks.vlm.factory import VLMBuild, build_vlm
from benchmarks.vlm.io import ComposedIO, sequence_logprobs

__all__ = [
    "DEFAULT_IMAGE_SIZE",
    "DEFAULT_VLM",
    "AlignConfig",
    "ComposedIO",
    "ComposedVLM",
    "Connector",
    "ImageTransform",
    "VLMBuild",
    "VLMOutput",
    "align_connector",
    "build_vlm",
    "load_encoder",
    "load_lm",
    "load_or_align",
    "patch_tokens",
    "pooled_feature",
    "sequence_logprobs",
]
