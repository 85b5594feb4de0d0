"""Tiny random-weight towers and a byte tokenizer, for tests and smoke runs (no download, milliseconds)."""

from __future__ import annotations

import torch
from torch import nn

TINY_IMAGE_SIZE = 28  # patch 7 -> a 4 x 4 grid


class ByteTokenizer:
    """UTF-8 bytes as token ids (offset by 3 for pad/bos/eos); just what the VLM code uses."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    vocab_size = 259

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [b + 3 for b in text.encode("utf-8")]
        return [self.bos_token_id] + ids if add_special_tokens else ids

    def decode(self, ids: list[int]) -> str:
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")


def tiny_byte_llama(seed: int = 0) -> nn.Module:
    """A 2-layer Llama (SwiGLU MLP) over ``ByteTokenizer``'s vocabulary: the composed VLM's test LM.

    Named apart from the language tasks' ``tiny-llama`` (``tasks.common.tiny_llama``: another config and
    a ``transformers`` byte-level tokenizer), which is a different model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=ByteTokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=128, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def tiny_dinov2(seed: int = 0) -> nn.Module:
    """A 2-layer DINOv2 (plain GELU MLP, layer-scale), 28 px images, 7 px patches."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                       patch_size=7, image_size=TINY_IMAGE_SIZE, layerscale_value=1.0)
    return Dinov2Model(cfg).eval()


def tiny_eva02(seed: int = 0) -> nn.Module:
    """A 2-layer timm EVA02 (gated SwiGLU MLP, packed ``fc1``), 28 px images, 7 px patches."""
    import timm

    torch.manual_seed(seed)
    return timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=TINY_IMAGE_SIZE,
                             patch_size=7, depth=2, embed_dim=32, num_heads=2, num_classes=0).eval()


def tiny_vit_swiglu(seed: int = 0) -> nn.Module:
    """A 2-layer random ``vit-s-swiglu`` (timm ViT, separate SwiGLU ``fc1_g``/``fc1_x``/``fc2``), 28 px, 7 px patches."""
    from benchmarks.vlm.distill import StudentConfig, make_student

    torch.manual_seed(seed)
    cfg = StudentConfig(embed_dim=32, depth=2, num_heads=2, patch_size=7, mlp_hidden=48)
    return make_student(cfg, TINY_IMAGE_SIZE).eval()


TINY_ENCODERS = {"tiny-dinov2": tiny_dinov2, "tiny-eva02": tiny_eva02, "tiny-vit-swiglu": tiny_vit_swiglu}
TINY_LMS = {"tiny-byte-llama": tiny_byte_llama}
