"""What makes the runner's training step fast on a GPU, one call each for ``train.py``.

* ``prepare_model(model, compile=..., bf16_frozen=...)``: frozen base Linear weights stored in bf16 where
  that is bit-exact for the method (bf16 autocast casts them to bf16 for the matmul anyway; adapters keep
  fp32 master weights; never for ``full`` or DoRA), ``torch.compile`` in place with eager as a flag and as
  the automatic fallback (one-line reason), and the memory-light loss installed. Compile scope "regional"
  (the default) compiles each repeated block (``regional.repeated_blocks``: one graph per block class, reused
  by every layer, sequence length dynamic from the start); "model" compiles the whole model.
* ``light_causal_lm_loss`` / ``linear_cross_entropy``: the causal-LM loss computed in token chunks from the
  last hidden state and the output embedding, never holding fp32 logits for all tokens (liger-kernel's
  fused kernel on CUDA when it is installed, else plain torch).
* ``pad_to_bucket``: pad a batch's sequence dimension to a multiple of ``multiple`` so that a compiled
  model sees a bounded number of shapes.
* ``eager_mode(model)``: run a compiled model eagerly for a while (evaluation: many shapes, no backward).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from tasks.common import GENERATION_CACHES

IGNORE_INDEX = -100
DEFAULT_CHUNK_TOKENS = 2048  # tokens per chunk: 2048 x 49k vocab x 4 B = 400 MB of fp32 logits at most
COMPILED_CHUNKS = 8  # under torch.compile the chunk count is fixed (a count derived from a dynamic size recompiles)


# --------------------------------------------------------------------------------------------------
# what prepare_model did (recorded with the run)


@dataclass
class Prepared:
    """The model to train and what was done to it; ``to_dict()`` goes into the run record."""

    model: nn.Module
    compiled: bool = False
    compile_reason: str = ""  # why the model runs eagerly (flag, CPU, fallback after an error)
    compile_scope: str = ""  # what was compiled: "regional" (each repeated block) | "model" (whole); "" = eager
    compiled_blocks: int = 0  # modules compiled in place (regional: the blocks; model: 1)
    compile_mode: str = ""  # torch.compile's mode when one was asked for (e.g. "reduce-overhead"); "" = its default
    graphs_kept: bool = False  # dynamo kept the graphs of this process's earlier run (same signature, not reset):
    # they serve this run wherever their guards pass; dynamo adds graphs only where they do not (hooks, shapes)
    bf16_frozen_params: int = 0
    bf16_reason: str = ""
    loss: str = "model"  # "model" (the model's own loss) | "chunked" | "liger"
    loss_reason: str = ""
    # How generation tasks decode (tasks.common.greedy_generate): "static" (a static KV cache, whose decoding step
    # transformers compiles with CUDA graphs on a GPU) or "dynamic"; the reason says why dynamic, or why a run
    # that started static fell back (the task's one line, recorded by the runner).
    generation_cache: str = "dynamic"
    generation_cache_reason: str = ""
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self.__dict__.items() if k != "model"}

    def line(self) -> str:
        """One line for the log."""
        kept = ", graphs of an earlier run kept" if self.graphs_kept else ""
        mode = f", mode {self.compile_mode}" if self.compile_mode else ""
        comp = f"compiled ({self.compile_scope}{mode}, {self.compiled_blocks} modules{kept})" if self.compiled \
            else f"eager ({self.compile_reason})"
        bf = f"{self.bf16_frozen_params} frozen weights bf16" if self.bf16_frozen_params else f"fp32 frozen ({self.bf16_reason})"
        loss = self.loss if self.loss != "model" else f"model loss ({self.loss_reason})"
        gen = self.generation_cache + (f" ({self.generation_cache_reason})" if self.generation_cache_reason else "")
        return f"step: {comp}; {bf}; loss: {loss}; generation cache: {gen}"


# --------------------------------------------------------------------------------------------------
# bf16 frozen weights


def _uses_base_weight_outside_matmul(model: nn.Module) -> str | None:
    """A reason when some adapter reads its frozen base weight outside the Linear's matmul (not exact in bf16)."""
    for name, mod in model.named_modules():
        mag = getattr(mod, "lora_magnitude_vector", None)
        if mag is not None and len(mag) > 0:  # DoRA normalises W + BA in fp32 from the base weight
            return f"DoRA layer {name} reads its base weight"
    return None


def cast_frozen_to_bf16(model: nn.Module, *, method: str | None = None, autocast_bf16: bool = True) -> tuple[int, str]:
    """Store frozen ``nn.Linear`` weights (and biases) in bf16; returns (tensors cast, reason if none).

    Exact under bf16 autocast: autocast runs ``F.linear`` in bf16, casting an fp32 weight to bf16 on every
    use, so storing the bf16 copy gives bit-identical outputs and gradients and saves the casts. Not done
    without bf16 autocast (it would change fp32 results), for ``full`` (no frozen weights; master weights
    stay fp32), for a weight shared with a non-Linear module (tied embeddings: the embedding lookup is not
    autocast, so its output dtype would change), or for DoRA (it reads the base weight outside the matmul).
    """
    if method == "full":
        return 0, "full fine-tuning keeps fp32 master weights"
    if not autocast_bf16:
        return 0, "no bf16 autocast (casting would change fp32 results)"
    why = _uses_base_weight_outside_matmul(model)
    if why:
        return 0, why
    owners: dict[int, set[type]] = {}
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(type(mod))
    n = 0
    with torch.no_grad():
        for mod in model.modules():
            if type(mod) is not nn.Linear:  # subclasses (peft wrappers, quantised layers) may do more than F.linear
                continue
            for p in mod.parameters(recurse=False):
                if p.requires_grad or p.dtype != torch.float32 or owners[id(p)] != {nn.Linear}:
                    continue
                p.data = p.data.to(torch.bfloat16)
                n += 1
    return n, "" if n else "no frozen fp32 Linear weights"


# --------------------------------------------------------------------------------------------------
# memory-light cross-entropy over the vocabulary


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    """The dtype the output projection runs in: autocast's when it is on (as for ``lm_head`` itself)."""
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return h.dtype


class _ChunkedLinearCE(torch.autograd.Function):
    """Summed cross-entropy of ``h @ w.T (+ b)`` against ``targets``, chunk by chunk over tokens.

    The gradients are computed in the forward, chunk by chunk (as liger-kernel's fused kernel does), so
    neither pass ever holds more than one chunk's fp32 logits and nothing is recomputed.
    """

    @staticmethod
    def forward(ctx, h, w, b, targets, n_chunks, ignore_index, softcap, cdt):  # noqa: D401
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = b is not None and ctx.needs_input_grad[2]
        with torch.autocast(h.device.type, enabled=False):
            wc = w.to(cdt)
            bc = None if b is None else b.to(cdt)
            loss = h.new_zeros((), dtype=torch.float32)
            gh = torch.empty_like(h) if need_h else None
            gw = torch.zeros_like(w, dtype=torch.float32) if need_w else None
            gb = torch.zeros_like(b, dtype=torch.float32) if need_b else None
            start = 0
            for hc, tc in zip(h.chunk(n_chunks), targets.chunk(n_chunks)):
                n = hc.shape[0]
                hcc = hc.to(cdt)
                logits = (hcc @ wc.t() if bc is None else torch.addmm(bc, hcc, wc.t())).float()
                if softcap is not None:
                    t = torch.tanh(logits / softcap)
                    logits = t * softcap
                valid = tc != ignore_index
                safe = torch.where(valid, tc, torch.zeros_like(tc)).unsqueeze(1)
                lse = torch.logsumexp(logits, dim=-1)
                loss = loss + ((lse - logits.gather(1, safe).squeeze(1)) * valid).sum()
                if need_h or need_w or need_b:
                    # d(sum CE)/d logits = softmax - onehot(target), zero on ignored tokens
                    g = torch.exp(logits.sub_(lse.unsqueeze(1)))
                    g.scatter_add_(1, safe, torch.full_like(safe, -1, dtype=g.dtype))
                    g.mul_(valid.unsqueeze(1).to(g.dtype))
                    if softcap is not None:
                        g.mul_(1 - t * t)
                    gc = g.to(cdt)
                    if need_h:
                        gh[start:start + n] = (gc @ wc).to(h.dtype)
                    if need_w:
                        gw.add_(gc.t() @ hcc)  # fp32 accumulation of the per-chunk products
                    if need_b:
                        gb.add_(g.sum(0))
                start += n
        ctx.save_for_backward(gh, gw, gb)
        ctx.dtypes = (w.dtype, None if b is None else b.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        gh, gw, gb = ctx.saved_tensors
        wdt, bdt = ctx.dtypes
        return (None if gh is None else gh * grad_out.to(gh.dtype),
                None if gw is None else (gw * grad_out).to(wdt),
                None if gb is None else (gb * grad_out).to(bdt),
                None, None, None, None, None)


def _liger_fn() -> Callable | None:
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except Exception:  # noqa: BLE001 - optional accelerator kernel; absent or broken means plain torch
        return None
    return liger_fused_linear_cross_entropy


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         bias: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX,
                         softcap: float | None = None, reduction: str = "mean",
                         chunk_tokens: int = DEFAULT_CHUNK_TOKENS, n_chunks: int | None = None,
                         impl: str = "torch") -> torch.Tensor:
    """``F.cross_entropy(hidden @ weight.T + bias, targets)`` without the full fp32 logits.

    ``hidden`` (N, d), ``weight`` (V, d), ``targets`` (N,). ``reduction``: "mean" over non-ignored tokens
    (NaN when there are none, as ``F.cross_entropy``), or "sum". ``impl="liger"`` uses liger-kernel's fused
    Triton kernel (CUDA only). The logits are computed in autocast's dtype when autocast is on.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    if impl == "liger":
        fn = _liger_fn()
        if fn is None or hidden.device.type != "cuda":
            raise ValueError("impl='liger' needs liger-kernel installed and CUDA tensors")
        cdt = _compute_dtype(hidden)
        return fn(hidden.to(cdt), weight.to(cdt), targets, bias=None if bias is None else bias.to(cdt),
                  ignore_index=ignore_index, reduction=reduction, softcap=softcap)
    if n_chunks is None:
        n_chunks = COMPILED_CHUNKS if torch.compiler.is_compiling() else max(1, math.ceil(hidden.shape[0] / chunk_tokens))
    total = _ChunkedLinearCE.apply(hidden, weight, bias, targets, n_chunks, ignore_index, softcap,
                                   _compute_dtype(hidden))
    if reduction == "sum":
        return total
    return total / (targets != ignore_index).sum()


class _LightLoss:
    """Forward hooks on a Hugging Face causal LM: a training forward with ``labels`` computes the loss with
    ``linear_cross_entropy`` from the decoder's last hidden state instead of full-vocabulary logits.

    The model still runs its own forward (so hooks on it, NA-LoRA's attention-mask capture included, see
    the same call); only ``labels`` are held back and ``logits_to_keep=1`` makes its head compute the last
    position alone. Such a forward returns the loss and last-position logits. Without labels, or without
    gradients (evaluation), nothing changes.
    """

    def __init__(self, lm: nn.Module, head: nn.Linear, softcap: float | None, impl: str) -> None:
        self.head, self.softcap, self.impl = head, softcap, impl
        # Stacked runs (benchmarks.runner.stacked): the batch is ``blocks`` runs' batches; the loss is the sum of
        # each block's own mean, and ``block_losses`` keeps those means (detached) for the runs' records.
        self.blocks = 1
        self.block_losses: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None
        self.num_items: Any = None
        self.hidden: torch.Tensor | None = None
        self.impl_name = "liger" if impl == "liger" else "chunked"
        self.fallback_reason = ""
        self.handles = [
            lm.register_forward_pre_hook(self._pre, with_kwargs=True),
            lm.get_decoder().register_forward_hook(self._on_decoder),
            lm.register_forward_hook(self._post, with_kwargs=True),
        ]

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        labels = kwargs.get("labels")
        if labels is None or not torch.is_grad_enabled():
            return None
        self.labels, self.num_items = labels, kwargs.get("num_items_in_batch")
        return args, {**kwargs, "labels": None, "logits_to_keep": 1}

    def _on_decoder(self, module: nn.Module, args: tuple, out: Any) -> None:
        if self.labels is not None:
            self.hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state

    def _post(self, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
        if self.labels is None:
            return None
        labels, hidden, num_items = self.labels, self.hidden, self.num_items
        self.labels = self.hidden = self.num_items = None
        if hidden is None:
            raise RuntimeError("light loss: the decoder's output was not seen (model layout not supported)")
        # the causal shift of transformers' ForCausalLMLoss: position t predicts label t + 1
        shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].to(hidden.device)
        kw = dict(bias=self.head.bias, softcap=self.softcap, reduction="sum" if num_items is not None else "mean")
        if self.blocks > 1:
            if num_items is not None:
                raise ValueError("light loss: stacked runs take no num_items_in_batch (each block is its own mean)")
            means = torch.stack([self._loss(h, t, kw) for h, t in zip(hidden.chunk(self.blocks),
                                                                       shifted.chunk(self.blocks))])
            self.block_losses = means.detach()
            loss = means.sum()
        else:
            loss = self._loss(hidden, shifted, kw)
        if num_items is not None:
            loss = loss / num_items
        return type(out)(loss=loss, **{k: v for k, v in out.items() if k != "loss"})

    def _loss(self, hidden: torch.Tensor, shifted: torch.Tensor, kw: dict) -> torch.Tensor:
        try:
            return linear_cross_entropy(hidden, self.head.weight, shifted, impl=self.impl, **kw)
        except Exception as err:  # noqa: BLE001 - the optional fused kernel failed on this stack: plain torch
            if self.impl == "torch":
                raise
            self.impl, self.impl_name = "torch", "chunked"
            self.fallback_reason = f"liger-kernel failed ({_describe(err)}); chunked torch loss"
            print(self.fallback_reason, file=sys.stderr)
            return linear_cross_entropy(hidden, self.head.weight, shifted, impl="torch", **kw)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def install_light_loss(model: nn.Module, *, impl: str | None = None) -> tuple[str, str]:
    """Install ``_LightLoss`` on the Hugging Face causal LM inside ``model`` (a peft model or the LM itself).

    Returns (loss kind, reason): ("chunked" | "liger", "") when installed, ("model", why not) otherwise.
    ``impl``: "auto" (liger-kernel on CUDA when importable, else chunked torch), "torch", "liger";
    None: the environment variable ``NALORA_LIGHT_LOSS_IMPL``, else "auto".
    """
    impl = impl or os.environ.get("NALORA_LIGHT_LOSS_IMPL", "auto")
    if impl not in ("auto", "torch", "liger"):
        raise ValueError(f"light loss impl must be auto, torch or liger, got {impl!r} (NALORA_LIGHT_LOSS_IMPL)")
    model = getattr(model, "module", model)  # DistributedDataParallel: the hooks go on the wrapped model
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(lm, "_nalora_light_loss", None) is not None:
        return lm._nalora_light_loss.impl_name, ""
    if not (hasattr(lm, "get_decoder") and hasattr(lm, "get_output_embeddings")):
        return "model", f"{type(lm).__name__} is not a Hugging Face causal LM"
    try:
        params = inspect.signature(lm.forward).parameters
    except (TypeError, ValueError):
        params = {}
    if "logits_to_keep" not in params or "labels" not in params:
        return "model", f"{type(lm).__name__}.forward has no logits_to_keep/labels"
    head = lm.get_output_embeddings()
    if type(head) is not nn.Linear:
        return "model", f"output head is a {type(head).__name__}, not a plain Linear"
    cfg = getattr(lm, "config", None)
    for attr in ("logit_scale", "logits_scaling", "output_multiplier_scale"):
        if getattr(cfg, attr, None) not in (None, 1, 1.0):
            return "model", f"config.{attr} rescales the logits"
    softcap = getattr(cfg, "final_logit_softcapping", None)
    dev = next(lm.parameters()).device
    use_liger = impl == "liger" or (impl == "auto" and dev.type == "cuda" and _liger_fn() is not None)
    if impl == "liger" and (dev.type != "cuda" or _liger_fn() is None):
        return "model", "liger-kernel requested but not importable or not on CUDA"
    hooks = _LightLoss(lm, head, softcap, "liger" if use_liger else "torch")
    lm._nalora_light_loss = hooks
    return hooks.impl_name, ""


# --------------------------------------------------------------------------------------------------
# torch.compile with an eager fallback


def _describe(err: BaseException) -> str:
    """``Type: first line`` of ``err`` and of the error it wraps (dynamo wraps the backend's error)."""
    parts = []
    seen: set[int] = set()
    while err is not None and id(err) not in seen and len(parts) < 3:
        seen.add(id(err))
        lines = str(err).strip().splitlines()
        parts.append(f"{type(err).__name__}: {lines[0][:160] if lines else ''}")
        err = getattr(err, "inner_exception", None) or err.__cause__
    return " <- ".join(parts)


class _FallbackCall:
    """``module._compiled_call_impl`` that drops every module of ``group`` to eager for good on the first
    error of a compiled call (regional scope: one block failing sends all blocks to eager).

    Eager then reruns the same call: a genuine error (bad batch, OOM) raises again from eager. Dynamo
    buffers Python side effects (hook state) until a graph has compiled, so a failed compile leaves none;
    blocks that already ran compiled in this forward produced valid outputs, so the forward goes on.
    """

    def __init__(self, module: nn.Module, fn: Callable, state: Prepared, log: Callable[[str], None],
                 group: list[nn.Module]) -> None:
        self.module, self.fn, self.state, self.log, self.group = module, fn, state, log, group

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.fn(*args, **kwargs)
        except torch.OutOfMemoryError:
            raise
        except Exception as err:  # noqa: BLE001 - any compile failure: the eager model is always correct
            reason = f"fallback after {_describe(err)}"
            for mod in self.group:
                mod._compiled_call_impl = None
            self.state.compiled, self.state.compile_reason = False, reason
            self.log(f"torch.compile failed, training eagerly: {reason}")
            return self.module._call_impl(*args, **kwargs)


COMPILE_SCOPES = ("regional", "model")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


def compile_in_place(model: nn.Module, state: Prepared, *, backend: str | Callable = "inductor",
                     mode: str | None = None, dynamic: bool | None = None, scope: str = "regional",
                     log: Callable[[str], None] = print) -> None:
    """Compile ``model`` in place (module objects, attributes and hooks stay), with the eager fallback.

    ``scope`` "regional": ``module.compile(...)`` of each repeated block (``repeated_blocks``), the whole model
    when it has none (noted); "model": of the whole model. ``dynamic`` None: True for regional (bucketed
    sequence lengths then never recompile), dynamo's automatic dynamic shapes for the whole model.
    """
    import torch._dynamo.config as dcfg

    from benchmarks.runner.regional import drop_training_cache, repeated_blocks

    if scope not in COMPILE_SCOPES:
        raise ValueError(f"compile scope must be one of {', '.join(COMPILE_SCOPES)}, got {scope!r}")
    # Guard on module hooks: a hook added or removed after compiling must not leave a stale graph (the default
    # skips these guards). NA-LoRA's statistics hooks, which its eager step adds on refresh steps only, stay
    # installed under compile (compile_ready: their graph reads no step state), so the graphs are LoRA's.
    dcfg.skip_nnmodule_hook_guards = False
    from nalora.controller import compile_ready

    compile_ready(model)
    blocks = [mod for _, mod in repeated_blocks(model)] if scope == "regional" else []
    if scope == "regional" and not blocks:
        state.notes.append("regional compile: no repeated blocks (nn.ModuleList children); whole model compiled")
        scope = "model"
    state.graphs_kept = _keep_graphs(_signature(blocks, backend, mode, dynamic) if blocks else None)
    if blocks:  # else each layer, reading its own entry of an unused KV cache, would compile its own graph
        drop_training_cache(model)
    group = blocks or [model]
    for mod in group:
        mod.compile(backend=backend, mode=mode, dynamic=(scope == "regional") if dynamic is None else dynamic)
        mod._compiled_call_impl = _FallbackCall(mod, mod._compiled_call_impl, state, log, group)
    state.compiled, state.compile_reason = True, ""
    state.compile_scope, state.compiled_blocks, state.compile_mode = scope, len(group), mode or ""


# A pool's worker trains run after run in one process. Dynamo's graphs are keyed by code and checked by guards
# (shapes, dtypes, hooks, module structure; parameters are graph inputs), so the next run of the same model and
# method on a fresh model object passes them and recompiles nothing: the compile cost is paid once per worker and
# signature, not per run. A different signature resets dynamo, else each run would add cache entries until the
# recompile limit silently sent later runs to eager; so does a cache grown near that limit.
_KEPT: dict[str, Any] = {"signature": None, "graphs": 0}
RECOMPILE_LIMIT = 32  # per code object; one signature builds a handful (NA-LoRA's hooks, the first layer, lengths)


def _signature(blocks: list[nn.Module], backend: Any, mode: str | None, dynamic: bool | None) -> tuple:
    """What decides the graphs of ``blocks``: per block class, one block's submodule types and its parameters'
    names, shapes, dtypes and trainability, with the compile settings. A model and method give one signature
    whatever the task, lr or seed."""
    seen: dict[type, nn.Module] = {}
    for b in blocks:
        seen.setdefault(type(b), b)
    per_class = tuple(
        (cls.__module__, cls.__qualname__, tuple(type(m).__qualname__ for m in b.modules()),
         tuple((n, tuple(p.shape), str(p.dtype), p.requires_grad) for n, p in b.named_parameters()))
        for cls, b in seen.items())
    return per_class, backend if isinstance(backend, str) else id(backend), mode, dynamic


def dynamo_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (its global counter; differences count a stretch)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _keep_graphs(signature: tuple | None) -> bool:
    """Keep the process's compiled graphs for a run of ``signature`` (True), or reset dynamo (False)."""
    import torch._dynamo.config as dcfg

    dcfg.recompile_limit = max(dcfg.recompile_limit, RECOMPILE_LIMIT)
    if signature is not None and signature == _KEPT["signature"] and dynamo_graphs() - _KEPT["graphs"] <= RECOMPILE_LIMIT // 2:
        return True
    torch._dynamo.reset()
    _KEPT.update(signature=signature, graphs=dynamo_graphs())
    return False


def forget_compiled() -> None:
    """Drop the graphs kept between runs (tests that count graphs start from none)."""
    torch._dynamo.reset()
    _KEPT.update(signature=None, graphs=0)


@contextlib.contextmanager
def eager_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run a model compiled in place (whole or by blocks) eagerly inside the block (evaluation: many shapes,
    no backward)."""
    saved = [(mod, mod._compiled_call_impl) for mod in model.modules()
             if getattr(mod, "_compiled_call_impl", None) is not None]
    for mod, _ in saved:
        mod._compiled_call_impl = None
    try:
        yield model
    finally:
        for mod, impl in saved:
            mod._compiled_call_impl = impl


# --------------------------------------------------------------------------------------------------
# sequence-length buckets


def bucket_length(n: int, multiple: int = 64) -> int:
    """``n`` rounded up to a multiple of ``multiple``."""
    if multiple <= 0:
        raise ValueError(f"bucket multiple must be > 0, got {multiple}")
    return -(-n // multiple) * multiple


_PAD_VALUES = {"labels": IGNORE_INDEX, "attention_mask": 0}


def pad_to_bucket(batch: Any, multiple: int = 64, pad_id: int = 0) -> Any:
    """Right-pad every 2-D tensor of a dict batch whose second dim is the sequence length of
    ``input_ids`` to ``bucket_length(len, multiple)``: labels with -100, attention_mask with 0,
    input_ids with ``pad_id``, anything else with 0. Other batches are returned unchanged.

    The padding is masked out and ignored by the loss, so the loss is unchanged; a compiled model sees
    at most max_len / multiple distinct shapes.
    """
    if not isinstance(batch, dict) or not torch.is_tensor(batch.get("input_ids")) or batch["input_ids"].dim() != 2:
        return batch
    length = batch["input_ids"].shape[1]
    extra = bucket_length(length, multiple) - length
    if extra == 0:
        return batch
    out = dict(batch)
    for key, v in batch.items():
        if torch.is_tensor(v) and v.dim() == 2 and v.shape[1] == length:
            value = pad_id if key == "input_ids" else _PAD_VALUES.get(key, 0)
            out[key] = F.pad(v, (0, extra), value=value)
    return out


# --------------------------------------------------------------------------------------------------
# one call for train.py


def auto_compile_reason(device: torch.device) -> str:
    """Why ``compile: auto`` trains eagerly on ``device``; "" (compile) on CUDA."""
    if device.type != "cuda":
        return f"auto: {device.type} (compile on CUDA only)"
    # Measured on an H200 (results/perf/h200/throughput.md, rows eager-v3 and improved-v3: the same 40 whole runs,
    # same commit, ten workers): compiled 1.30x the eager path's runs per GPU-hour, as a worker's graphs now serve
    # its later runs; each worker's first run pays the compile (its median train time about 3.5x a later run's), so
    # an invocation of a single short run is faster with compile: false.
    return ""


def _generation_cache(choice: str, state: Prepared, device: torch.device) -> tuple[str, str]:
    """``(cache, why dynamic)`` of a run's generation (``prepare_model``'s ``generation_cache``)."""
    if choice not in GENERATION_CACHES + ("auto",):
        raise ValueError(f"generation cache must be one of {', '.join(GENERATION_CACHES)} or auto, got {choice!r}")
    if choice != "auto":
        return choice, "off (flag)" if choice == "dynamic" else ""
    # Compiled on CUDA, a decoding step is one CUDA-graph launch instead of one per operator (thousands: the
    # eager decoding is host-bound like the eager step; docs/gpu_visits.md, gsm8k); transformers compiles it only
    # there, and an eager run stays the eager reference throughout.
    if device.type != "cuda":
        return "dynamic", f"auto: {device.type} (static on CUDA only)"
    if not state.compiled:
        return "dynamic", "auto: the step runs eagerly"
    # The static cache runs under bf16 autocast since tasks.common.static_cache (transformers' own failed there on an
    # H200 on 2026-12-04). On an H100 (2026-12-07, results/perf/h100/eval_gsm8k_caches.json: SmolLM2 + a fresh
    # NA-LoRA, 256 gsm8k validation problems at batch 256) it decoded 3.6x faster per example, but 16% of the final
    # numbers differed from the dynamic cache's: not the same evaluation, so auto stays dynamic (the flag still
    # asks) until the difference is explained or the cache becomes part of a task's evaluation settings and run id.
    return "dynamic", "auto: static decoding changes predictions (84% the same as dynamic, gsm8k, H100)"


def _default_bf16() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def prepare_model(model: nn.Module, *, compile: bool | str = "auto", bf16_frozen: bool | str = "auto",
                  method: str | None = None, mixed_precision: str | None = None, light_loss: bool | str = "auto",
                  backend: str | Callable = "inductor", mode: str | None = None, dynamic: bool | None = None,
                  compile_scope: str = "regional", generation_cache: str = "auto",
                  log: Callable[[str], None] | None = None) -> Prepared:
    """Make ``model`` (already on its device, after ``inject`` and ``accelerator.prepare``) fast to train.

    ``compile``: True, False, or "auto" (compile on CUDA, see ``auto_compile_reason``); ``compile_scope``:
    "regional" or "model" (``compile_in_place``).
    ``bf16_frozen``: True / "auto" (cast when exact, see ``cast_frozen_to_bf16``) or False. ``mixed_precision``: the run's setting
    ("bf16" | "fp16" | "no"; None: bf16 where the GPU has it). ``light_loss``: install the chunked
    vocabulary loss (True / "auto") or not. ``generation_cache``: "static", "dynamic" or "auto" (dynamic for now:
    see ``_generation_cache``). Returns ``Prepared`` (``.model`` is ``model``: compiled in place).
    """
    log = log or (lambda s: None)
    if compile not in (True, False, "auto") or bf16_frozen not in (True, False, "auto") \
            or light_loss not in (True, False, "auto"):
        raise ValueError(f"compile/bf16_frozen/light_loss must be true, false or 'auto', got "
                         f"{compile!r}/{bf16_frozen!r}/{light_loss!r}")
    if compile_scope not in COMPILE_SCOPES:
        raise ValueError(f"compile scope must be one of {', '.join(COMPILE_SCOPES)}, got {compile_scope!r}")
    state = Prepared(model=model)
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    autocast_bf16 = (mixed_precision == "bf16") if mixed_precision is not None else _default_bf16()
    if bf16_frozen is False:
        state.bf16_reason = "off (flag)"
    else:
        state.bf16_frozen_params, state.bf16_reason = cast_frozen_to_bf16(model, method=method, autocast_bf16=autocast_bf16)
    if light_loss is False:
        state.loss, state.loss_reason = "model", "off (flag)"
    else:
        state.loss, state.loss_reason = install_light_loss(model)
    if compile is False:
        state.compile_reason = "off (flag)"
    elif compile == "auto" and (reason := auto_compile_reason(device)):
        state.compile_reason = reason
    else:
        compile_in_place(model, state, backend=backend, mode=mode, dynamic=dynamic, scope=compile_scope, log=log)
    state.generation_cache, state.generation_cache_reason = _generation_cache(generation_cache, state, device)
    log(state.line())
    return state


_FLAG_VALUES = {"1": True, "true": True, "on": True, "0": False, "false": False, "off": False, "auto": "auto"}


def step_options(training: dict | None = None, environ: dict | None = None) -> dict[str, Any]:
    """``prepare_model`` keyword arguments for a run: the run's ``training`` keys ``compile``,
    ``bf16_frozen`` and ``light_loss`` (true / false / "auto"; default "auto"), overridden by the
    environment variables ``NALORA_COMPILE``, ``NALORA_BF16_FROZEN``, ``NALORA_LIGHT_LOSS``
    (1/0/auto; the environment reaches spawned and local-Ray workers), or all three off with
    ``NALORA_EAGER=1`` (today's eager step, for side-by-side throughput). ``compile_scope`` comes from
    ``NALORA_COMPILE_SCOPE`` alone (regional / model; default regional), ``backend`` from
    ``NALORA_COMPILE_BACKEND`` (default inductor), ``mode`` from ``NALORA_COMPILE_MODE`` (torch.compile's
    mode; default none) and ``generation_cache`` from ``NALORA_GENERATION_CACHE`` (static / dynamic / auto;
    default auto): they are no training keys, so that run ids do not change with
    them (the record's ``perf.step`` says which ran). Bad values: one-line ValueError.
    """
    env = os.environ if environ is None else environ
    training = training or {}
    out: dict[str, Any] = {}
    for key in ("compile", "bf16_frozen", "light_loss"):
        value = training.get(key, "auto")
        var = f"NALORA_{key.upper()}"
        if env.get("NALORA_EAGER", "").strip() == "1":
            value = False
        elif env.get(var):
            text = env[var].strip().lower()
            if text not in _FLAG_VALUES:
                raise ValueError(f"{var}={env[var]!r}: expected 1, 0 or auto")
            value = _FLAG_VALUES[text]
        if value not in (True, False, "auto"):
            raise ValueError(f"training.{key} must be true, false or auto, got {value!r}")
        out[key] = value
    scope = env.get("NALORA_COMPILE_SCOPE", "").strip().lower() or "regional"
    if scope not in COMPILE_SCOPES:
        raise ValueError(f"NALORA_COMPILE_SCOPE={env['NALORA_COMPILE_SCOPE']!r}: expected {' or '.join(COMPILE_SCOPES)}")
    out["compile_scope"] = scope
    # Dynamo's backend: inductor, or e.g. aot_eager to debug a compile problem (and to test whole compiled runs
    # on a CPU without a C++ toolchain); like the scope, no training key.
    out["backend"] = env.get("NALORA_COMPILE_BACKEND", "").strip() or "inductor"
    # torch.compile's mode, e.g. max-autotune-no-cudagraphs; CUDA graphs (reduce-overhead, max-autotune) only with
    # the whole model compiled: by blocks they segfaulted (the log's last word: a backward still pending).
    mode = env.get("NALORA_COMPILE_MODE", "").strip() or None
    if mode is not None and mode not in COMPILE_MODES:
        raise ValueError(f"NALORA_COMPILE_MODE={mode!r}: expected one of {', '.join(COMPILE_MODES)}")
    if mode is not None and out["backend"] != "inductor":  # torch.compile takes one or the other
        raise ValueError(f"NALORA_COMPILE_MODE={mode!r} needs the inductor backend, not {out['backend']!r}")
    if mode in CUDAGRAPH_MODES and scope == "regional":
        raise ValueError(f"NALORA_COMPILE_MODE={mode!r} uses CUDA graphs, which crashed the process with the regional "
                         f"scope on an H200 (reduce-overhead: results/perf/h200/steptime_compiled_cg_segfault.log); "
                         f"use NALORA_COMPILE_SCOPE=model or another mode")
    out["mode"] = mode
    # How generation tasks decode: no training key either (a run's id stays its own); NALORA_EAGER=1 decodes
    # with the dynamic cache like the eager step of before.
    cache = env.get("NALORA_GENERATION_CACHE", "").strip().lower() or "auto"
    if env.get("NALORA_EAGER", "").strip() == "1":
        cache = "dynamic"
    if cache not in GENERATION_CACHES + ("auto",):
        raise ValueError(f"NALORA_GENERATION_CACHE={env['NALORA_GENERATION_CACHE']!r}: expected "
                         f"{', '.join(GENERATION_CACHES)} or auto")
    out["generation_cache"] = cache
    return out
