"""Find the feed-forward blocks of a model by structure: gated FFNs NA-LoRA can adapt, plain MLPs it cannot.

Detection looks at child-module names and shapes, not at model class names, so the same code covers
HF (Llama, Qwen2/3, Mistral, Gemma3, Qwen2.5-VL, AIMv2, Pixtral, Phi-3 fused), timm (``SwiGLU``,
packed ``GluMlp``), transformers ``Dinov2SwiGLUFFN`` and open_clip towers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from nalora.activations import normalize_activation

__all__ = [
    "TOWERS",
    "GatedFFN",
    "PlainMLP",
    "find_gated_ffns",
    "find_mlps",
    "normalize_activation",
    "tower_classifier",
]

TOWERS = ("language", "vision")

# A path component with one of these names starts a vision tower.
_VISION_COMPONENTS = {
    "visual",
    "vision",
    "vision_tower",
    "vision_model",
    "vision_encoder",
    "vision_backbone",
    "image_encoder",
    "image_tower",
    "img_encoder",
    "vit",
}

@dataclass
class GatedFFN:
    """A self-gated FFN ``y = down(phi(gate x) * up x)``.

    For ``layout == "packed"`` gate and up are row blocks of one matrix (``gate == up``); the
    pre-activations are ``out[..., gate_rows]`` / ``out[..., up_rows]`` of that module's output, along
    ``chunk_dim`` (``-1`` for Linear, ``1`` for a 1x1 Conv2d).
    """

    name: str
    tower: str
    activation: str
    layout: str
    gate: str
    up: str
    down: str
    d_ff: int
    gate_rows: slice | None = None
    up_rows: slice | None = None
    modules: dict[str, nn.Module] = field(default_factory=dict, repr=False)
    kind: str = ""  # which structural pattern matched: "gate_up_down", "fused_gate_up", "timm_swiglu", ...
    chunk_dim: int = -1


@dataclass
class PlainMLP:
    """A non-gated MLP ``y = fc_out(act(fc_in x))``: plain LoRA can adapt it, NA-LoRA cannot."""

    name: str
    tower: str
    activation: str
    fc_in: str
    fc_out: str
    d_ff: int
    modules: dict[str, nn.Module] = field(default_factory=dict, repr=False)
    kind: str = ""


def _is_proj(m: Any) -> bool:
    """A module whose weight rows are output features: Linear, 1x1 Conv2d, HF GPT-2 Conv1D."""
    if isinstance(m, nn.Linear):
        return True
    if isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (1, 1):
        return True
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf")


def _dims(m: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a projection (Linear, 1x1 Conv2d, HF Conv1D) or an nn.MultiheadAttention."""
    if isinstance(m, nn.MultiheadAttention):
        return m.embed_dim, m.embed_dim
    if isinstance(m, nn.Linear):
        return m.out_features, m.in_features
    if isinstance(m, nn.Conv2d):
        return m.out_channels, m.in_channels
    return int(m.nf), int(m.weight.shape[0])  # HF Conv1D stores its weight as (in, out)


def _out_features(m: nn.Module) -> int:
    return _dims(m)[0]


def _children(m: nn.Module) -> dict[str, nn.Module]:
    return dict(m.named_children())


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _is_vision_root(m: nn.Module) -> bool:
    """Is ``m`` itself an image model (so everything under it is the vision tower)?"""
    mod = type(m).__module__ or ""
    if mod.startswith("timm.models") and hasattr(m, "pretrained_cfg"):  # timm models are image models
        return True
    if "open_clip" in mod and type(m).__name__ in ("VisionTransformer", "TimmModel", "ModifiedResNet"):
        return True
    cfg = getattr(m, "config", None)
    if getattr(m, "main_input_name", None) == "pixel_values" and cfg is not None:
        # Composite models (VisionEncoderDecoder, ...) also take pixel_values but hold a text part.
        return getattr(cfg, "text_config", None) is None and not getattr(cfg, "is_encoder_decoder", False)
    return False


def tower_classifier(model: nn.Module) -> Callable[[str], str]:
    """A function mapping a module path of ``model`` to ``"vision"`` or ``"language"``.

    Vision: a path component names a vision tower (``visual``, ``vision_tower``, ``vision_model``,
    ...), or the module sits under (or is) an image model (timm, HF model whose input is pixel values).
    """
    vision_prefixes = [
        name
        for name, m in model.named_modules()
        if (name and name.rsplit(".", 1)[-1].lower() in _VISION_COMPONENTS) or _is_vision_root(m)
    ]

    def tower_of(path: str) -> str:
        for p in vision_prefixes:
            if p == "" or path == p or path.startswith(p + "."):
                return "vision"
        return "language"

    return tower_of


def _config_act(model: nn.Module, path: str) -> str | None:
    """``hidden_act`` of the nearest config on the path to ``path`` (nearest wins)."""
    found = None
    node: nn.Module = model
    parts = path.split(".") if path else []
    for i in range(len(parts) + 1):
        cfg = getattr(node, "config", None)
        act = getattr(cfg, "hidden_act", None) if cfg is not None and not callable(cfg) else None
        if isinstance(act, str):
            found = act
        if i < len(parts):
            node = getattr(node, parts[i], None)
            if node is None:
                break
    return found


def _module_act(block: nn.Module) -> Any:
    for attr in ("act_fn", "act", "activation_fn", "activation", "act_layer", "gelu", "intermediate_act_fn"):
        a = getattr(block, attr, None)
        if (
            a is not None
            and not isinstance(a, (str, bool, int, float))
            and (isinstance(a, nn.Module) or callable(a))
        ):
            return a
        if isinstance(a, str):
            return a
    return None


def _activation(model: nn.Module, path: str, block: nn.Module, default: str | None = None) -> str:
    a = _module_act(block)
    if a is not None:
        return normalize_activation(a)
    if default is not None:
        return default
    return normalize_activation(_config_act(model, path))


def _gated(kind: str, gate: str, up: str, down: str, d_ff: int, rows: tuple[slice, slice] | None = None,
           chunk_dim: int = -1, default_act: str = "") -> GatedFFN:
    """A structural match: a ``GatedFFN`` with child names (not yet paths) and, for blocks calling a functional
    activation, ``activation`` = its default (else ""); ``_gated_record`` completes it."""
    gate_rows, up_rows = rows if rows is not None else (None, None)
    return GatedFFN(name="", tower="", activation=default_act, layout="separate" if rows is None else "packed",
                    gate=gate, up=up, down=down, d_ff=d_ff, gate_rows=gate_rows, up_rows=up_rows, kind=kind,
                    chunk_dim=chunk_dim)


# Separate projections ``down(act(gate x) * up x)``, by child names (kind, gate, up, down).
_SEPARATE = (
    ("gate_up_down", "gate_proj", "up_proj", "down_proj"),  # HF Llama, Qwen2/3, Mistral, Gemma3, AIMv2, Pixtral
    ("timm_swiglu", "fc1_g", "fc1_x", "fc2"),  # timm SwiGLU
    ("t5_gated", "wi_0", "wi_1", "wo"),  # T5 v1.1 / Flan-T5 gated-gelu
)
# One packed matrix, gate rows first: ``gate, up = packed(x).chunk(2, -1)`` (kind, packed, down, default act).
_PACKED = (
    ("fused_gate_up", "gate_up_proj", "down_proj", None),  # Phi-3
    ("dinov2_swiglu", "weights_in", "weights_out", "silu"),  # transformers Dinov2SwiGLUFFN (functional silu)
)


def _match_separate(ch: dict[str, nn.Module], block: nn.Module) -> GatedFFN | None:
    for kind, gate, up, down in _SEPARATE:
        if all(_is_proj(ch.get(k)) for k in (gate, up, down)):
            return _gated(kind, gate, up, down, _out_features(ch[gate]))
    return None


def _halves(n: int, gate_last: bool = False) -> tuple[slice, slice]:
    """(gate_rows, up_rows) of a packed matrix with ``2 n`` rows."""
    first, second = slice(0, n), slice(n, 2 * n)
    return (second, first) if gate_last else (first, second)


def _match_packed(ch: dict[str, nn.Module], block: nn.Module) -> GatedFFN | None:
    for kind, packed, down, act in _PACKED:
        if _is_proj(ch.get(packed)) and _is_proj(ch.get(down)):
            n = _out_features(ch[packed]) // 2
            return _gated(kind, packed, packed, down, n, _halves(n), default_act=act or "")
    return None


def _match_timm_glu(ch: dict[str, nn.Module], block: nn.Module) -> GatedFFN | None:
    """timm GluMlp: ``x1, x2 = fc1(x).chunk(2, chunk_dim)``; gate_last -> ``x1 * act(x2)`` else ``act(x1) * x2``."""
    if not (_is_proj(ch.get("fc1")) and _is_proj(ch.get("fc2"))
            and hasattr(block, "gate_last") and hasattr(block, "chunk_dim")):
        return None
    n = _out_features(ch["fc1"]) // 2
    return _gated("timm_glu", "fc1", "fc1", "fc2", n, _halves(n, bool(block.gate_last)), chunk_dim=int(block.chunk_dim))


def _match_w123(ch: dict[str, nn.Module], block: nn.Module) -> GatedFFN | None:
    """w1/w2/w3 (Mixtral-style experts, xformers SwiGLU): w1 is the gate in both conventions; which of w2/w3
    is the down projection differs, so it is read from the shapes (no match when they cannot tell)."""
    if not all(isinstance(ch.get(k), nn.Linear) for k in ("w1", "w2", "w3")):
        return None
    w1 = ch["w1"]
    n, d = w1.out_features, w1.in_features
    downs = [k for k in ("w2", "w3") if (ch[k].in_features, ch[k].out_features) == (n, d)]
    ups = [k for k in ("w2", "w3") if (ch[k].in_features, ch[k].out_features) == (d, n)]
    if len(downs) == 1 and ups == [k for k in ("w2", "w3") if k != downs[0]]:
        return _gated("w1_w2_w3", "w1", ups[0], downs[0], n)
    return None


# Tried in order; the first match wins (a block with gate_proj/up_proj/down_proj never reaches the others).
_GATED_MATCHERS = (_match_separate, _match_packed, _match_timm_glu, _match_w123)


def _match_gated(block: nn.Module) -> GatedFFN | None:
    """Structural match of one module against the known gated-FFN layouts."""
    ch = _children(block)
    return next((m for f in _GATED_MATCHERS if (m := f(ch, block)) is not None), None)


# Non-gated ``fc_out(act(fc_in x))`` by child names (fc_in, fc_out, kind).
_PLAIN = (
    ("wi", "wo", "t5_dense"),
    ("fc1", "fc2", "fc1_fc2"),
    ("c_fc", "c_proj", "c_fc_c_proj"),
    ("lin1", "lin2", "lin1_lin2"),
    ("dense_h_to_4h", "dense_4h_to_h", "h_to_4h"),
)


def _match_plain(model: nn.Module, path: str, block: nn.Module) -> dict[str, Any] | None:
    """Structural match against the known non-gated MLP layouts."""
    ch = _children(block)
    if hasattr(block, "gate_last") or "wi_0" in ch:  # timm GluMlp / a T5 gated FFN: never plain
        return None
    for fin, fout, kind in _PLAIN:
        if _is_proj(ch.get(fin)) and _is_proj(ch.get(fout)):
            return {"kind": kind, "fc_in": fin, "fc_out": fout, "d_ff": _out_features(ch[fin]),
                    "act": _activation(model, path, block)}
    # BERT / HF ViT: layer.intermediate.dense -> act -> layer.output.dense
    inter, out = ch.get("intermediate"), ch.get("output")
    di, do = getattr(inter, "dense", None), getattr(out, "dense", None)
    if _is_proj(di) and _is_proj(do):
        return {"kind": "intermediate_output", "fc_in": "intermediate.dense", "fc_out": "output.dense",
                "d_ff": _out_features(di), "act": _activation(model, _join(path, "intermediate"), inter)}
    return None


def _gated_record(model: nn.Module, path: str, block: nn.Module, m: GatedFFN, tower: str) -> GatedFFN:
    """The match ``m`` (child names) as the record of the block at ``path``."""
    return replace(
        m, name=path, tower=tower, activation=_activation(model, path, block, default=m.activation or None),
        gate=_join(path, m.gate), up=_join(path, m.up), down=_join(path, m.down),
        modules={"gate": block.get_submodule(m.gate), "up": block.get_submodule(m.up),
                 "down": block.get_submodule(m.down), "block": block},
    )


def _plain_record(path: str, block: nn.Module, m: dict[str, Any], tower: str) -> PlainMLP:
    return PlainMLP(
        name=path, tower=tower, activation=m["act"], fc_in=_join(path, m["fc_in"]), fc_out=_join(path, m["fc_out"]),
        d_ff=m["d_ff"],
        modules={"fc_in": block.get_submodule(m["fc_in"]), "fc_out": block.get_submodule(m["fc_out"]), "block": block},
        kind=m["kind"],
    )


def discover(model: nn.Module, tower_of: Callable[[str], str] | None = None) -> tuple[list[GatedFFN], list[PlainMLP]]:
    """One pass over ``model``: its gated FFNs and its non-gated MLPs, each in module order."""
    tower_of = tower_of or tower_classifier(model)
    ffns: list[GatedFFN] = []
    mlps: list[PlainMLP] = []
    for path, block in model.named_modules():
        gated = _match_gated(block)
        if gated is not None:
            ffns.append(_gated_record(model, path, block, gated, tower_of(path)))
            continue
        plain = _match_plain(model, path, block)
        if plain is not None:
            mlps.append(_plain_record(path, block, plain, tower_of(path)))
    return ffns, mlps


def find_gated_ffns(model: nn.Module, tower_of: Callable[[str], str] | None = None) -> list[GatedFFN]:
    """Every self-gated FFN of ``model`` in module order. ``tower_of`` overrides tower classification."""
    return discover(model, tower_of)[0]


def find_mlps(model: nn.Module, tower_of: Callable[[str], str] | None = None) -> list[PlainMLP]:
    """Every non-gated MLP of ``model``: what NA-LoRA cannot touch (plain LoRA can)."""
    return discover(model, tower_of)[1]
