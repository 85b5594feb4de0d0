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
    _is_proj,
    _out_features,
    find_gated_ffns,
    find_mlps,
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


def _attention_roots(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Outermost attention modules (class or attribute name says attention) that hold no FFN block.

    A module that also holds the FFN (e.g. Pixtral's ``PixtralAttentionLayer``) is a whole layer, not
    the attention: the search goes on inside it.
    """
    blocks = [f.name for f in find_gated_ffns(model, lambda p: "")] + [
        m.name for m in find_mlps(model, lambda p: "")
    ]
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


def find_attention_projections(model: nn.Module) -> list[tuple[str, str]]:
    """``(module path, layout)`` of every attention projection: q/k/v/o, fused qkv, proj, out_proj.

    ``nn.MultiheadAttention`` computes with its raw ``in_proj_weight`` (its ``out_proj`` Linear is never
    called), so the whole module is the target (peft adapts it as one unit): layout ``"mha"``.
    """
    out = []
    for root, m in _attention_roots(model):
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


def resolve_targets(
    model: nn.Module,
    targets: Sequence[str] = ("gate",),
    towers: Sequence[str] = TOWERS,
    tower_of: Callable[[str], str] | None = None,
) -> TargetPlan:
    """Resolve ``targets`` (subset of gate/up/down/attn) in ``towers`` (language/vision) to modules.

    Raises ``ValueError`` for an empty or unknown target or tower, a target that matches nothing in the
    chosen towers, or towers that contain nothing at all.
    """
    targets = _check_names("targets", targets, TARGETS)
    towers = _check_names("towers", towers, TOWERS)
    tower_of = tower_of or tower_classifier(model)
    all_ffns = find_gated_ffns(model, tower_of)
    all_mlps = find_mlps(model, tower_of)
    attn = [(p, lay, tower_of(p)) for p, lay in find_attention_projections(model)]
    present = {x.tower for x in all_ffns} | {x.tower for x in all_mlps} | {t for *_, t in attn}
    if not any(t in present for t in towers):
        raise ValueError(
            f"towers {', '.join(towers)} match nothing in {type(model).__name__} "
            f"(its towers: {', '.join(sorted(present)) or 'none found'})"
        )
    notes = [f"tower {t!r} not present in the model" for t in towers if t not in present]

    ffns = [f for f in all_ffns if f.tower in towers]
    mlps = [m for m in all_mlps if m.tower in towers]
    items: dict[str, Target] = {}

    def add(module: str, role: str, **kw) -> None:
        if module in items:
            items[module].roles += (role,)
        else:
            items[module] = Target(module=module, roles=(role,), **kw)

    ffn_roles = [r for r in targets if r != "attn"]
    for f in ffns:
        if f.layout == "packed":
            roles = tuple(r for r in ("gate", "up") if r in ffn_roles)
            if roles:
                train, frozen = _packed_rows(f, roles)
                items[f.gate] = Target(
                    module=f.gate,
                    roles=roles,
                    tower=f.tower,
                    kind="gated",
                    layout="packed",
                    owner=f,
                    out_features=_out_features(f.modules["gate"]),
                    train_rows=train,
                    frozen_rows=frozen or None,
                )
        else:
            for r in ("gate", "up"):
                if r in ffn_roles:
                    add(
                        getattr(f, r),
                        r,
                        tower=f.tower,
                        kind="gated",
                        layout="separate",
                        owner=f,
                        out_features=_out_features(f.modules[r]),
                    )
        if "down" in ffn_roles:
            add(
                f.down,
                "down",
                tower=f.tower,
                kind="gated",
                layout="separate",
                owner=f,
                out_features=_out_features(f.modules["down"]),
            )
    for m in mlps:
        for r in ffn_roles:
            slot = "fc_out" if r == "down" else "fc_in"
            add(
                getattr(m, slot),
                r,
                tower=m.tower,
                kind="plain_mlp",
                layout="plain",
                owner=m,
                out_features=_out_features(m.modules[slot]),
                mapped_to=slot,
            )
    for path, layout, tower in attn if "attn" in targets else []:
        if tower in towers and path not in items:
            mod = model.get_submodule(path)
            n = mod.embed_dim if isinstance(mod, nn.MultiheadAttention) else _out_features(mod)
            items[path] = Target(
                module=path, roles=("attn",), tower=tower, kind="attn", layout=layout, out_features=n
            )

    plan_items = list(items.values())
    for t in targets:
        if not any(t in it.roles for it in plan_items):
            raise ValueError(
                f"target {t!r} matches nothing in towers {', '.join(towers)} of {type(model).__name__}"
            )
    gated_towers = {f.tower for f in ffns}
    without = [t for t in towers if t in present and t not in gated_towers]
    return TargetPlan(
        targets=targets,
        towers=towers,
        items=plan_items,
        ffns=ffns,
        mlps=mlps,
        towers_without_gated=without,
        notes=notes,
    )
