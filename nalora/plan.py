"""Target planning: which modules a method adapts, given targets and towers.

The plan is method-independent, so every method in a comparison adapts exactly the same modules.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import nn

from nalora.discovery import (
    TOWERS,
    GatedFFN,
    PlainMLP,
    _dims,
    _is_proj,
    discover,
    tower_classifier,
)

__all__ = ["TARGETS", "Target", "TargetPlan", "find_attention_projections", "resolve_targets"]

TARGETS = ("gate", "up", "down", "attn")


@dataclass
class Target:
    """One module to adapt.

    ``roles``: the requested targets this module serves (``("gate", "up")`` for a packed matrix with
    both parts targeted). ``kind``: ``"gated"`` (part of a gated FFN), ``"plain_mlp"`` (a non-gated MLP:
    gate/up -> its input projection, down -> its output projection), ``"attn"``.
    For packed modules ``train_rows`` may train and ``frozen_rows`` are held at exactly zero.
    """

    module: str
    roles: tuple[str, ...]
    tower: str
    kind: str
    layout: str  # "separate" | "packed" | "plain" | "attn" | "mha"
    owner: GatedFFN | PlainMLP | None = field(default=None, repr=False)
    out_features: int = 0
    in_features: int = 0
    train_rows: list[slice] | None = None
    frozen_rows: list[slice] | None = None
    mapped_to: str = ""  # plain MLPs: "fc_in" | "fc_out"

    @property
    def packed(self) -> bool:
        return self.layout == "packed"


@dataclass
class TargetPlan:
    """The resolved targets: ``items`` to adapt, plus what was found in the targeted towers."""

    targets: tuple[str, ...]
    towers: tuple[str, ...]
    items: list[Target]
    ffns: list[GatedFFN]  # gated FFNs in the targeted towers
    mlps: list[PlainMLP]  # non-gated MLPs in the targeted towers
    towers_without_gated: list[str]  # targeted towers that have modules but no gated FFN
    notes: list[str] = field(default_factory=list)

    def module_names(self) -> list[str]:
        return [t.module for t in self.items]

    def by_module(self) -> dict[str, Target]:
        return {t.module: t for t in self.items}

    def gated_towers(self) -> list[str]:
        return sorted({f.tower for f in self.ffns})


def _attention_roots(model: nn.Module, blocks: Sequence[str]) -> list[tuple[str, nn.Module]]:
    """Outermost attention modules (class or attribute name says attention) that hold no FFN block.

    A module that also holds one of the FFN ``blocks`` (e.g. Pixtral's ``PixtralAttentionLayer``) is a
    whole layer, not the attention: the search goes on inside it.
    """
    roots: list[tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        if not name:
            continue
        cls = type(m).__name__.lower()
        leaf = name.rsplit(".", 1)[-1].lower()
        looks = isinstance(m, nn.MultiheadAttention) or (
            (
                "attention" in cls
                or cls.endswith("attn")
                or leaf in ("attn", "self_attn", "attention", "self_attention", "cross_attn")
            )
            and not _is_proj(m)
            and "pool" not in cls  # attention-pooling heads are heads, not encoder attention
        )
        holds_ffn = any(b == name or b.startswith(name + ".") for b in blocks)
        if looks and not holds_ffn and not any(name.startswith(r + ".") for r, _ in roots):
            roots.append((name, m))
    return roots


def find_attention_projections(model: nn.Module, blocks: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """``(module path, layout)`` of every attention projection: q/k/v/o, fused qkv, proj, out_proj.

    ``nn.MultiheadAttention`` computes with its raw ``in_proj_weight`` (its ``out_proj`` Linear is never
    called), so the whole module is the target (peft adapts it as one unit): layout ``"mha"``.
    ``blocks``: module paths of the FFN blocks (from ``discover``); found here when not given.
    """
    if blocks is None:
        ffns, mlps = discover(model, lambda p: "")
        blocks = [b.name for b in (*ffns, *mlps)]
    out = []
    for root, m in _attention_roots(model, blocks):
        if isinstance(m, nn.MultiheadAttention):
            out.append((root, "mha"))
            continue
        for sub, child in m.named_modules():
            if sub and _is_proj(child):
                out.append((f"{root}.{sub}", "attn"))
    return out


def _check_names(kind: str, given: Sequence[str], allowed: Sequence[str]) -> tuple[str, ...]:
    if isinstance(given, str):
        given = (given,)
    given = tuple(given)
    if not given:
        raise ValueError(f"{kind} is empty; choose from {', '.join(allowed)}")
    bad = [g for g in given if g not in allowed]
    if bad:
        raise ValueError(f"unknown {kind[:-1]} {bad[0]!r}; choose from {', '.join(allowed)}")
    return tuple(dict.fromkeys(given))  # dedupe, keep order


def _packed_rows(ffn: GatedFFN, roles: tuple[str, ...]) -> tuple[list[slice], list[slice]]:
    parts = {"gate": ffn.gate_rows, "up": ffn.up_rows}
    train = [parts[r] for r in ("gate", "up") if r in roles]
    frozen = [parts[r] for r in ("gate", "up") if r not in roles]
    return train, frozen


class _Items:
    """Targets keyed by module path; a module serving several roles (gate and up of one FFN) is one item."""

    def __init__(self) -> None:
        self.items: dict[str, Target] = {}

    def add(self, module: str, roles: tuple[str, ...], mod: nn.Module, **kw) -> None:
        if module in self.items:
            self.items[module].roles += roles
            return
        out, inp = _dims(mod)
        self.items[module] = Target(module=module, roles=roles, out_features=out, in_features=inp, **kw)


def _add_ffn(items: _Items, f: GatedFFN, roles: Sequence[str]) -> None:
    """A gated FFN's targets: one packed item (its untargeted part held), or separate gate/up/down items."""
    common = {"tower": f.tower, "kind": "gated", "owner": f}
    if f.layout == "packed":
        packed = tuple(r for r in ("gate", "up") if r in roles)
        if packed:
            train, frozen = _packed_rows(f, packed)
            items.add(f.gate, packed, f.modules["gate"], layout="packed", train_rows=train,
                      frozen_rows=frozen or None, **common)
    else:
        for r in ("gate", "up"):
            if r in roles:
                items.add(getattr(f, r), (r,), f.modules[r], layout="separate", **common)
    if "down" in roles:
        items.add(f.down, ("down",), f.modules["down"], layout="separate", **common)


def _add_mlp(items: _Items, m: PlainMLP, roles: Sequence[str]) -> None:
    """A non-gated MLP: gate/up map to its input projection, down to its output projection."""
    for r in roles:
        slot = "fc_out" if r == "down" else "fc_in"
        items.add(getattr(m, slot), (r,), m.modules[slot], tower=m.tower, kind="plain_mlp", layout="plain",
                  owner=m, mapped_to=slot)


def _add_attn(items: _Items, model: nn.Module, attn: list[tuple[str, str, str]], towers: Sequence[str]) -> None:
    for path, layout, tower in attn:
        if tower in towers and path not in items.items:
            items.add(path, ("attn",), model.get_submodule(path), tower=tower, kind="attn", layout=layout)


def resolve_targets(
    model: nn.Module,
    targets: Sequence[str] = ("gate",),
    towers: Sequence[str] = TOWERS,
    tower_of: Callable[[str], str] | None = None,
) -> TargetPlan:
    """Resolve ``targets`` (subset of gate/up/down/attn) in ``towers`` (language/vision) to modules.

    Raises ``ValueError`` for an empty or unknown target or tower, a target that matches nothing in the
    chosen towers, or towers that contain nothing at all. Discovery runs once.
    """
    targets = _check_names("targets", targets, TARGETS)
    towers = _check_names("towers", towers, TOWERS)
    tower_of = tower_of or tower_classifier(model)
    all_ffns, all_mlps = discover(model, tower_of)
    blocks = [b.name for b in (*all_ffns, *all_mlps)]
    attn = [(p, lay, tower_of(p)) for p, lay in find_attention_projections(model, blocks)]
    present = {x.tower for x in (*all_ffns, *all_mlps)} | {t for *_, t in attn}
    if not any(t in present for t in towers):
        raise ValueError(
            f"towers {', '.join(towers)} match nothing in {type(model).__name__} "
            f"(its towers: {', '.join(sorted(present)) or 'none found'})"
        )
    ffns = [f for f in all_ffns if f.tower in towers]
    mlps = [m for m in all_mlps if m.tower in towers]
    ffn_roles = [r for r in targets if r != "attn"]
    items = _Items()
    for f in ffns:
        _add_ffn(items, f, ffn_roles)
    for m in mlps:
        _add_mlp(items, m, ffn_roles)
    if "attn" in targets:
        _add_attn(items, model, attn, towers)
    plan_items = list(items.items.values())
    for t in targets:
        if not any(t in it.roles for it in plan_items):
            raise ValueError(f"target {t!r} matches nothing in towers {', '.join(towers)} of {type(model).__name__}")
    gated_towers = {f.tower for f in ffns}
    return TargetPlan(
        targets=targets,
        towers=towers,
        items=plan_items,
        ffns=ffns,
        mlps=mlps,
        towers_without_gated=[t for t in towers if t in present and t not in gated_towers],
        notes=[f"tower {t!r} not present in the model" for t in towers if t not in present],
    )
