"""A LLaVA-style composed VLM: vision tower -> connector -> image tokens prepended to a causal LM.

Submodule names are part of the contract: ``vision_tower`` (image encoder), ``connector``
(the projector every method trains), ``language_model`` (the causal LM). The injector
classifies towers by these names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from benchmarks.shared_prefix import score_continuations
from benchmarks.vlm.encoders import hidden_size, patch_tokens, pool_grid


class Connector(nn.Module):
    """Pool the patch grid to ``grid x grid`` tokens, then a 2-layer MLP into the LM width.

    The layers are named ``proj_in`` / ``proj_out`` (not ``fc1`` / ``fc2``) so MLP discovery does not
    mistake the connector for a tower MLP: it is trained in full by every method, never adapted.
    """

    def __init__(self, d_vision: int, d_lm: int, grid: int = 2, d_hidden: int | None = None):
        super().__init__()
        self.grid = grid
        d_hidden = d_hidden or d_lm
        self.proj_in = nn.Linear(d_vision, d_hidden)
        self.act = nn.GELU()
        self.proj_out = nn.Linear(d_hidden, d_lm)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.project(pool_grid(patches, self.grid))

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """The MLP alone, on already pooled tokens (the alignment loop caches those)."""
        return self.proj_out(self.act(self.proj_in(pooled)))


def _next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions (``labels`` -100: none)."""
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


@dataclass
class VLMOutput:
    """``logits`` cover the text positions only (image positions predict nothing)."""

    loss: torch.Tensor | None
    logits: torch.Tensor


class ComposedVLM(nn.Module):
    """Vision tower + connector + causal LM; ``forward`` takes ``pixel_values`` and a text batch."""

    def __init__(self, vision_tower: nn.Module, language_model: nn.Module, grid: int = 2,
                 connector_hidden: int | None = None):
        super().__init__()
        self.vision_tower = vision_tower
        d_lm = language_model.get_input_embeddings().embedding_dim
        self.connector = Connector(hidden_size(vision_tower), d_lm, grid=grid, d_hidden=connector_hidden)
        self.language_model = language_model
        # peft's PeftModel reads model.config; expose the LM's so adapter saving works.
        self.config = language_model.config
        # run --stack: a forward over k runs' batches (row blocks) takes the sum of each block's own mean loss
        # (benchmarks/runner/stacked.py), and keeps the block means (detached) for the runs' logs
        self.loss_blocks = 1
        self.block_losses: torch.Tensor | None = None

    @property
    def num_image_tokens(self) -> int:
        return self.connector.grid**2

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Image tokens in the LM's embedding space, ``(B, num_image_tokens, d_lm)``."""
        return self.connector(patch_tokens(self.vision_tower, pixel_values))

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
        **_: object,
    ) -> VLMOutput:
        """Run the VLM. ``labels`` are aligned with ``input_ids`` (-100 = no loss).

        ``image_index[i]`` names the image of sequence ``i`` so several sequences (answer
        choices) share one image without encoding it again; default: one image per sequence.
        """
        image_embeds = self.encode_images(pixel_values)
        if image_index is not None:
            image_embeds = image_embeds[image_index]
        return self.forward_embeds(image_embeds, input_ids, attention_mask, labels)

    def forward_embeds(
        self,
        image_embeds: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> VLMOutput:
        """The LM part: ``image_embeds`` (already projected) prepended to the text embeddings."""
        if image_embeds.shape[0] != input_ids.shape[0]:
            raise ValueError(f"{image_embeds.shape[0]} images for {input_ids.shape[0]} sequences; pass image_index")
        text_embeds = self.language_model.get_input_embeddings()(input_ids)
        embeds = torch.cat([image_embeds.to(text_embeds.dtype), text_embeds], dim=1)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        n_img = image_embeds.shape[1]
        mask = torch.cat([attention_mask.new_ones(input_ids.shape[0], n_img), attention_mask], dim=1)
        out = self.language_model(inputs_embeds=embeds, attention_mask=mask)
        logits = out.logits[:, n_img:]
        loss = None
        if labels is not None and self.loss_blocks > 1:
            means = torch.stack([_next_token_loss(lg, lb) for lg, lb in zip(logits.chunk(self.loss_blocks),
                                                                              labels.chunk(self.loss_blocks))])
            self.block_losses = means.detach()
            loss = means.sum()
        elif labels is not None:
            loss = _next_token_loss(logits, labels)
        return VLMOutput(loss=loss, logits=logits)

    @torch.no_grad()
    def score_choices(self, pixel_values: torch.Tensor, prompt_ids: list[int],
                      choice_ids: list[list[int]]) -> torch.Tensor:
        """Summed log-probability of every choice after (image, prompt): ``(B, K)``.

        Same numbers as scoring ``model(**choice_batch)`` row by row, but the image + prompt prefix
        runs once per image and its KV cache is shared by the K choices (evaluation cost / ~3 here).
        """
        lm = self.language_model
        b, k = pixel_values.shape[0], len(choice_ids)
        image_embeds = self.encode_images(pixel_values)
        prompt = torch.tensor(prompt_ids, device=pixel_values.device).expand(b, -1)
        text_embeds = lm.get_input_embeddings()(prompt)
        prefix = torch.cat([image_embeds.to(text_embeds.dtype), text_embeds], dim=1)
        mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
        logp = score_continuations(lm, {"inputs_embeds": prefix, "attention_mask": mask}, [choice_ids] * b)
        return logp.view(b, k)
