"""peft baselines: lora, rslora, loraplus, dora, pissa, vera, ia3, all on the same ``TargetPlan``.

``build_lora`` is the shared builder (NA-LoRA builds on it too). Packed gate/up matrices (Phi-3
``gate_up_proj``, timm ``GluMlp.fc1``, DINOv2 ``weights_in``) get one adapter on the shared matrix; rows
of an untargeted part are held exactly at their identity value by ``RowGuard``s: their initial delta is
folded into the base weight, their gradient is zeroed, and after every optimiser step they are
restored (so neither Adam momentum nor weight decay moves them). The saved artifact stays plain peft.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from nalora.adapted import Adapted
from nalora.methods.registry import Method, positive_number, register_method
from nalora.plan import Target, TargetPlan

ADAPTER = "default"

# Adapter parameters whose dim of size ``out_features`` indexes output rows, and how a held row is held:
# "zero": the row's delta is folded into the base weight, then the row is zero (no contribution);
# "hold": the row keeps its initial value (DoRA magnitude = row norm, IA3 scale = 1 by construction).
_ROW_PARAMS = {"lora_B": "zero", "vera_lambda_b": "zero", "lora_magnitude_vector": "hold", "ia3_l": "hold"}


@dataclass
class RowGuard:
    """Rows of one adapter parameter held fixed (``value`` along ``dim`` at ``index``)."""

    module: str
    param_name: str
    param: nn.Parameter
    dim: int
    index: torch.Tensor  # row indices held
    value: torch.Tensor  # their held values

    def mask(self) -> torch.Tensor:
        m = torch.ones(self.param.shape[self.dim], dtype=self.param.dtype, device=self.param.device)
        m[self.index] = 0
        shape = [1] * self.param.ndim
        shape[self.dim] = -1
        return m.view(shape)

    @torch.no_grad()
    def restore(self) -> None:
        self.param.index_copy_(self.dim, self.index.to(self.param.device), self.value.to(self.param))


def _rows_index(slices: list[slice]) -> torch.Tensor:
    return torch.cat([torch.arange(s.start, s.stop) for s in slices])


def _row_dim(p: torch.Tensor, out_features: int) -> int | None:
    for d in (0, 1):
        if p.ndim > d and p.shape[d] == out_features:
            return d
    return None


def _param(container: Any) -> nn.Parameter | None:
    # nn.ModuleDict (lora_B, DoRA magnitude) has no .get; nn.ParameterDict (vera, ia3) does.
    if not isinstance(container, (nn.ModuleDict, nn.ParameterDict)) or ADAPTER not in container:
        return None
    x = container[ADAPTER]
    if isinstance(x, nn.Parameter):
        return x
    return getattr(x, "weight", None)


def install_row_guards(peft_model: nn.Module, plan: TargetPlan) -> list[RowGuard]:
    """Hold the untargeted rows of packed targets: fold their initial delta, zero or keep, hook grads."""
    guards: list[RowGuard] = []
    base = peft_model.get_base_model()
    for t in plan.items:
        if not t.frozen_rows:
            continue
        layer = base.get_submodule(t.module)
        idx = _rows_index(t.frozen_rows)
        zero_params = [n for n, how in _ROW_PARAMS.items() if how == "zero" and hasattr(layer, n)]
        if zero_params and hasattr(layer, "get_delta_weight"):
            with torch.no_grad():
                # PiSSA (and any non-zero init) starts with a delta on every row: move the held rows'
                # delta into the base weight so the output on those rows is unchanged once they are zero.
                delta = layer.get_delta_weight(ADAPTER)
                w = layer.get_base_layer().weight
                w[idx] += delta[idx].to(w)
        for name, how in _ROW_PARAMS.items():
            if not hasattr(layer, name):
                continue
            p = _param(getattr(layer, name))
            if p is None or not p.requires_grad:
                continue
            if name == "ia3_l" and getattr(layer, "is_feedforward", False):
                continue  # scales inputs, not output rows
            d = _row_dim(p, t.out_features)
            if d is None:
                raise ValueError(
                    f"cannot find the output-row dim of {name} on {t.module} (shape {tuple(p.shape)})"
                )
            with torch.no_grad():
                if how == "zero":
                    p.index_fill_(d, idx.to(p.device), 0.0)
                value = p.index_select(d, idx.to(p.device)).detach().clone()
            g = RowGuard(module=t.module, param_name=name, param=p, dim=d, index=idx, value=value)
            mask = g.mask()
            p.register_hook(lambda grad, m=mask: grad * m.to(grad))
            guards.append(g)
    return guards


def attach_row_guards(adapted: Adapted, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Restore held rows after every step (weight decay would otherwise shrink held non-zero rows).

    Every method's ``make_optimizer`` calls this; a custom optimiser should too.
    """
    guards = adapted.row_guards
    if guards:

        def restore(*_: Any) -> None:
            for g in guards:
                g.restore()

        optimizer.register_step_post_hook(restore)
    return optimizer


def target_regex(names: list[str]) -> str:
    """A regex that peft fullmatches against exactly these module paths."""
    return "(?:" + "|".join(re.escape(n) for n in names) + ")"


def check_trainable(model: nn.Module, trainable: list[str], plan: TargetPlan | None = None) -> list[str]:
    """Validate ``trainable`` module paths: each must exist and be unambiguous under peft's suffix match."""
    modules = dict(model.named_modules())
    out = []
    for t in trainable:
        if t not in modules:
            raise ValueError(f"trainable module {t!r} not found in {type(model).__name__}")
        # peft's modules_to_save matches by suffix: another module with parameters would be trained and
        # saved too (a parameter-free one, e.g. a timm ``head = Identity()``, is wrapped harmlessly).
        clashes = [
            n for n, m in modules.items() if n != t and n.endswith(t) and any(True for _ in m.parameters())
        ]
        if clashes:
            raise ValueError(
                f"trainable module {t!r} is ambiguous (peft would also match {clashes[0]!r}); "
                "give a longer path"
            )
        if plan is not None:
            inside = [i.module for i in plan.items if i.module == t or i.module.startswith(t + ".")]
            if inside:
                raise ValueError(f"trainable module {t!r} contains the adapter target {inside[0]!r}")
        out.append(t)
    return out


def report_rows(plan: TargetPlan, applied: Callable[[Target], str]) -> list[dict[str, Any]]:
    """One row per adapted module: what was touched and how."""
    rows = []
    for t in plan.items:
        row = {
            "name": t.module,
            "tower": t.tower,
            "role": "+".join(t.roles),
            "layout": t.layout,
            "kind": t.kind,
            "applied": applied(t),
        }
        if t.kind == "plain_mlp":
            row["note"] = (
                f"non-gated MLP ({t.owner.activation}): {'+'.join(t.roles)} -> {t.mapped_to}, plain adapter"
            )
        if t.frozen_rows:
            row["frozen_rows"] = [(s.start, s.stop) for s in t.frozen_rows]
        rows.append(row)
    return rows


def build_lora(
    model: nn.Module,
    plan: TargetPlan,
    *,
    rank: int,
    alpha: float,
    dropout: float,
    trainable: list[str],
    lora_kwargs: dict[str, Any],
    method: Method,
    applied: Callable[[Target], str] | None = None,
    config_cls: type | None = None,
) -> Adapted:
    """Wrap ``model`` in a peft model adapting exactly ``plan``'s modules; packed rows guarded.

    ``config_cls`` defaults to ``peft.LoraConfig`` (with ``r``, ``lora_alpha``, ``lora_dropout``); other
    peft configs get ``target_modules`` / ``modules_to_save`` plus ``lora_kwargs`` only.
    ``applied(target)`` names the method recorded per module in the report (default: ``method.name``).
    """
    from peft import LoraConfig, get_peft_model

    trainable = check_trainable(model, list(trainable), plan)
    common = {"target_modules": target_regex(plan.module_names()), "modules_to_save": trainable or None}
    if config_cls is None or config_cls is LoraConfig:
        cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, **common, **lora_kwargs)
    else:
        cfg = config_cls(**common, **lora_kwargs)
    if not getattr(method, "supports_mha", True):
        mha = [t.module for t in plan.items if t.layout == "mha"]
        if mha:
            raise ValueError(
                f"method {method.name!r} cannot adapt nn.MultiheadAttention ({mha[0]}); "
                "drop 'attn' from targets or leave that tower out"
            )
    _fix_bypassed_projections(model, plan)
    try:
        peft_model = get_peft_model(model, cfg)
    except (ValueError, TypeError) as e:  # peft's messages span lines and dump whole modules
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"peft cannot apply method {method.name!r} to this plan: {first}") from e
    guards = install_row_guards(peft_model, plan)
    applied = applied or (lambda t: method.name)
    report = report_rows(plan, applied)
    return Adapted(model=peft_model, method=method, report=report, plan=plan, row_guards=guards,
                   trainable=trainable, notes=list(plan.notes))


def _fix_bypassed_projections(model: nn.Module, plan: TargetPlan) -> None:
    """timm EVA attention with q/v biases calls ``F.linear(x, qkv.weight, bias)``, skipping the ``qkv``
    module (and so any adapter on it). Its own ``qkv_bias_separate`` path calls the module and adds the
    same bias afterwards: identical math, and the adapter is then really applied."""
    for t in plan.items:
        if t.kind != "attn" or not t.module.endswith(".qkv"):
            continue
        parent = model.get_submodule(t.module.rsplit(".", 1)[0])
        if (
            getattr(parent, "q_bias", None) is not None
            and getattr(parent, "qkv_bias_separate", True) is False
        ):
            parent.qkv_bias_separate = True
            plan.notes.append(
                f"{parent.__class__.__name__} at {t.module}: switched to qkv_bias_separate "
                "so the adapter on qkv is applied (same math)"
            )


class _PeftMethod(Method):
    """A peft tuner on the plan: its config class (default ``LoraConfig``), extra config kwargs, optionally a
    custom optimiser. A new peft method is usually ``config_name`` plus ``lora_kwargs``."""

    config_name: ClassVar[str | None] = None  # a peft config class name; None: LoraConfig

    def lora_kwargs(self, options: dict[str, Any], plan: TargetPlan, rank: int, dropout: float) -> dict[str, Any]:
        """Extra config kwargs from the resolved ``options`` (``LoraConfig`` already gets r / alpha / dropout)."""
        return {}

    def build(self, model, plan, *, rank, alpha, dropout, trainable, options):
        options = self.resolve_options(options)
        import peft

        adapted = build_lora(
            model,
            plan,
            rank=rank,
            alpha=alpha,
            dropout=dropout,
            trainable=trainable,
            lora_kwargs=self.lora_kwargs(options, plan, rank, dropout),
            method=self,
            config_cls=getattr(peft, self.config_name) if self.config_name else None,
        )
        adapted.method_config = options
        return adapted

    def make_optimizer(self, adapted, lr, weight_decay=0.0, *, total_steps=None, **kwargs):
        opt = super().make_optimizer(adapted, lr, weight_decay, total_steps=total_steps, **kwargs)
        return attach_row_guards(adapted, opt)


@register_method("lora")
class LoRA(_PeftMethod):
    """Vanilla LoRA (Hu et al. 2021): ``W + (alpha / r) B A``, B = 0 at init."""


@register_method("rslora")
class RSLoRA(_PeftMethod):
    """Rank-stabilised LoRA: scale ``alpha / sqrt(r)``."""

    def lora_kwargs(self, options, plan, rank, dropout):
        return {"use_rslora": True}


@register_method("dora")
class DoRA(_PeftMethod):
    """Weight-decomposed LoRA (magnitude vector + direction)."""

    supports_mha = False  # peft has no such layer for nn.MultiheadAttention

    def lora_kwargs(self, options, plan, rank, dropout):
        return {"use_dora": True}


@register_method("pissa")
class PiSSA(_PeftMethod):
    """PiSSA: A, B from the top singular vectors of W (residual kept frozen). Option ``niter``: fast SVD."""

    supports_mha = False  # peft has no such layer for nn.MultiheadAttention

    defaults: ClassVar[dict[str, Any]] = {"niter": None}  # None: exact SVD

    def check_option(self, key, value):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise ValueError(f"pissa option niter must be a positive int, got {value!r}")
        return value

    def lora_kwargs(self, options, plan, rank, dropout):
        niter = options["niter"]
        return {"init_lora_weights": "pissa" if niter is None else f"pissa_niter_{niter}"}

    def build(self, model, plan, *, rank, alpha, dropout, trainable, options):
        import tempfile

        adapted = super().build(
            model, plan, rank=rank, alpha=alpha, dropout=dropout, trainable=trainable, options=options
        )
        # PiSSA moves the top singular part out of W: an adapter saved as is only works on that residual.
        # peft's documented conversion needs the initial adapter (after our packed-row fold) on disk.
        init_dir = tempfile.TemporaryDirectory(prefix="nalora-pissa-init-")
        cfg = adapted.model.peft_config[ADAPTER]
        mode = cfg.init_lora_weights
        cfg.init_lora_weights = True  # so the initial adapter loads without re-running the SVD
        adapted.model.save_pretrained(init_dir.name)
        cfg.init_lora_weights = mode
        adapted.extras["pissa_init"] = init_dir  # deleted with the Adapted
        return adapted

    def save(self, adapted, path):
        """Save as a plain LoRA of rank 2r on the *original* weights (``Delta W = B A - B0 A0``)."""
        adapted.model.save_pretrained(
            str(path), path_initial_model_for_weight_conversion=adapted.extras["pissa_init"].name
        )


@register_method("loraplus")
class LoRAPlus(_PeftMethod):
    """LoRA+: B learns ``loraplus_lr_ratio`` times faster than A (peft's optimiser builder)."""

    defaults: ClassVar[dict[str, Any]] = {"loraplus_lr_ratio": 16.0}

    def check_option(self, key, value):
        return positive_number(self.name, key, value)

    def make_optimizer(self, adapted, lr, weight_decay=0.0, *, total_steps=None, **kwargs):
        from peft.optimizers import create_loraplus_optimizer

        opt = create_loraplus_optimizer(
            adapted.model,
            torch.optim.AdamW,
            lr=lr,
            loraplus_lr_ratio=adapted.method_config["loraplus_lr_ratio"],
            weight_decay=weight_decay,
            **kwargs,
        )
        return attach_row_guards(adapted, opt)


@register_method("vera")
class VeRA(_PeftMethod):
    """VeRA: frozen shared random A, B; trains per-layer scaling vectors. ``alpha`` is unused."""

    supports_mha = False  # peft has no such layer for nn.MultiheadAttention

    defaults: ClassVar[dict[str, Any]] = {"d_initial": 0.1}
    config_name = "VeraConfig"

    def check_option(self, key, value):
        return positive_number(self.name, key, value)

    def lora_kwargs(self, options, plan, rank, dropout):
        return {"r": rank, "vera_dropout": dropout, "d_initial": options["d_initial"]}


@register_method("ia3")
class IA3(_PeftMethod):
    """(IA)^3: learned scaling vectors; outputs of gate/up/attn, inputs of down. ``rank``/``alpha`` unused."""

    supports_mha = False  # peft has no such layer for nn.MultiheadAttention
    uses_rank = False

    config_name = "IA3Config"

    def lora_kwargs(self, options, plan, rank, dropout):
        ff = [t.module for t in plan.items if t.roles == ("down",)]
        return {"feedforward_modules": target_regex(ff) if ff else []}
