"""Tiny random-weight models built from configs (no downloads), shared by every test file.

Each factory returns a fresh ``nn.Module`` in eval mode, seeded, small enough to build in well under
a second on one CPU core. ``FACTORIES`` maps a short name to its factory.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

VOCAB = 64
_TEXT = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 64,
}


def _done(model: nn.Module) -> nn.Module:
    return model.eval()


def llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return _done(LlamaForCausalLM(LlamaConfig(**_TEXT, hidden_act="silu")))


def qwen2() -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return _done(Qwen2ForCausalLM(Qwen2Config(**_TEXT)))


def qwen3() -> nn.Module:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    return _done(Qwen3ForCausalLM(Qwen3Config(**_TEXT, head_dim=16)))


def mistral() -> nn.Module:
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    return _done(MistralForCausalLM(MistralConfig(**_TEXT)))


def gemma3_text() -> nn.Module:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(**_TEXT, head_dim=16, hidden_activation="gelu_pytorch_tanh", sliding_window=16)
    return _done(Gemma3ForCausalLM(cfg))


def phi3() -> nn.Module:
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    kw = dict(_TEXT, num_key_value_heads=2)
    return _done(Phi3ForCausalLM(Phi3Config(**kw, pad_token_id=0, bos_token_id=1, eos_token_id=2)))


def qwen2_5_vl() -> nn.Module:
    """Full Qwen2.5-VL: vision blocks and language layers both use gate_proj/up_proj/down_proj."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            _TEXT, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 4]}
        ),
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 40,
            "num_heads": 2,
            "out_hidden_size": 32,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [1],
            "hidden_act": "silu",
        },
        image_token_id=VOCAB - 1,
        video_token_id=VOCAB - 2,
        vision_start_token_id=VOCAB - 3,
        vision_end_token_id=VOCAB - 4,
    )
    return _done(Qwen2_5_VLForConditionalGeneration(cfg))


def aimv2_vision() -> nn.Module:
    from transformers import Aimv2VisionConfig, Aimv2VisionModel

    torch.manual_seed(0)
    cfg = Aimv2VisionConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    return _done(Aimv2VisionModel(cfg))


def pixtral_vision() -> nn.Module:
    from transformers import PixtralVisionConfig, PixtralVisionModel

    torch.manual_seed(0)
    cfg = PixtralVisionConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=16,
        head_dim=16,
    )
    return _done(PixtralVisionModel(cfg))


def eva02_tiny_packed() -> nn.Module:
    """timm ``eva02_tiny_patch14_224`` structure (packed ``GluMlp``, gate first), shrunk."""
    import timm

    torch.manual_seed(0)
    return _done(
        timm.create_model(
            "eva02_tiny_patch14_224",
            pretrained=False,
            depth=2,
            embed_dim=32,
            num_heads=2,
            img_size=28,
            ref_feat_shape=(2, 2),
            num_classes=5,
        )
    )


def eva02_swiglu() -> nn.Module:
    """timm ``eva02_base_patch14_224`` structure (``SwiGLU`` fc1_g / fc1_x with scale norm), shrunk."""
    import timm

    torch.manual_seed(0)
    return _done(
        timm.create_model(
            "eva02_base_patch14_224",
            pretrained=False,
            depth=2,
            embed_dim=32,
            num_heads=2,
            img_size=28,
            ref_feat_shape=(2, 2),
            num_classes=5,
        )
    )


_TINY_EVA_CLIP = "nalora_tiny_eva02_clip"


def _register_tiny_eva_clip() -> None:
    import timm
    from timm.models import eva
    from timm.models._registry import register_model

    if _TINY_EVA_CLIP in timm.list_models(_TINY_EVA_CLIP):
        return

    def nalora_tiny_eva02_clip(pretrained: bool = False, **kwargs):
        # open_clip's EVA02-B-16 trunk (eva02_base_patch16_clip_224), shrunk to test size.
        args = {"depth": 2, "embed_dim": 32, "num_heads": 2, "img_size": 32, "ref_feat_shape": (2, 2)}
        return eva.eva02_base_patch16_clip_224(pretrained=False, **dict(args, **kwargs))

    register_model(nalora_tiny_eva02_clip)


def open_clip_eva02() -> nn.Module:
    """open_clip ``EVA02-B-16`` structure (CustomTextCLIP, timm EVA02 trunk), shrunk."""
    import open_clip

    _register_tiny_eva_clip()
    torch.manual_seed(0)
    model = open_clip.CustomTextCLIP(
        embed_dim=16,
        vision_cfg=open_clip.CLIPVisionCfg(
            image_size=32,
            timm_model_name=_TINY_EVA_CLIP,
            timm_model_pretrained=False,
            timm_pool="token",
            timm_proj=None,
        ),
        text_cfg=open_clip.CLIPTextCfg(context_length=8, vocab_size=VOCAB, width=32, heads=2, layers=1),
    )
    return _done(model)


def clip() -> nn.Module:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config={
            "vocab_size": VOCAB,
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 28,
            "patch_size": 14,
        },
        projection_dim=16,
    )
    return _done(CLIPModel(cfg))


def clip_vision() -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    return _done(CLIPVisionModel(cfg))


def siglip() -> nn.Module:
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(0)
    cfg = SiglipConfig(
        text_config={
            "vocab_size": VOCAB,
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 28,
            "patch_size": 14,
        },
    )
    return _done(SiglipModel(cfg))


def dinov2(use_swiglu_ffn: bool = False) -> nn.Module:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=4,
        image_size=28,
        patch_size=14,
        use_swiglu_ffn=use_swiglu_ffn,
    )
    return _done(Dinov2Model(cfg))


def dinov2_swiglu() -> nn.Module:
    return dinov2(use_swiglu_ffn=True)


def bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=32,
    )
    return _done(BertModel(cfg))


def t5(feed_forward_proj: str = "gated-gelu") -> nn.Module:
    """T5 v1.1 / Flan-T5 style (gated-gelu ``wi_0``/``wi_1``/``wo``) or original T5 (``relu``: ``wi``/``wo``)."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=16,
        d_ff=48,
        num_layers=2,
        num_heads=2,
        feed_forward_proj=feed_forward_proj,
        decoder_start_token_id=0,
    )
    return _done(T5ForConditionalGeneration(cfg))


def t5_relu() -> nn.Module:
    return t5("relu")


FACTORIES: dict[str, Callable[[], nn.Module]] = {
    "llama": llama,
    "qwen2": qwen2,
    "qwen3": qwen3,
    "mistral": mistral,
    "gemma3_text": gemma3_text,
    "phi3": phi3,
    "qwen2_5_vl": qwen2_5_vl,
    "aimv2_vision": aimv2_vision,
    "pixtral_vision": pixtral_vision,
    "eva02_tiny_packed": eva02_tiny_packed,
    "eva02_swiglu": eva02_swiglu,
    "open_clip_eva02": open_clip_eva02,
    "clip": clip,
    "clip_vision": clip_vision,
    "siglip": siglip,
    "dinov2": dinov2,
    "dinov2_swiglu": dinov2_swiglu,
    "bert": bert,
    "t5": t5,
    "t5_relu": t5_relu,
}
