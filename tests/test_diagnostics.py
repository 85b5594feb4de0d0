"""selection_misalignment: zero for an untouched adapter, positive after training, any gate method."""

from __future__ import annotations

import pytest
import tiny_models as tm
import torch

from nalora import find_gated_ffns, inject
from nalora.activations import selection
from nalora.diagnostics import selection_misalignment


def _batches(n=2):
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(100 + i)
        ids = torch.randint(3, tm.VOCAB, (2, 6), generator=g)
        am = torch.ones(2, 6, dtype=torch.long)
        am[1, 3:] = 0
        out.append({"input_ids": ids, "attention_mask": am})
    return out


def _train(ad, steps=3, lr=5e-2):
    opt = ad.make_optimizer(lr, total_steps=steps)
    ad.model.train()
    for b in _batches(steps):
        ad.model(**b, labels=b["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("factory", [tm.llama, tm.phi3], ids=["separate", "packed"])
def test_zero_for_untrained_adapter_positive_after_training(factory):
    ad = inject(factory(), "lora", targets=("gate",), towers=("language",), rank=4)
    ffns = ad.plan.ffns
    res = selection_misalignment(ad.model, ffns, _batches())
    assert res["misalignment"] == 0.0 and res["regime_change"] == 0.0
    d_ff = ffns[0].d_ff
    real = sum(int(b["attention_mask"].sum()) for b in _batches())
    assert res["per_layer"][ffns[0].name]["pairs"] == real * d_ff  # padding excluded
    _train(ad)
    res = selection_misalignment(ad.model, ffns, _batches())
    assert 0 < res["misalignment"] < 1
    assert 0 <= res["regime_change"] <= 1
    assert ad.model.training  # training mode restored


def test_matches_a_direct_computation():
    ad = inject(tm.llama(), "lora", targets=("gate",), towers=("language",), rank=4)
    _train(ad)
    ffns = ad.plan.ffns
    batch = _batches(1)[0]
    base = ad.model.get_base_model()
    gate = base.get_submodule(ffns[1].gate)
    got = {}
    h = gate.register_forward_hook(lambda m, a, o: got.__setitem__("g", o.detach()))
    ad.model.eval()
    with torch.no_grad():
        ad.model(**batch)
        on = got["g"]
        with ad.model.disable_adapter():
            ad.model(**batch)
        off = got["g"]
    h.remove()
    w = batch["attention_mask"].bool()
    expected = (selection("silu", on) - selection("silu", off)).abs()[w].mean()
    res = selection_misalignment(ad.model, ffns, [batch])
    assert res["per_layer"][ffns[1].name]["misalignment"] == pytest.approx(float(expected), rel=1e-5)


def test_other_gate_methods_and_errors():
    ad = inject(tm.llama(), "dora", targets=("gate",), towers=("language",), rank=4)
    _train(ad)
    assert selection_misalignment(ad.model, ad.plan.ffns, _batches())["misalignment"] > 0
    with pytest.raises(ValueError, match="disable_adapter"):
        selection_misalignment(tm.llama(), ad.plan.ffns, _batches())
    with pytest.raises(ValueError, match="no batches"):
        selection_misalignment(ad.model, ad.plan.ffns, [])


def test_reference_state_for_pissa_and_full_fine_tuning():
    from nalora.diagnostics import snapshot_trainable

    # PiSSA starts with a non-zero adapter on a residual base: "adapter off" is not the pretrained model,
    # the snapshot taken before training is (the initial PiSSA model equals the original up to rounding).
    ad = inject(tm.llama(), "pissa", targets=("gate",), towers=("language",), rank=4)
    ffns = ad.plan.ffns
    ref = snapshot_trainable(ad.model)
    assert selection_misalignment(ad.model, ffns, _batches())["misalignment"] > 1e-3  # the misleading "off"
    assert selection_misalignment(ad.model, ffns, _batches(), reference=ref)["misalignment"] < 1e-6
    _train(ad)
    assert selection_misalignment(ad.model, ffns, _batches(), reference=ref)["misalignment"] > 1e-4

    # Full fine-tuning has no adapter to switch off: measured against its starting weights, restored after.
    full = inject(tm.llama(), "full")
    ffns = find_gated_ffns(full.model)
    ref = snapshot_trainable(full.model)
    assert selection_misalignment(full.model, ffns, _batches(), reference=ref)["misalignment"] == 0.0
    _train(full)
    after = {n: p.detach().clone() for n, p in full.model.named_parameters()}
    assert selection_misalignment(full.model, ffns, _batches(), reference=ref)["misalignment"] > 0
    assert all(torch.equal(p, after[n]) for n, p in full.model.named_parameters())  # trained weights restored
    with pytest.raises(ValueError, match="does not have"):
        selection_misalignment(full.model, ffns, _batches(), reference={"nope": torch.zeros(1)})
