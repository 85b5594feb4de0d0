"""Log-likelihood of several continuations after one shared prefix: the prefix runs once.

Used by every choice scorer (the language tasks' ``tasks.common.loglikelihoods`` and the composed VLM's
``score_choices``). The prefix (a context, or image + prompt) goes through the causal LM once with a KV
cache; the cache rows are repeated over the prefix's continuations, and one more forward over the
continuation tokens gives the rest. The numbers are those of scoring ``prefix + continuation`` row by
row (same tokens, same positions, same causal mask), up to floating-point summation order.

torch only (no project imports), so both the model layer and the task layer can use it.
"""

from __future__ import annotations

import copy
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
    lm: nn.Module, prefix: dict[str, torch.Tensor], continuations: Sequence[Sequence[Sequence[int]]],
    max_rows: int | None = None,
) -> torch.Tensor:
    """Summed log-probability of each continuation after its prefix row, flat in row-major order.

    ``prefix``: ``input_ids`` or ``inputs_embeds`` of ``B`` rows and their ``attention_mask`` (``(B, n)``,
    left-padded: every row ends with a real token; position ids are derived from the mask).
    ``continuations[i]``: the token-id lists scored after row ``i`` (each non-empty). Returns a float32
    tensor of ``sum(len(c) for c in continuations)`` values: row 0's continuations first, in order.
    ``max_rows``: at most this many continuation rows per forward (default: all in one), so memory does not
    grow with the number of choices (full-vocabulary logits at every continuation position); the language
    tasks pass their evaluation batch size, the composed VLM's short one-image prefixes need no cap.
    """
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
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
    cache, start, step = out.past_key_values, mask.sum(-1), max_rows or len(flat)
    sums = []
    for lo in range(0, len(flat), step):
        chunk = slice(lo, min(lo + step, len(flat)))
        # The forward appends the continuation to the cache it is given: each chunk but the last gets a copy.
        chunk_cache = cache if chunk.stop == len(flat) else copy.deepcopy(cache)
        chunk_cache.batch_select_indices(rows[chunk])  # each prefix row repeated once per continuation
        logits = forward_keep(
            lm, None, input_ids=inputs[chunk], attention_mask=torch.cat([mask[rows[chunk]], cont_mask[chunk]], dim=1),
            past_key_values=chunk_cache, position_ids=start[rows[chunk], None] + torch.arange(width, device=device),
            use_cache=False,
        ).logits
        sums.append(_scored_logp_sums(logits, targets[chunk], cont_mask[chunk]))
    return logp + torch.cat(sums)


def _scored_logp_sums(logits: torch.Tensor, targets: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """Per row, the summed float32 log-softmax of ``logits`` (``(R, W, V)``) at ``targets`` (``(R, W)``) over the
    positions where ``scored`` is 1; only those positions are upcast (no float32 copy of all the logits)."""
    where = scored.bool()
    picked = logits[where].float()  # (scored positions, vocab)
    tail = torch.zeros(targets.shape, dtype=torch.float32, device=logits.device)
    tail[where] = picked.gather(-1, targets[where].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(picked, dim=-1)
    return tail.sum(dim=1)  # zeros at the padding: the same sums as masking a full-width tail
