"""Activations: closed forms against autograd (float64) and every number of NALORA.md's reference table."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nalora.activations import (
    SELF_GATED,
    dphi,
    has_partition,
    homogeneity,
    max_homogeneity,
    normalize_activation,
    phi,
    regime,
    regime_thresholds,
    selection,
)

# NALORA.md: activation -> (z_min, max k, z at max k, z_lin tol 0.1, z_lin tol 0.05), printed precision.
TABLE = {
    "silu": ("-1.2785", "1.278", "1.278", "3.537", "4.485"),
    "gelu": ("-0.7518", "1.295", "0.840", "2.063", "2.440"),
    "gelu_tanh": ("-0.7525", "1.294", "0.840", "2.068", "2.442"),
}


def _fmt(x: float, printed: str) -> str:
    decimals = len(printed.split(".")[1])
    return f"{x:.{decimals}f}"


@pytest.mark.parametrize("act", sorted(TABLE))
def test_reference_table(act):
    z_min, kmax, z_at, lin10, lin05 = TABLE[act]
    zm, zl = regime_thresholds(act, 0.1)
    k, z = max_homogeneity(act)
    assert _fmt(zm, z_min) == z_min
    assert _fmt(k, kmax) == kmax
    assert _fmt(z, z_at) == z_at
    assert _fmt(zl, lin10) == lin10
    assert _fmt(regime_thresholds(act, 0.05)[1], lin05) == lin05


REFERENCE = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "quick_gelu": lambda z: z * torch.sigmoid(1.702 * z),
    "relu": F.relu,
    "identity": lambda z: z,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
}


def _grid() -> torch.Tensor:
    z = torch.linspace(-8.0, 8.0, 1601, dtype=torch.float64)
    return z[z.abs() > 1e-6]  # relu has no derivative at 0; k is a 0/0 limit there


@pytest.mark.parametrize("act", sorted(REFERENCE))
def test_phi_dphi_homogeneity_match_autograd(act):
    z = _grid().requires_grad_()
    ref = REFERENCE[act](z)
    (grad,) = torch.autograd.grad(ref.sum(), z)
    z = z.detach()
    torch.testing.assert_close(phi(act, z), ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dphi(act, z), grad, rtol=1e-10, atol=1e-12)
    ok = ref.detach().abs() > 1e-8  # deep in the tail the autograd reference itself loses digits
    torch.testing.assert_close(homogeneity(act, z)[ok], (z * grad / ref.detach())[ok], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("act", SELF_GATED)
def test_self_gated_structure(act):
    z = _grid()
    torch.testing.assert_close(phi(act, z), z * selection(act, z), rtol=1e-12, atol=1e-12)
    assert homogeneity(act, torch.zeros(1, dtype=torch.float64)).item() == pytest.approx(1.0)
    # float32 stays finite far in the tails (k uses s'/s, not phi'/phi)
    far = torch.tensor([-60.0, -20.0, 20.0, 60.0])
    assert torch.isfinite(homogeneity(act, far)).all() and torch.isfinite(dphi(act, far)).all()


@pytest.mark.parametrize("act", SELF_GATED)
@pytest.mark.parametrize("tol", [0.1, 0.05])
def test_threshold_definitions(act, tol):
    z_min, z_lin = regime_thresholds(act, tol)
    assert abs(dphi(act, torch.tensor(z_min, dtype=torch.float64)).item()) < 1e-12
    beyond = torch.linspace(z_lin, z_lin + 50, 5001, dtype=torch.float64)
    assert ((homogeneity(act, beyond) - 1).abs() <= tol + 1e-12).all()
    assert (homogeneity(act, torch.tensor(z_lin - 1e-3, dtype=torch.float64)) - 1).abs() > tol


def test_regime_partition():
    z_min, z_lin = regime_thresholds("silu")
    z = torch.tensor([-5.0, z_min - 1e-3, z_min + 1e-3, 0.0, z_lin - 1e-3, z_lin + 1e-3, 9.0], dtype=torch.float64)
    assert regime("silu", z).tolist() == [0, 0, 1, 1, 1, 2, 2]
    assert regime("silu", z).dtype == torch.int64


def test_partition_and_names():
    assert all(has_partition(a) for a in SELF_GATED)
    assert not any(has_partition(a) for a in ("relu", "identity", "sigmoid", "tanh"))
    assert normalize_activation("swish") == "silu"
    assert normalize_activation("gelu_pytorch_tanh") == "gelu_tanh"
    assert normalize_activation("gelu_new") == "gelu_tanh"
    assert normalize_activation("QuickGELU".lower()) == "quick_gelu"
    assert normalize_activation("Gelu-Tanh") == "gelu_tanh"
    assert normalize_activation("mish") == "mish"  # discovery: unknown names pass through, never "silu"
    with pytest.raises(ValueError, match="unknown activation 'mish'"):
        normalize_activation("mish", strict=True)  # the activation math needs a known one
    with pytest.raises(ValueError, match="unknown activation 'mish'"):
        dphi("mish", torch.zeros(1))
    with pytest.raises(ValueError, match="no effective-homogeneity partition"):
        regime_thresholds("relu")


def test_one_activation_table():
    """Discovery, the controller and the package use one normalize_activation (they disagreed once)."""
    import nalora
    import nalora.controller
    import nalora.diagnostics
    import nalora.discovery

    assert nalora.normalize_activation is normalize_activation
    assert nalora.discovery.normalize_activation is normalize_activation
    assert nalora.controller.normalize_activation is normalize_activation
    assert nalora.diagnostics.normalize_activation is normalize_activation
