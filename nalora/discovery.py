"""Find the feed-forward blocks of a model by structure: gated FFNs NA-LoRA can adapt, plain MLPs it cannot.

Detection looks at child-module names and shapes, not at model class names, so the same code covers
HF (Llama, Qwen2/3, Mistral, Gemma3, Qwen2.5-VL, AIMv2, Pixtral, Phi-3 fused), timm (``SwiGLU``,
packed ``GluMlp``), transformers ``Dinov2SwiGLUFFN`` and open_clip towers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

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

# Exact string names -> normalised names. Anything else is returned lower-cased, unchanged.
_ACT_NAMES = {
    "silu": "silu",
    "swish": "silu",
    "swiglu": "silu",
    "gelu": "gelu",
    "gelu_python": "gelu",
    "gelu_erf": "gelu",
    "geglu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_python_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_accurate": "gelu_tanh",
    "gelu_tanh": "gelu_tanh",
    "quick_gelu": "quick_gelu",
    "quickgelu": "quick_gelu",
    "relu": "relu",
    "sigmoid": "sigmoid",
    "identity": "identity",
    "linear": "identity",
    "tanh": "tanh",
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


def normalize_activation(module_or_name: Any) -> str:
    """Normalised activation name of an activation module, function or config string.

    ``"swish" -> "silu"``, ``"gelu_pytorch_tanh" -> "gelu_tanh"``, ``nn.GELU(approximate="tanh") ->
    "gelu_tanh"``; unknown activations come back as their lower-cased name (never silently "silu").
    """
    x = module_or_name
    if x is None:
        return "unknown"
    if isinstance(x, str):
        key = x.strip().lower()
        return _ACT_NAMES.get(key, key)
    if isinstance(x, nn.Identity):
        return "identity"
    approx = getattr(x, "approximate", None)
    # Class name for modules, __name__ for plain functions (F.silu, F.gelu, torch.sigmoid).
    raw = type(x).__name__ if isinstance(x, nn.Module) else getattr(x, "__name__", type(x).__name__)
    name = raw.lower().replace("_", "")
    if "quickgelu" in name:
        return "quick_gelu"
    if any(t in name for t in ("gelutanh", "newgelu", "fastgelu", "accurategelu", "tanhgelu")):
        return "gelu_tanh"
    if "gelu" in name:
        if isinstance(approx, str) and approx == "tanh":
            return "gelu_tanh"
        if getattr(x, "use_gelu_tanh_python", False):
            return "gelu_tanh"
        return "gelu"
    if "silu" in name or "swish" in name:
        return "silu"
    if name in ("relu", "relu_"):
        return "relu"
    if "sigmoid" in name:
        return "sigmoid"
    if name in ("identity", "linearactivation"):
        return "identity"
    return raw.lower()


def _is_proj(m: Any) -> bool:
    """A module whose weight rows are output features: Linear, 1x1 Conv2d, HF GPT-2 Conv1D."""
    if isinstance(m, nn.Linear):
        return True
    if isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (1, 1):
        return True
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf")


def _out_features(m: nn.Module) -> int:
    if isinstance(m, nn.Linear):
        return m.out_features
    if isinstance(m, nn.Conv2d):
        return m.out_channels
    return int(m.nf)  # HF Conv1D


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


def _match_gated(model: nn.Module, path: str, block: nn.Module) -> dict[str, Any] | None:
    """Structural match of one module against the known gated-FFN layouts."""
    ch = _children(block)

    def proj(name: str) -> nn.Module | None:
        m = ch.get(name)
        return m if m is not None and _is_proj(m) else None

    # HF separate projections: Llama, Qwen2/3, Mistral, Gemma3, Qwen2.5-VL, AIMv2, Pixtral ...
    if proj("gate_proj") and proj("up_proj") and proj("down_proj"):
        return {
            "kind": "gate_up_down",
            "layout": "separate",
            "gate": "gate_proj",
            "up": "up_proj",
            "down": "down_proj",
            "d_ff": _out_features(ch["gate_proj"]),
            "act": _activation(model, path, block),
        }
    # Phi-3 fused: gate, up = gate_up_proj(x).chunk(2, -1)
    if proj("gate_up_proj") and proj("down_proj"):
        n = _out_features(ch["gate_up_proj"]) // 2
        return {
            "kind": "fused_gate_up",
            "layout": "packed",
            "gate": "gate_up_proj",
            "up": "gate_up_proj",
            "down": "down_proj",
            "d_ff": n,
            "gate_rows": slice(0, n),
            "up_rows": slice(n, 2 * n),
            "act": _activation(model, path, block),
        }
    # timm SwiGLU: act(fc1_g x) * fc1_x x
    if proj("fc1_g") and proj("fc1_x") and proj("fc2"):
        return {
            "kind": "timm_swiglu",
            "layout": "separate",
            "gate": "fc1_g",
            "up": "fc1_x",
            "down": "fc2",
            "d_ff": _out_features(ch["fc1_g"]),
            "act": _activation(model, path, block),
        }
    # timm GluMlp: x1, x2 = fc1(x).chunk(2, chunk_dim); gate_last -> x1 * act(x2) else act(x1) * x2
    if proj("fc1") and proj("fc2") and hasattr(block, "gate_last") and hasattr(block, "chunk_dim"):
        n = _out_features(ch["fc1"]) // 2
        first, second = slice(0, n), slice(n, 2 * n)
        gate_rows, up_rows = (second, first) if block.gate_last else (first, second)
        return {
            "kind": "timm_glu",
            "layout": "packed",
            "gate": "fc1",
            "up": "fc1",
            "down": "fc2",
            "d_ff": n,
            "gate_rows": gate_rows,
            "up_rows": up_rows,
            "chunk_dim": int(block.chunk_dim),
            "act": _activation(model, path, block),
        }
    # T5 v1.1 / Flan-T5 gated-gelu: wo(act(wi_0 x) * wi_1 x)
    if proj("wi_0") and proj("wi_1") and proj("wo"):
        return {
            "kind": "t5_gated",
            "layout": "separate",
            "gate": "wi_0",
            "up": "wi_1",
            "down": "wo",
            "d_ff": _out_features(ch["wi_0"]),
            "act": _activation(model, path, block),
        }
    # w1/w2/w3 (Mixtral-style experts, xformers SwiGLU): w1 is the gate in both conventions; which of
    # w2/w3 is the down projection differs, so it is read from the shapes (skipped when they cannot tell).
    if (
        proj("w1")
        and proj("w2")
        and proj("w3")
        and all(isinstance(ch[k], nn.Linear) for k in ("w1", "w2", "w3"))
    ):
        n = ch["w1"].out_features
        downs = [
            k for k in ("w2", "w3") if ch[k].in_features == n and ch[k].out_features == ch["w1"].in_features
        ]
        ups = [
            k for k in ("w2", "w3") if ch[k].out_features == n and ch[k].in_features == ch["w1"].in_features
        ]
        if len(downs) == 1 and ups == [k for k in ("w2", "w3") if k != downs[0]]:
            return {
                "kind": "w1_w2_w3",
                "layout": "separate",
                "gate": "w1",
                "up": ups[0],
                "down": downs[0],
                "d_ff": n,
                "act": _activation(model, path, block),
            }
    # transformers Dinov2SwiGLUFFN: x1, x2 = weights_in(x).chunk(2, -1); silu(x1) * x2 (functional silu)
    if proj("weights_in") and proj("weights_out"):
        n = _out_features(ch["weights_in"]) // 2
        return {
            "kind": "dinov2_swiglu",
            "layout": "packed",
            "gate": "weights_in",
            "up": "weights_in",
            "down": "weights_out",
            "d_ff": n,
            "gate_rows": slice(0, n),
            "up_rows": slice(n, 2 * n),
            "act": _activation(model, path, block, default="silu"),
        }
    return None


def _match_plain(model: nn.Module, path: str, block: nn.Module) -> dict[str, Any] | None:
    """Structural match against the known non-gated MLP layouts."""
    ch = _children(block)
    if hasattr(block, "gate_last"):  # timm GluMlp is gated, never plain
        return None
    if "wi_0" in ch:  # T5 gated FFN whose projections did not match: never report it as plain
        return None
    for fin, fout, kind in (
        ("wi", "wo", "t5_dense"),
        ("fc1", "fc2", "fc1_fc2"),
        ("c_fc", "c_proj", "c_fc_c_proj"),
        ("lin1", "lin2", "lin1_lin2"),
        ("dense_h_to_4h", "dense_4h_to_h", "h_to_4h"),
    ):
        if fin in ch and fout in ch and _is_proj(ch[fin]) and _is_proj(ch[fout]):
            return {
                "kind": kind,
                "fc_in": fin,
                "fc_out": fout,
                "d_ff": _out_features(ch[fin]),
                "act": _activation(model, path, block),
            }
    # BERT / HF ViT: layer.intermediate.dense -> act -> layer.output.dense
    inter, out = ch.get("intermediate"), ch.get("output")
    if inter is not None and out is not None:
        di, do = getattr(inter, "dense", None), getattr(out, "dense", None)
        if di is not None and do is not None and _is_proj(di) and _is_proj(do):
            return {
                "kind": "intermediate_output",
                "fc_in": "intermediate.dense",
                "fc_out": "output.dense",
                "d_ff": _out_features(di),
                "act": _activation(model, _join(path, "intermediate"), inter),
            }
    return None


def find_gated_ffns(model: nn.Module, tower_of: Callable[[str], str] | None = None) -> list[GatedFFN]:
    """Every self-gated FFN of ``model`` in module order. ``tower_of`` overrides tower classification."""
    tower_of = tower_of or tower_classifier(model)
    out = []
    for path, block in model.named_modules():
        m = _match_gated(model, path, block)
        if m is None:
            continue
        gate, up, down = (_join(path, m[k]) for k in ("gate", "up", "down"))
        out.append(
            GatedFFN(
                name=path,
                tower=tower_of(path),
                activation=m["act"],
                layout=m["layout"],
                gate=gate,
                up=up,
                down=down,
                d_ff=m["d_ff"],
                gate_rows=m.get("gate_rows"),
                up_rows=m.get("up_rows"),
                modules={
                    "gate": block.get_submodule(m["gate"]),
                    "up": block.get_submodule(m["up"]),
                    "down": block.get_submodule(m["down"]),
                    "block": block,
                },
                kind=m["kind"],
                chunk_dim=m.get("chunk_dim", -1),
            )
        )
    return out


def find_mlps(model: nn.Module, tower_of: Callable[[str], str] | None = None) -> list[PlainMLP]:
    """Every non-gated MLP of ``model``: what NA-LoRA cannot touch (plain LoRA can)."""
    tower_of = tower_of or tower_classifier(model)
    out = []
    for path, block in model.named_modules():
        if _match_gated(model, path, block) is not None:
            continue
        m = _match_plain(model, path, block)
        if m is None:
            continue
        out.append(
            PlainMLP(
                name=path,
                tower=tower_of(path),
                activation=m["act"],
                fc_in=_join(path, m["fc_in"]),
                fc_out=_join(path, m["fc_out"]),
                d_ff=m["d_ff"],
                modules={
                    "fc_in": block.get_submodule(m["fc_in"]),
                    "fc_out": block.get_submodule(m["fc_out"]),
                    "block": block,
                },
                kind=m["kind"],
            )
        )
    return out
