"""Log-likelihood of several continuations after one shared prefix: the prefix runs once.

Used by every choice scorer (the language tasks' ``tasks.common.loglikelihoods`` and the composed VLM's
``score_choices``). The prefix (a context, or image + prompt) goes through the causal LM once with a KV
cache; the cache rows are repeated over the prefix's continuations, and one more forward over the
continuation tokens gives the rest. The numbers are those of scoring ``prefix + continuation`` row by
row (same tokens, same positions, same causal mask), up to floating-point summation order.

torch only (no project imports), so both the model layer and the task layer can use it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def forward_keep(lm: nn.Module, keep: int | None = None, **kwargs):
    """``lm(**kwargs)`` computing logits for the last ``keep`` positions only where the model supports it
    (``logits_to_keep``); callers slice ``logits[:, -keep:]`` themselves. ``None``: all positions."""
    if keep is not None:
        try:
            return lm(**kwargs, logits_to_keep=keep)
        except TypeError:  # a model without logits_to_keep: slice afterwards (memory only)
            pass
    return lm(**kwargs)


@torch.no_grad()
def score_continuations(
    lm: nn.Module, prefix: dict[str, torch.Tensor], continuations: Sequence[Sequence[Sequence[int]]]
) -> torch.Tensor:
    """Summed log-probability of each continuation after its prefix row, flat in row-major order.

    ``prefix``: ``input_ids`` or ``inputs_embeds`` of ``B`` rows and their ``attention_mask`` (``(B, n)``,
    left-padded: every row ends with a real token; position ids are derived from the mask).
    ``continuations[i]``: the token-id lists scored after row ``i`` (each non-empty). Returns a float32
    tensor of ``sum(len(c) for c in continuations)`` values: row 0's continuations first, in order.
    """
    mask = prefix["attention_mask"]
    if len(continuations) != mask.shape[0]:
        raise ValueError(f"{len(continuations)} continuation lists for {mask.shape[0]} prefix rows")
    flat = [list(c) for conts in continuations for c in conts]
    if not flat or any(not c for c in flat):
        raise ValueError("every prefix needs at least one non-empty continuation")
    if not bool(mask[:, -1].all()):
        raise ValueError("prefix rows must be left-padded (every row ends with a real token)")
    device = mask.device
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = forward_keep(lm, 1, **prefix, position_ids=positions, use_cache=True)
    # The prefix's last position predicts every continuation's first token.
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
    rows = torch.repeat_interleave(
        torch.arange(len(continuations), device=device),
        torch.tensor([len(c) for c in continuations], device=device),
    )
    logp = first[rows, torch.tensor([c[0] for c in flat], device=device)]
    width = max(len(c) for c in flat) - 1
    if width == 0:  # single-token continuations: the prefix forward was all the work
        return logp
    # Continuation tokens but the last are inputs, tokens after the first are targets; right-padded.
    inputs = torch.zeros((len(flat), width), dtype=torch.long)
    targets, cont_mask = torch.zeros_like(inputs), torch.zeros_like(inputs)
    for r, c in enumerate(flat):
        inputs[r, : len(c) - 1] = torch.tensor(c[:-1])
        targets[r, : len(c) - 1] = torch.tensor(c[1:])
        cont_mask[r, : len(c) - 1] = 1
    inputs, targets, cont_mask = inputs.to(device), targets.to(device), cont_mask.to(device)
    cache = out.past_key_values
    cache.batch_select_indices(rows)  # each prefix row repeated once per continuation
    start = mask.sum(-1)[rows, None]
    logits = forward_keep(
        lm, None, input_ids=inputs, attention_mask=torch.cat([mask[rows], cont_mask], dim=1),
        past_key_values=cache, position_ids=start + torch.arange(width, device=device), use_cache=False,
    ).logits
    # log_softmax gathered at the targets without a second (rows, width, vocab) tensor
    logits = logits.float()
    tail = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return logp + (tail * cont_mask).sum(dim=1)
