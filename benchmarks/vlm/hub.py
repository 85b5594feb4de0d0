"""Native hub VLMs (Qwen2.5-VL, SmolVLM, ...) behind the same batch interface as the composed VLM.

``load_hub_vlm("Qwen/Qwen2.5-VL-3B-Instruct")`` needs internet (or a local HF cache). The model is
used as is: ``AutoModelForImageTextToText`` + ``AutoProcessor``; towers stay frozen for the adapter
method to decide, and no module is trained by every method (``trainable = []``): the native projector
is already aligned. Logits are returned over the whole sequence, ``labels`` aligned with them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image


class HubIO:
    """Batches for a transformers image-text-to-text model through its processor.

    The prompt goes through the processor's chat template when it has one (the answer follows the
    assistant turn), else ``<image token> prompt``. The answer tokens are found lm-eval style: the
    prompt is encoded alone and the tokens beyond its length are the answer.
    """

    trainable: tuple[str, ...] = ()

    def __init__(self, processor: Any):
        self.processor = processor
        self.num_image_tokens = 0  # variable: the processor expands image placeholders itself

    def _text(self, prompt: str) -> str:
        if getattr(self.processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        image_token = getattr(self.processor, "image_token", None)
        if image_token is None:
            raise ValueError(f"{type(self.processor).__name__} has neither a chat template nor an image_token")
        start = getattr(self.processor.tokenizer, "vision_start_token", None) or ""
        end = getattr(self.processor.tokenizer, "vision_end_token", None) or ""
        return f"{start}{image_token}{end}{prompt}"

    def _encode(self, images: Sequence[Image.Image], texts: list[str]) -> dict:
        return dict(self.processor(text=texts, images=[im.convert("RGB") for im in images],
                                   return_tensors="pt", padding=True))

    def batch(self, images: Sequence[Image.Image], prompts: Sequence[str], answers: Sequence[str]) -> dict:
        chat = bool(getattr(self.processor, "chat_template", None))
        contexts = [self._text(p) for p in prompts]
        # In a chat turn the answer starts the assistant message: no separating space.
        full = [c + (a.lstrip() if chat else a) for c, a in zip(contexts, answers, strict=True)]
        enc = self._encode(images, full)
        ctx_len = self._encode(images, contexts)["attention_mask"].sum(1)
        mask = enc["attention_mask"]
        labels = torch.full_like(enc["input_ids"], -100)
        for i in range(len(full)):
            real = mask[i].nonzero().squeeze(1)
            n_answer = int(real.numel() - ctx_len[i])
            if n_answer <= 0:
                raise ValueError(f"answer {answers[i]!r} adds no tokens to its prompt")
            pos = real[-n_answer:]
            labels[i, pos] = enc["input_ids"][i, pos]
        enc["labels"] = labels
        return enc

    def choice_batch(
        self, images: Sequence[Image.Image], prompts: Sequence[str], choices: Sequence[str]
    ) -> dict:
        # Images are repeated per choice: native VLMs interleave image tokens with text.
        k = len(choices)
        return self.batch([im for im in images for _ in range(k)], [p for p in prompts for _ in range(k)],
                          [c for _ in prompts for c in choices])


def load_hub_vlm(model_id: str, device: torch.device | str = "cpu") -> Any:
    """``AutoModelForImageTextToText`` + ``AutoProcessor`` from the hub (network or local HF cache)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from benchmarks.vlm.factory import VLMBuild

    try:
        processor = AutoProcessor.from_pretrained(model_id)
        model = AutoModelForImageTextToText.from_pretrained(model_id, dtype=torch.float32)
    except OSError as err:
        raise RuntimeError(f"hub VLM {model_id!r} could not be loaded (needs internet or a local HF cache): "
                           f"{str(err).splitlines()[0]}") from None
    for p in model.parameters():
        p.requires_grad_(False)
    model.to(device).eval()
    return VLMBuild(model, HubIO(processor), f"hub:{model_id}", None, {"hub_id": model_id})
