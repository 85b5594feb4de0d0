"""Turning (image, prompt, answer) triples into model batches, and the log-likelihood of answer tokens.

Choice metrics (``acc`` / ``acc_norm``) are not computed here: every choice task, language or vision,
scores through ``tasks.scoring``.

Two implementations of one small interface, so the vision QA tasks run unchanged on the composed
VLM and on native hub VLMs (``benchmarks.vlm.hub``):

- ``batch(images, prompts, answers) -> dict``: tensors for ``model(**batch)``; ``labels`` mark the
  answer tokens only (-100 elsewhere), aligned with the returned ``logits``.
- ``choice_batch(images, prompts, choices) -> dict``: every image paired with every choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from PIL import Image

from benchmarks.vlm.encoders import ImageTransform


class VLMIO(Protocol):
    num_image_tokens: int

    def batch(self, images: Sequence[Image.Image], prompts: Sequence[str], answers: Sequence[str]) -> dict: ...

    def choice_batch(
        self, images: Sequence[Image.Image], prompts: Sequence[str], choices: Sequence[str]
    ) -> dict: ...


def _encode(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=special))


def pad_id(tokenizer: Any) -> int:
    """The pad id, falling back to EOS (causal LMs often have no pad token)."""
    pid = getattr(tokenizer, "pad_token_id", None)
    if pid is None:
        pid = getattr(tokenizer, "eos_token_id", None)
    return int(pid if pid is not None else 0)


def text_batch(tokenizer: Any, prompts: Sequence[str], answers: Sequence[str]) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` / ``attention_mask`` / answer-only ``labels`` for prompt+answer."""
    rows, labels = [], []
    for prompt, answer in zip(prompts, answers, strict=True):
        p = _encode(tokenizer, prompt, True)
        a = _encode(tokenizer, answer, False)
        if not a:
            raise ValueError(f"answer {answer!r} tokenizes to nothing")
        rows.append(p + a)
        labels.append([-100] * len(p) + a)
    width = max(len(r) for r in rows)
    pid = pad_id(tokenizer)
    ids = torch.full((len(rows), width), pid, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (r, lb) in enumerate(zip(rows, labels)):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        lab[i, : len(lb)] = torch.tensor(lb)
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


class ComposedIO:
    """Batches for ``ComposedVLM``: image tokens are added inside the model, not in ``input_ids``."""

    def __init__(self, tokenizer: Any, transform: ImageTransform, num_image_tokens: int):
        self.tokenizer = tokenizer
        self.transform = transform
        self.num_image_tokens = num_image_tokens

    def batch(self, images: Sequence[Image.Image], prompts: Sequence[str], answers: Sequence[str]) -> dict:
        out = text_batch(self.tokenizer, prompts, answers)
        out["pixel_values"] = self.transform.stack(images)
        return out

    def choice_batch(
        self, images: Sequence[Image.Image], prompts: Sequence[str], choices: Sequence[str]
    ) -> dict:
        k = len(choices)
        out = text_batch(
            self.tokenizer, [p for p in prompts for _ in range(k)], [c for _ in prompts for c in choices]
        )
        out["pixel_values"] = self.transform.stack(images)
        # Each image is encoded once and shared by its k choice sequences.
        out["image_index"] = torch.arange(len(images)).repeat_interleave(k)
        return out


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of log-probabilities of the labelled tokens of each sequence (labels aligned with logits)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    target = labels[:, 1:]
    keep = target != -100
    picked = logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (picked * keep).sum(dim=1)
