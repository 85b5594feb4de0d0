"""Self-gated activations ``phi(z) = z * s(z)`` and their effective-homogeneity partition.

NALORA.md: local effective homogeneity ``k(z) = z phi'(z) / phi(z)``; for a self-gated activation
this is ``1 + z s'(z) / s(z)``, which we evaluate in that form because it is finite at ``z = 0``
and stable for large ``|z|``. The coarse partition is suppressed ``z < z_min`` (phi' = 0),
selecting ``z_min <= z < z_lin`` and linear ``z >= z_lin`` (``|k - 1| <= tol`` for all larger z).
"""

from __future__ import annotations

import math
from functools import cache
from typing import Any

import torch
from torch import nn

SELF_GATED = ("silu", "gelu", "gelu_tanh", "quick_gelu")
OTHER = ("relu", "identity", "sigmoid", "tanh")
KNOWN = SELF_GATED + OTHER

SUPPRESSED, SELECTING, LINEAR = 0, 1, 2

# Exact names (config strings, lower-cased, "-" -> "_") -> canonical names: the one activation table.
_ALIASES = {
    "silu": "silu",
    "swish": "silu",
    "swiglu": "silu",
    "gelu": "gelu",
    "gelu_python": "gelu",
    "geglu": "gelu",
    "gelu_erf": "gelu",
    "gelu_tanh": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_python_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_accurate": "gelu_tanh",
    "quick_gelu": "quick_gelu",
    "quickgelu": "quick_gelu",
    "relu": "relu",
    "reglu": "relu",
    "identity": "identity",
    "linear": "identity",
    "none": "identity",
    "bilinear": "identity",
    "sigmoid": "sigmoid",
    "glu": "sigmoid",
    "tanh": "tanh",
}

# Substrings of an activation module's class name (or a function's __name__), lower-cased without "_",
# tried in order: the first match names it ("gelutanh" before "gelu").
_CLASS_PATTERNS = (
    ("quickgelu", "quick_gelu"),
    ("gelutanh", "gelu_tanh"),
    ("newgelu", "gelu_tanh"),
    ("fastgelu", "gelu_tanh"),
    ("accurategelu", "gelu_tanh"),
    ("tanhgelu", "gelu_tanh"),
    ("gelu", "gelu"),
    ("silu", "silu"),
    ("swish", "silu"),
    ("sigmoid", "sigmoid"),
)
_CLASS_EXACT = {"relu": "relu", "identity": "identity", "linearactivation": "identity"}


def _name_of_callable(x: Any) -> str:
    """Canonical name of an activation module or function, or its lower-cased class name if unknown."""
    if isinstance(x, nn.Identity):
        return "identity"
    # Class name for modules, __name__ for plain functions (F.silu, F.gelu, torch.sigmoid).
    raw = type(x).__name__ if isinstance(x, nn.Module) else getattr(x, "__name__", type(x).__name__)
    key = raw.lower().replace("_", "")
    found = _CLASS_EXACT.get(key) or next((canon for pat, canon in _CLASS_PATTERNS if pat in key), None)
    if found == "gelu" and (getattr(x, "approximate", None) == "tanh" or getattr(x, "use_gelu_tanh_python", False)):
        return "gelu_tanh"
    return found or raw.lower()


def normalize_activation(module_or_name: Any, *, strict: bool = False) -> str:
    """Canonical activation name of a config string, activation module or function.

    ``"swish" -> "silu"``, ``"gelu_pytorch_tanh" -> "gelu_tanh"``, ``nn.GELU(approximate="tanh") ->
    "gelu_tanh"``, ``None -> "unknown"``. An unknown activation comes back as its lower-cased name (never
    silently "silu"); with ``strict=True`` it is a ``ValueError`` instead (the activation math needs a
    known one).
    """
    if module_or_name is None:
        name = "unknown"
    elif isinstance(module_or_name, str):
        key = module_or_name.strip().lower().replace("-", "_")
        name = _ALIASES.get(key, key)
    else:
        name = _name_of_callable(module_or_name)
    if strict and name not in KNOWN:
        raise ValueError(f"unknown activation {module_or_name!r}; known: {', '.join(sorted(_ALIASES))}")
    return name


def _canonical(name: str) -> str:
    return normalize_activation(name, strict=True)


_QUICK = 1.702
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_TANH_C = 0.044715


def has_partition(name: str) -> bool:
    """True for self-gated activations, where the three-regime partition is meaningful."""
    return _canonical(name) in SELF_GATED


def _tanh_arg(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """u(z) and u'(z) of the tanh GELU approximation ``s = (1 + tanh u) / 2``."""
    u = _SQRT_2_OVER_PI * (z + _TANH_C * z**3)
    du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _TANH_C * z**2)
    return u, du


# s(z) per canonical activation (ReLU: the step z > 0; identity: 1; sigmoid-GLU: the gate value itself).
_SELECTION = {
    "silu": torch.sigmoid,
    "gelu": torch.special.ndtr,
    "gelu_tanh": lambda z: 0.5 * (1.0 + torch.tanh(_tanh_arg(z)[0])),
    "quick_gelu": lambda z: torch.sigmoid(_QUICK * z),
    "relu": lambda z: (z > 0).to(z.dtype),
    "identity": torch.ones_like,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}


def selection(name: str, z: torch.Tensor) -> torch.Tensor:
    """The selection weight ``s(z)`` (ReLU: the step ``z > 0``; identity: 1; sigmoid-GLU: sigmoid)."""
    return _SELECTION[_canonical(name)](z)


def _gelu_log_derivative(z: torch.Tensor) -> torch.Tensor:
    log_pdf = -0.5 * z * z - 0.5 * math.log(2.0 * math.pi)
    return torch.exp(log_pdf - torch.special.log_ndtr(z))


def _gelu_tanh_log_derivative(z: torch.Tensor) -> torch.Tensor:
    u, du = _tanh_arg(z)  # s'/s = (1 - tanh u) u'
    return (1.0 - torch.tanh(u)) * du


# s'(z) / s(z) for the self-gated activations, in forms that do not overflow.
_LOG_DERIVATIVE = {
    "silu": lambda z: torch.sigmoid(-z),
    "quick_gelu": lambda z: _QUICK * torch.sigmoid(-_QUICK * z),
    "gelu": _gelu_log_derivative,
    "gelu_tanh": _gelu_tanh_log_derivative,
}


def _log_derivative(act: str, z: torch.Tensor) -> torch.Tensor:
    """``s'(z) / s(z)`` for the self-gated activations, in a form that does not overflow."""
    return _LOG_DERIVATIVE[act](z)


def phi(name: str, z: torch.Tensor) -> torch.Tensor:
    """The activation ``phi(z)``."""
    act = _canonical(name)
    if act == "sigmoid":
        return torch.sigmoid(z)
    if act == "identity":
        return z
    if act == "tanh":
        return torch.tanh(z)
    return z * selection(act, z)


def dphi(name: str, z: torch.Tensor) -> torch.Tensor:
    """Closed-form derivative ``phi'(z)``: ``s + z s'`` for self-gated activations."""
    act = _canonical(name)
    if act in SELF_GATED:
        s = selection(act, z)
        return s * (1.0 + z * _log_derivative(act, z))
    if act == "relu":
        return (z > 0).to(z.dtype)
    if act == "identity":
        return torch.ones_like(z)
    if act == "tanh":
        return 1.0 - torch.tanh(z) ** 2
    s = torch.sigmoid(z)
    return s * (1.0 - s)


def homogeneity(name: str, z: torch.Tensor) -> torch.Tensor:
    """Local effective homogeneity ``k(z) = z phi'(z) / phi(z)`` (ReLU and identity: 1)."""
    act = _canonical(name)
    if act in SELF_GATED:
        return 1.0 + z * _log_derivative(act, z)
    if act in ("relu", "identity"):
        return torch.ones_like(z)
    if act == "tanh":
        t = torch.tanh(z)
        return torch.where(z == 0, torch.ones_like(z), z * (1.0 - t * t) / torch.where(z == 0, 1.0, t))
    return z * torch.sigmoid(-z)  # sigmoid: z s'/s = z (1 - s)


def _bisect(f, lo: float, hi: float, iters: int = 200) -> float:
    """Root of a scalar function with a sign change on [lo, hi], to float64 precision."""
    flo = f(lo)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        fm = f(mid)
        if (fm > 0) == (flo > 0):
            lo, flo = mid, fm
        else:
            hi = mid
        if hi - lo < 1e-15:
            break
    return 0.5 * (lo + hi)


def _scalar(fn, act: str):
    return lambda x: float(fn(act, torch.tensor(x, dtype=torch.float64)))


@cache
def regime_thresholds(name: str, tol: float = 0.1) -> tuple[float, float]:
    """``(z_min, z_lin)`` in float64: ``phi'(z_min) = 0``; ``|k(z) - 1| <= tol`` for every ``z >= z_lin``."""
    act = _canonical(name)
    if act not in SELF_GATED:
        raise ValueError(f"activation {act!r} has no effective-homogeneity partition")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    d = _scalar(dphi, act)
    z_min = _bisect(d, -4.0, 0.0)  # phi' < 0 left of z_min, > 0 right of it, for all four
    k = _scalar(homogeneity, act)

    def dev(x: float) -> float:
        return abs(k(x) - 1.0) - tol

    # k -> 1 from above as z -> +inf; the last grid point where |k-1| > tol brackets z_lin.
    grid = torch.linspace(-20.0, 60.0, 80001, dtype=torch.float64)
    bad = (homogeneity(act, grid) - 1.0).abs() > tol
    last = int(torch.nonzero(bad).max())
    z_lin = _bisect(dev, float(grid[last]), float(grid[last + 1]))
    return z_min, z_lin


@cache
def max_homogeneity(name: str) -> tuple[float, float]:
    """``(k_max, z_at)``: the peak of k over z > 0 (a NALORA.md reference-table column)."""
    act = _canonical(name)
    if act not in SELF_GATED:
        raise ValueError(f"activation {act!r} has no effective-homogeneity partition")
    grid = torch.linspace(0.0, 10.0, 100001, dtype=torch.float64)
    i = int(torch.argmax(homogeneity(act, grid)))
    # refine the grid maximum by golden-section search (k is unimodal on z > 0)
    lo, hi = float(grid[max(i - 1, 0)]), float(grid[i + 1])
    k = _scalar(homogeneity, act)
    g = (math.sqrt(5) - 1) / 2
    for _ in range(100):
        a, b = hi - g * (hi - lo), lo + g * (hi - lo)
        if k(a) > k(b):
            hi = b
        else:
            lo = a
    z_at = 0.5 * (lo + hi)
    return k(z_at), z_at


def regime(name: str, z: torch.Tensor, tol: float = 0.1) -> torch.Tensor:
    """Regime of each entry as int64: 0 suppressed, 1 selecting, 2 linear."""
    z_min, z_lin = regime_thresholds(_canonical(name), tol)
    return (z >= z_min).long() + (z >= z_lin).long()
