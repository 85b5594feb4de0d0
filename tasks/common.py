"""Shared helpers of the language tasks: model loading, SFT collation, log-likelihood scoring, generation.

The scoring follows lm-evaluation-harness (``HFLM._encode_pair`` / ``loglikelihood`` and
``ConfigurableTask.process_results``) so that a zero-shot number here means what it means there:

* context and continuation are tokenised together and split after the context's tokens (trailing spaces
  of the context move to the continuation);
* the score of a choice is the summed log-probability of its continuation tokens;
* ``acc`` / ``acc_norm`` come from ``tasks.scoring`` (shared with the vision tasks; re-exported here as
  ``choice_metrics`` for existing callers).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Sequence

import torch
from torch import nn

from benchmarks.shared_prefix import forward_keep, score_continuations
from tasks.scoring import choice_metrics  # noqa: F401 - public re-export (one scoring module)

IGNORE_INDEX = -100

# --------------------------------------------------------------------------------------------------
# models


def tiny_tokenizer():
    """A byte-level tokenizer (256 bytes + ``<|endoftext|>``) built in memory: no files, no network."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def tiny_llama(seed: int = 0, layers: int = 2):
    """A random-weight Llama (SwiGLU; 2 layers unless ``layers``) with ``tiny_tokenizer()``: for tests and dry runs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, hidden_act="silu",
        tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    gen = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    torch.random.set_rng_state(gen)  # building a test model must not move the caller's RNG
    return model.eval(), tokenizer


# Model names that never touch the asset cache: ``setup("tiny-llama")`` works anywhere.
TINY_MODELS: dict[str, Callable[[], tuple[nn.Module, object]]] = {"tiny-llama": tiny_llama}


def load_causal_lm(name: str) -> tuple[nn.Module, object]:
    """``(model, tokenizer)`` for ``name``: a tiny test model or ``benchmarks.assets.load_model(name)``."""
    if name in TINY_MODELS:
        return TINY_MODELS[name]()
    from benchmarks.assets import load_model

    bundle = load_model(name)
    if getattr(bundle, "kind", "causal_lm") != "causal_lm" or bundle.tokenizer is None:
        raise ValueError(f"model {name!r} is a {bundle.kind}, language tasks need a causal LM with a tokenizer")
    return bundle.model, bundle.tokenizer


def wants_bos(model: nn.Module) -> bool:
    """Whether contexts start with BOS. lm-eval adds it only for Gemma, whose outputs degrade without it."""
    model_type = str(getattr(getattr(model, "config", None), "model_type", ""))
    return model_type.startswith("gemma")


def model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


# --------------------------------------------------------------------------------------------------
# tokenisation


def encode_pair(tokenizer, context: str, continuation: str, add_bos: bool = False) -> tuple[list[int], list[int]]:
    """Token ids of ``context`` and ``continuation``, split as lm-eval's ``_encode_pair`` does."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx):]
    if add_bos and tokenizer.bos_token_id is not None:
        ctx = [tokenizer.bos_token_id] + ctx
    if not cont:
        raise ValueError(f"empty continuation after tokenisation: {continuation!r}")
    return ctx, cont


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    return 0


def sft_collate(
    tokenizer, pairs: Sequence[tuple[str, str]], max_length: int = 512, add_bos: bool = False,
    append_eos: bool = False,
) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` / ``attention_mask`` / ``labels`` for prompt + answer pairs.

    ``labels`` are the input ids on answer tokens (and the optional EOS) and ``-100`` on prompt and
    padding, so the causal-LM loss trains the answer only. Over-long examples lose prompt tokens from
    the left; the answer is kept whole.
    """
    rows = []
    for prompt, answer in pairs:
        ctx, cont = encode_pair(tokenizer, prompt, answer, add_bos)
        if append_eos and tokenizer.eos_token_id is not None:
            cont = cont + [tokenizer.eos_token_id]
        ids = (ctx + cont)[-max_length:]
        n_ans = min(len(cont), len(ids))
        rows.append((ids, n_ans))
    width = max(len(ids) for ids, _ in rows)
    pad = _pad_id(tokenizer)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, n_ans) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        labels[i, len(ids) - n_ans : len(ids)] = torch.tensor(ids[len(ids) - n_ans :])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens of ``batch`` (moved to the model's device)."""
    device = model_device(model)
    out = model(**{k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")})
    return out.loss


# --------------------------------------------------------------------------------------------------
# log-likelihood scoring


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices ``0..len(lengths)-1`` in batches of at most ``batch_size``, longest first (ties keep their
    order): batches of similar length pad less (lm-eval sorts the same way). Callers write each result back
    at its index, so the caller's order is restored."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def _left_padded(seqs: Sequence[Sequence[int]], pad: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of ``seqs`` padded on the left to ``width`` (None: the longest)."""
    width = max(len(s) for s in seqs) if width is None else width
    input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        input_ids[r, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[r, width - len(s) :] = 1
    return input_ids, mask


def _shared_groups(encoded: Sequence[tuple[list[int], list[int]]], max_length: int) -> tuple[list[list[int]], list[int]]:
    """Requests that can share one forward of their context (groups of >= 2 with equal context tokens and no
    truncation: a truncated request loses context tokens from the left, differently per continuation), and
    the rest, scored one sequence each."""
    by_ctx: dict[tuple[int, ...], list[int]] = {}
    single = []
    for i, (ctx, cont) in enumerate(encoded):
        if ctx and len(ctx) + len(cont) - 1 <= max_length:
            by_ctx.setdefault(tuple(ctx), []).append(i)
        else:
            single.append(i)
    groups = [g for g in by_ctx.values() if len(g) > 1]
    single += [g[0] for g in by_ctx.values() if len(g) == 1]
    return groups, sorted(single)


@torch.no_grad()
def loglikelihoods(
    model: nn.Module, tokenizer, requests: Sequence[tuple[str, str]], batch_size: int = 16,
    max_length: int = 1024, add_bos: bool = False, share_context: bool = True,
) -> list[float]:
    """Summed log-probability of each continuation given its context (lm-eval ``loglikelihood``).

    Requests with the same context tokens (the choices of one example) run that context once and share its
    KV cache (``benchmarks.shared_prefix``): a forward runs ``batch_size`` contexts, then their continuations
    in forwards of at most ``batch_size`` rows (the cache repeated once per continuation, over the continuation
    tokens only). The others, and all with ``share_context=False``, run one left-padded sequence each
    (``batch_size`` per forward). Both hold logits of ``batch_size`` rows x the last ``max(len(continuation))``
    positions at most, and upcast only the positions scored: memory stays small with a 256k vocabulary.
    Both give lm-eval's numbers: the model sees ``context + continuation`` as ``_encode_pair`` splits it.
    """
    device = model_device(model)
    pad = _pad_id(tokenizer)
    encoded = [encode_pair(tokenizer, c, x, add_bos) for c, x in requests]
    for _, cont in encoded:
        if len(cont) > max_length:
            raise ValueError(f"continuation of {len(cont)} tokens exceeds max_length={max_length}")
    groups, single = _shared_groups(encoded, max_length) if share_context else ([], list(range(len(encoded))))
    out = [0.0] * len(encoded)
    for batch in length_sorted_batches([len(encoded[g[0]][0]) for g in groups], batch_size):
        input_ids, mask = _left_padded([encoded[groups[b][0]][0] for b in batch], pad)
        logp = score_continuations(
            model, {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)},
            [[encoded[i][1] for i in groups[b]] for b in batch], max_rows=batch_size,
        ).tolist()
        for i, value in zip((i for b in batch for i in groups[b]), logp):
            out[i] = value
    lengths = [len(encoded[i][0]) + len(encoded[i][1]) for i in single]
    for batch in length_sorted_batches(lengths, batch_size):
        idx = [single[b] for b in batch]
        # The model sees context + continuation minus the last token; keep the right end.
        seqs = [(encoded[i][0] + encoded[i][1])[-(max_length + 1) :][:-1] for i in idx]
        conts = [encoded[i][1] for i in idx]
        keep = max(len(c) for c in conts)
        input_ids, mask = _left_padded(seqs, pad)
        kwargs = dict(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                      position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(device))
        logits = forward_keep(model, keep, **kwargs).logits
        logprobs = torch.log_softmax(logits[:, -keep:].float(), dim=-1)
        for r, (i, cont) in enumerate(zip(idx, conts)):
            target = torch.tensor(cont, device=logprobs.device)
            lp = logprobs[r, keep - len(cont) :].gather(-1, target[:, None]).squeeze(-1)
            out[i] = float(lp.sum())
    return out


# --------------------------------------------------------------------------------------------------
# generation


GENERATION_CACHES = ("dynamic", "static", "static-eager")  # static-eager: the static layout, decoding not compiled
STATIC_WIDTH_MULTIPLE = 64  # static-cache prompts are left-padded to a multiple of this many tokens


@torch.no_grad()
def greedy_generate(
    model: nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int = 32, batch_size: int = 16,
    stop: Sequence[str] = ("\n\n",), max_length: int = 1024, add_bos: bool = False, cache: str = "dynamic",
    compile_on_cpu: bool = False,
) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded, length-sorted batches; returned in the prompts' order),
    cut at the first ``stop`` string.

    ``cache="static"``: the static KV cache of ``static_cache``, whose decoding step transformers compiles on a GPU
    (CUDA graphs: one launch per step instead of thousands of operators; ``compile_on_cpu`` compiles it on a CPU
    too, for tests); ``"static-eager"``: the same cache, never compiled (what the compile alone changes). So that
    the step keeps one shape for the whole call, every batch has ``batch_size`` rows (a short batch, even a call's
    only one, is filled with copies of its first prompt, whose outputs are dropped) and every prompt is left-padded
    to the longest prompt rounded up to ``STATIC_WIDTH_MULTIPLE`` tokens.
    """
    if cache not in GENERATION_CACHES:
        raise ValueError(f"generation cache must be one of {', '.join(GENERATION_CACHES)}, got {cache!r}")
    device = model_device(model)
    pad = _pad_id(tokenizer)
    enc = []
    for p in prompts:
        ids = tokenizer(p, add_special_tokens=False)["input_ids"]
        if add_bos and tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id] + ids
        enc.append(ids[-(max_length - max_new_tokens) :])
    extra: dict = {}
    width = None
    if cache != "dynamic" and enc:
        from transformers import CompileConfig

        longest = max(len(e) for e in enc)
        width = min(-(-longest // STATIC_WIDTH_MULTIPLE) * STATIC_WIDTH_MULTIPLE, max_length - max_new_tokens)
        compile_config = CompileConfig()
        compile_config._compile_all_devices = bool(compile_on_cpu) or None
        extra = {"compile_config": compile_config, "disable_compile": cache == "static-eager"}
    texts = [""] * len(enc)
    for batch in length_sorted_batches([len(e) for e in enc], batch_size):
        rows = [enc[i] for i in batch]
        if width is not None:
            rows += [rows[0]] * (batch_size - len(rows))
            extra["past_key_values"] = static_cache(model, width + max_new_tokens)
        input_ids, mask = _left_padded(rows, pad, width)
        gen = model.generate(
            input_ids=input_ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
            stop_strings=list(stop) or None, tokenizer=tokenizer, **extra,
        )
        for i, row in zip(batch, gen[:, input_ids.shape[1] :]):
            text = tokenizer.decode(row, skip_special_tokens=True)
            for s in stop:
                text = text.split(s)[0]
            texts[i] = text
    return texts


def static_cache(model: nn.Module, max_cache_len: int):
    """transformers' ``StaticCache`` for ``model``, its layers keeping keys and values in one dtype: the autocast
    dtype under autocast, else the keys'.

    Under bf16 autocast a Llama's keys leave RoPE in fp32 (cos and sin follow the fp32 hidden states) while its
    values are bf16; transformers' ``StaticLayer`` allocates both in the keys' dtype, and copying the values in then
    fails (``index_copy_(): ... Float and ... BFloat16``, on the H200 on 2026-12-04). Storing both in the autocast
    dtype changes no number by itself: attention under autocast (SDPA, matmul) casts its inputs to that dtype first
    (eager decoding agrees exactly with the dynamic cache: tests/test_llm_tasks.py). The compiled decoding on a GPU
    did change predictions (results/perf/README.md, 2026-12-07).
    """
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
    classes = _one_dtype_layers()
    for i, layer in enumerate(cache.layers):
        if type(layer) not in classes:
            raise TypeError(f"static cache: no one-dtype form of {type(layer).__name__}")
        one = object.__new__(classes[type(layer)])
        one.__dict__.update(vars(layer))  # the same (not yet allocated) state; only two methods differ
        cache.layers[i] = one
    return cache


@functools.cache
def _one_dtype_layers() -> dict[type, type]:
    """transformers' static layer classes -> subclasses that store keys and values in one dtype (``static_cache``)."""
    from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer

    class OneDtype:
        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            dev = key_states.device.type
            dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else key_states.dtype
            super().lazy_initialization(key_states.to(dtype), value_states.to(dtype))

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            return super().update(key_states.to(self.dtype), value_states.to(self.dtype), *args, **kwargs)

    return {base: type(f"OneDtype{base.__name__}", (OneDtype, base), {})
            for base in (StaticLayer, StaticSlidingWindowLayer)}


_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def normalize_number(text: str) -> str | None:
    """Canonical form of a number string: no commas, ``$`` or trailing ``.0``; ``None`` if not a number."""
    s = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(s)
    except ValueError:
        return None
    if math.isfinite(value) and value == int(value):
        return str(int(value))
    return repr(value)


def final_number(text: str) -> str | None:
    """The number a GSM8K-style answer ends with: after ``####`` if present, else the last number."""
    if "####" in text:
        text = text.split("####")[-1]
    found = _NUMBER.findall(text)
    return normalize_number(found[-1]) if found else None


def tiny_model_names() -> list[str]:
    """The random test models the loaders build without any download (``tiny-llama``, tiny VLM parts)."""
    tiny: set[str] = set()
    try:
        tiny |= set(TINY_MODELS)
        from benchmarks.vlm.tiny import TINY_ENCODERS, TINY_LMS

        tiny |= set(TINY_ENCODERS) | set(TINY_LMS)
    except ImportError:  # pragma: no cover - optional vision stack
        pass
    return sorted(tiny)
