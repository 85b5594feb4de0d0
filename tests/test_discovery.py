"""Gated-FFN / plain-MLP discovery on every supported architecture (tiny random-weight models)."""

from __future__ import annotations

import pytest
import tiny_models as tm
import torch
import torch.nn.functional as F
from torch import nn

from nalora.discovery import find_gated_ffns, find_mlps, normalize_activation

# name -> (gated count, plain count, gated towers, plain towers, activation, layout, kind)
EXPECTED = {
    "llama": (2, 0, {"language"}, set(), "silu", "separate", "gate_up_down"),
    "qwen2": (2, 0, {"language"}, set(), "silu", "separate", "gate_up_down"),
    "qwen3": (2, 0, {"language"}, set(), "silu", "separate", "gate_up_down"),
    "mistral": (2, 0, {"language"}, set(), "silu", "separate", "gate_up_down"),
    "gemma3_text": (2, 0, {"language"}, set(), "gelu_tanh", "separate", "gate_up_down"),
    "phi3": (2, 0, {"language"}, set(), "silu", "packed", "fused_gate_up"),
    "qwen2_5_vl": (4, 0, {"language", "vision"}, set(), "silu", "separate", "gate_up_down"),
    "aimv2_vision": (2, 0, {"vision"}, set(), "silu", "separate", "gate_up_down"),
    "pixtral_vision": (2, 0, {"vision"}, set(), "gelu", "separate", "gate_up_down"),
    "eva02_tiny_packed": (2, 0, {"vision"}, set(), "silu", "packed", "timm_glu"),
    "eva02_swiglu": (2, 0, {"vision"}, set(), "silu", "separate", "timm_swiglu"),
    "open_clip_eva02": (2, 1, {"vision"}, {"language"}, "silu", "separate", "timm_swiglu"),
    "clip": (0, 4, set(), {"language", "vision"}, None, None, None),
    "clip_vision": (0, 2, set(), {"vision"}, None, None, None),
    "siglip": (0, 5, set(), {"language", "vision"}, None, None, None),  # 2 text + 2 vision + pooling head
    "dinov2": (0, 2, set(), {"vision"}, None, None, None),
    "dinov2_swiglu": (2, 0, {"vision"}, set(), "silu", "packed", "dinov2_swiglu"),
    "bert": (0, 2, set(), {"language"}, None, None, None),
    "t5": (4, 0, {"language"}, set(), "gelu_tanh", "separate", "t5_gated"),  # 2 encoder + 2 decoder
    "t5_relu": (0, 4, set(), {"language"}, None, None, None),
}

PLAIN_ACT = {
    "clip": "quick_gelu",
    "clip_vision": "quick_gelu",
    "siglip": "gelu_tanh",
    "dinov2": "gelu",
    "bert": "gelu",
    "open_clip_eva02": "gelu",
    "t5_relu": "relu",
}

PHI = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "quick_gelu": lambda z: z * torch.sigmoid(1.702 * z),
    "sigmoid": torch.sigmoid,
}


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def built(request):
    return request.param, tm.FACTORIES[request.param]()


def test_counts_towers_activation_layout(built):
    name, model = built
    n_g, n_p, g_towers, p_towers, act, layout, kind = EXPECTED[name]
    ffns, mlps = find_gated_ffns(model), find_mlps(model)
    assert len(ffns) == n_g and len(mlps) == n_p
    assert {f.tower for f in ffns} == g_towers
    assert {m.tower for m in mlps} == p_towers
    for f in ffns:
        assert (f.activation, f.layout, f.kind) == (act, layout, kind)
        assert (f.gate == f.up) == (layout == "packed")
        assert f.modules["gate"] is model.get_submodule(f.gate)
        assert f.modules["down"] is model.get_submodule(f.down)
    if name in PLAIN_ACT:
        assert mlps and all(m.activation == PLAIN_ACT[name] for m in mlps)
    # A module is never both gated and plain.
    assert not {f.name for f in ffns} & {m.name for m in mlps}


def _manual(ffn, x: torch.Tensor) -> torch.Tensor:
    """down(phi(gate rows) * up rows), computed from the discovered record only."""
    gate_out = ffn.modules["gate"](x)
    if ffn.layout == "packed":
        d = ffn.chunk_dim
        g = gate_out.narrow(d, ffn.gate_rows.start, ffn.d_ff)
        u = gate_out.narrow(d, ffn.up_rows.start, ffn.d_ff)
    else:
        g, u = gate_out, ffn.modules["up"](x)
    h = PHI[ffn.activation](g) * u
    norm = getattr(ffn.modules["block"], "norm", None)  # timm scale-norm between hidden and down
    if norm is not None:
        h = norm(h)
    return ffn.modules["down"](h)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative max error: random tiny models have tiny outputs, so absolute tolerances say nothing."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _in_features(m: nn.Module) -> int:
    return m.in_features if isinstance(m, nn.Linear) else m.in_channels


def test_block_output_matches_manual_gate_up(built):
    _name, model = built
    torch.manual_seed(1)
    for f in find_gated_ffns(model):
        x = torch.randn(3, _in_features(f.modules["gate"]))
        with torch.no_grad():
            assert _rel(f.modules["block"](x), _manual(f, x)) < 1e-5, f.name
        if f.layout == "packed":
            assert f.gate_rows.stop - f.gate_rows.start == f.up_rows.stop - f.up_rows.start == f.d_ff


def test_swapping_gate_and_up_is_detected():
    """The manual check can fail: gate/up swapped gives a different output."""
    f = find_gated_ffns(tm.phi3())[0]
    f.gate_rows, f.up_rows = f.up_rows, f.gate_rows
    x = torch.randn(3, 32)
    with torch.no_grad():
        assert _rel(f.modules["block"](x), _manual(f, x)) > 1e-2


@pytest.mark.parametrize("gate_last", [True, False])
@pytest.mark.parametrize("use_conv", [False, True])
def test_timm_glumlp_gate_last_and_chunk_dim(gate_last, use_conv):
    from timm.layers import GluMlp

    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("mlp", GluMlp(8, 12, act_layer=nn.SiLU, gate_last=gate_last, use_conv=use_conv))
    (f,) = find_gated_ffns(model)
    assert f.layout == "packed" and f.d_ff == 6 and f.chunk_dim == (1 if use_conv else -1)
    assert f.gate_rows == (slice(6, 12) if gate_last else slice(0, 6))
    x = torch.randn(2, 8, 3, 3) if use_conv else torch.randn(4, 8)
    with torch.no_grad():
        assert _rel(f.modules["block"](x), _manual(f, x)) < 1e-5


class _W123(nn.Module):
    def __init__(self, down: str):
        super().__init__()
        up = "w3" if down == "w2" else "w2"
        self.w1 = nn.Linear(8, 12)
        setattr(self, up, nn.Linear(8, 12))
        setattr(self, down, nn.Linear(12, 8))
        self.act_fn = nn.SiLU()
        self.down, self.up = down, up

    def forward(self, x):
        return getattr(self, self.down)(self.act_fn(self.w1(x)) * getattr(self, self.up)(x))


@pytest.mark.parametrize("down", ["w2", "w3"])  # Mixtral-style (w2 down) and xformers-style (w3 down)
def test_w1_w2_w3_down_read_from_shapes(down):
    model = nn.Sequential()
    model.add_module("mlp", _W123(down))
    (f,) = find_gated_ffns(model)
    assert (f.gate, f.down, f.d_ff) == ("mlp.w1", f"mlp.{down}", 12)
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert _rel(f.modules["block"](x), _manual(f, x)) < 1e-5


def test_default_glumlp_is_sigmoid_glu():
    from timm.layers import GluMlp

    model = nn.Sequential()
    model.add_module("mlp", GluMlp(8, 12))
    assert find_gated_ffns(model)[0].activation == "sigmoid"


def test_qwen2_5_vl_towers_kept_apart():
    model = tm.qwen2_5_vl()
    ffns = find_gated_ffns(model)
    for f in ffns:
        expect = "vision" if ".visual." in f".{f.name}." else "language"
        assert f.tower == expect, f.name
    assert sum(f.tower == "vision" for f in ffns) == 2 and sum(f.tower == "language" for f in ffns) == 2
    assert {f.d_ff for f in ffns if f.tower == "vision"} == {40}


def test_clip_text_tower_is_language():
    mlps = find_mlps(tm.clip())
    assert {m.tower for m in mlps if m.name.startswith("text_model.")} == {"language"}
    assert {m.tower for m in mlps if m.name.startswith("vision_model.")} == {"vision"}


def test_wrapped_image_model_is_vision():
    """A timm model under an arbitrary attribute name (encoder + head) is still the vision tower."""
    wrapper = nn.Module()
    wrapper.encoder = tm.eva02_tiny_packed()
    wrapper.head = nn.Linear(5, 2)
    assert {f.tower for f in find_gated_ffns(wrapper)} == {"vision"}


def test_tower_of_overrides():
    ffns = find_gated_ffns(tm.llama(), tower_of=lambda path: "vision")
    assert {f.tower for f in ffns} == {"vision"}


@pytest.mark.parametrize(
    "given, expected",
    [
        ("swish", "silu"),
        ("SiLU", "silu"),
        ("gelu_pytorch_tanh", "gelu_tanh"),
        ("gelu_new", "gelu_tanh"),
        ("gelu", "gelu"),
        ("quick_gelu", "quick_gelu"),
        ("relu2", "relu2"),  # unknown names pass through, never become "silu"
        (nn.SiLU(), "silu"),
        (nn.GELU(), "gelu"),
        (nn.GELU(approximate="tanh"), "gelu_tanh"),
        (nn.ReLU(), "relu"),
        (nn.Sigmoid(), "sigmoid"),
        (nn.Identity(), "identity"),
        (F.silu, "silu"),
        (None, "unknown"),
    ],
)
def test_normalize_activation(given, expected):
    assert normalize_activation(given) == expected


def test_normalize_transformers_activation_modules():
    from transformers.activations import ACT2FN

    assert normalize_activation(ACT2FN["gelu_pytorch_tanh"]) == "gelu_tanh"
    assert normalize_activation(ACT2FN["silu"]) == "silu"
    assert normalize_activation(ACT2FN["quick_gelu"]) == "quick_gelu"
    assert normalize_activation(ACT2FN["gelu"]) == "gelu"
