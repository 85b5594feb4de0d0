"""Typed suite configuration: pydantic models for training, adapter, method entry, task entry, tune and suite.

The models hold types and constraints only. Every *value* default lives in one place,
``benchmarks/suites/defaults.yaml``, which every suite extends; fields here have no defaults except
structural ones (an empty option mapping, "inherit the suite's grid"). ``extra="forbid"`` turns a typo
into an error, and ``one_line`` turns any validation error into one line naming the key path.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    field_validator,
)


def _number(value: Any) -> Any:
    # YAML 1.1 reads "1e-4" (no dot) as a string: accept numeric strings, refuse booleans (True is not 1.0).
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ValueError("must be a number") from None
    return value


def _none_is_empty(value: Any) -> Any:
    return {} if value is None else value


Number = Annotated[float, BeforeValidator(_number)]
LR = Annotated[float, BeforeValidator(_number), Field(gt=0)]
PosInt = Annotated[StrictInt, Field(ge=1)]
NonNegInt = Annotated[StrictInt, Field(ge=0)]
Mapping = Annotated[dict[str, Any], BeforeValidator(_none_is_empty)]

TARGETS = ("gate", "up", "down", "attn")  # nalora.plan.TARGETS (checked again by inject)
TOWERS = ("language", "vision")
FAMILIES = ("llm", "vlm")  # Task.family: language tasks and vision-language tasks


class Strict(BaseModel):
    """Unknown keys are errors; NaN and inf are refused wherever a number is expected."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=False)


class TrainingConfig(Strict):
    """The fixed training recipe of a run (every key required: defaults.yaml gives each its value)."""

    steps: PosInt
    batch_size: PosInt
    grad_accum: PosInt
    warmup_ratio: Annotated[Number, Field(ge=0, lt=1)]
    weight_decay: Annotated[Number, Field(ge=0)]
    max_grad_norm: Annotated[Number, Field(gt=0)] | None
    eval_every: NonNegInt
    eval_limit: PosInt | None
    # Periodic (curve) evaluations use the first curve_limit of the eval_limit examples; null = all of them.
    # Left out of the run config (and so of the run id) when null: runs from before the key keep their ids.
    curve_limit: PosInt | None
    test_limit: PosInt | None
    eval_batch_size: PosInt
    log_every: PosInt
    diag_batches: NonNegInt
    mixed_precision: Literal["auto", "no", "bf16", "fp16"]
    # The faster step (benchmarks/runner/compiled.py): true, false, or auto (on a GPU). Hashed into run ids.
    compile: bool | Literal["auto"]
    bf16_frozen: bool | Literal["auto"]
    light_loss: bool | Literal["auto"]
    seq_bucket: PosInt  # training batches are padded to a multiple of this many tokens (bounds recompiles)

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, v: Any) -> Any:
        return "no" if v is False else v  # YAML 1.1 reads a bare `no` as false


class AdapterConfig(Strict):
    """The shared adapter budget (targets, towers, rank, alpha, dropout) and the per-tower lr multipliers."""

    targets: Annotated[list[Literal[TARGETS]], Field(min_length=1)]  # type: ignore[valid-type]
    towers: Annotated[list[Literal[TOWERS]], Field(min_length=1)]  # type: ignore[valid-type]
    rank: PosInt
    alpha: Annotated[Number, Field(gt=0)]
    dropout: Annotated[Number, Field(ge=0, lt=1)]
    # {tower: scale}: that tower's trained parameters at lr x scale (nalora.tower_lr), for every method alike.
    # Left out of the run config (and so of the run id) when empty: runs from before the key keep their ids.
    tower_lr_scale: Annotated[
        dict[Literal[TOWERS], Annotated[Number, Field(gt=0)]],  # type: ignore[valid-type]
        BeforeValidator(_none_is_empty),
    ]

    @field_validator("tower_lr_scale")
    @classmethod
    def _drop_unit_scales(cls, v: dict[str, float]) -> dict[str, float]:
        # A scale of 1 changes nothing: dropped, so that {vision: 1} runs share the ids of runs without it.
        return {t: s for t, s in sorted(v.items()) if s != 1.0}


class MethodEntry(Strict):
    """One method entry of a suite: a label (table column) running a registered method."""

    method: str | None = None  # None: the label is the registered name
    lr_grid: Annotated[list[LR], Field(min_length=1)] | None = None  # None: the suite's lr_grid
    lr_grid_reason: str = ""
    lr_bounds: tuple[LR, LR] | None = None  # None: the suite's lr_bounds
    options: Mapping = {}
    adapter: Mapping = {}  # overrides of the shared budget, validated merged as AdapterConfig
    ablation: bool = False  # only in the ablation table
    families: list[Literal[FAMILIES]] | None = None  # type: ignore[valid-type]
    seeds: Annotated[list[StrictInt], Field(min_length=1)] | None = None  # None: the suite's seeds


class TaskEntry(Strict):
    """A task name, optionally with its own models, training overrides and constructor options."""

    name: str
    model: str | None = None
    models: Annotated[list[str], Field(min_length=1)] | None = None
    training: Mapping = {}  # overrides, validated merged as TrainingConfig
    options: Mapping = {}  # keyword arguments of the task's constructor (checked against its signature)


class TuneConfig(Strict):
    """Option tuning on dev tasks, the same number of configurations for every tuned method."""

    methods: Annotated[dict[str, dict[str, Annotated[list[Any], Field(min_length=1)]]], Field(min_length=1)]
    seeds: Annotated[list[StrictInt], Field(min_length=1)] | None = None


class SuiteConfig(Strict):
    """A whole suite, merged over its ``extends`` chain."""

    description: str = ""
    # One list for every task, or one per task family ({llm: [...], vlm: [...]}); a family left out runs each
    # of its tasks on the task's default model.
    models: Annotated[list[str], Field(min_length=1)] | dict[Literal[FAMILIES], Annotated[list[str], Field(min_length=1)]] = {}  # type: ignore[valid-type]
    tasks: Annotated[list[str | TaskEntry], Field(min_length=1)]
    dev_tasks: list[str | TaskEntry] = []
    methods: Annotated[dict[str, Annotated[MethodEntry, BeforeValidator(_none_is_empty)]], Field(min_length=1)]
    seeds: Annotated[list[StrictInt], Field(min_length=1)]
    adapter: Mapping
    training: Mapping
    lr_grid: Annotated[list[LR], Field(min_length=1)]
    lr_bounds: tuple[LR, LR]
    tune: TuneConfig | None = None
    task_paths: list[str] = []
    assets: list[str] = []

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError("has duplicates")
        return v


_MESSAGES = {
    "greater_than": lambda c: f"must be > {c['gt']}",
    "greater_than_equal": lambda c: f"must be >= {c['ge']}",
    "less_than": lambda c: f"must be < {c['lt']}",
    "less_than_equal": lambda c: f"must be <= {c['le']}",
    "too_short": lambda c: "must not be empty",
    "extra_forbidden": lambda c: "unknown key",
    "missing": lambda c: "is missing",
    "finite_number": lambda c: "must be a finite number",
    "int_type": lambda c: "must be an integer",
    "float_type": lambda c: "must be a number",
    "float_parsing": lambda c: "must be a number",
    "literal_error": lambda c: f"must be one of {c.get('expected', '')}",
}


def one_line(err: ValidationError, prefix: str = "") -> str:
    """The first error of ``err`` as ``key.path: message, got value`` (one line)."""
    # In a union (a task given as a name or a mapping) the deepest error is the one that explains it.
    e = max(err.errors(include_url=False), key=lambda x: len(x["loc"]))
    # Drop union-branch names pydantic inserts into the path (``str``, ``TaskEntry``, ``function-before[...]``).
    loc = [str(p) for p in e["loc"] if not (isinstance(p, str) and (p[:1].isupper() or "[" in p or p in ("str", "int")))]
    path = ".".join([p for p in (prefix, *loc) if p])
    ctx = e.get("ctx") or {}
    msg = _MESSAGES[e["type"]](ctx) if e["type"] in _MESSAGES else e["msg"]
    if e["type"] == "value_error":
        msg = str(ctx.get("error", e["msg"])).removeprefix("Value error, ")
    got = "" if e["type"] in ("missing", "extra_forbidden") else f", got {_short(e.get('input'))}"
    return f"{path}: {msg}{got}" if path else f"{msg}{got}"


def _short(value: Any) -> str:
    text = repr(value)
    if isinstance(value, float) and math.isfinite(value):
        text = f"{value:g}"
    return text if len(text) <= 60 else text[:57] + "..."


__all__ = [
    "AdapterConfig", "MethodEntry", "SuiteConfig", "TaskEntry", "TrainingConfig", "TuneConfig", "one_line",
]
