"""The distilled gated vision tower (benchmarks/vlm/distill.py), at toy size on CPU."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from PIL import Image

from benchmarks.vlm import distill
from benchmarks.vlm.distill import DistillConfig, StudentConfig
from benchmarks.vlm.tiny import tiny_dinov2

TINY_STUDENT = StudentConfig(embed_dim=32, depth=2, num_heads=2, patch_size=7, mlp_hidden=48)


def _images(n: int, seed: int, size: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    imgs, labels = [], []
    for i in range(n):
        label = i % 3
        arr = (torch.rand(size, size, 3, generator=g) * 80 + 60 * label).clamp(0, 255).to(torch.uint8).numpy()
        imgs.append(Image.fromarray(arr, mode="RGB"))
        labels.append(label)
    return {"image": imgs, "label": labels}


class _Poisoned:
    """A split that fails the build if training reads its images (only the quality record may)."""

    def __init__(self, data: dict):
        self.data, self.reads = data, 0

    def __len__(self) -> int:
        return len(self.data["label"])

    def __getitem__(self, key: str):
        if key == "image":
            self.reads += 1
        return self.data[key]


def _sources():
    return {"src-a": {"train": _images(12, 0, 20), "validation": _Poisoned(_images(6, 1, 20))},
            "src-b": {"train": _images(9, 2, 32), "validation": _Poisoned(_images(6, 3, 32))}}


def _teacher():
    return tiny_dinov2(seed=5), {"name": "tiny-dinov2", "main_file": {"sha256": "ab" * 32}}


def _build(out, seed=0, sources=None, steps=3, **over):
    cfg = DistillConfig(steps=steps, batch_size=4, seed=seed, image_size=28, eval_per_source=5,
                        knn_bank_per_source=8, knn_k=3, student=TINY_STUDENT, **over)
    return distill.build_vit_s_swiglu(out, config=cfg, device="cpu", sources=sources or _sources(), teacher=_teacher,
                                      log=lambda *_: None)


def test_teacher_mapping_is_exact():
    """With the teacher's own (plain GELU) MLP copied too, a timm ViT reproduces DINOv2's tokens:
    every mapped tensor (qkv order, layer scale, norms, position embedding) lands in the right place."""
    from timm.models.vision_transformer import VisionTransformer

    teacher = tiny_dinov2(seed=1)
    vit = VisionTransformer(img_size=28, patch_size=7, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2,
                            init_values=1.0, num_classes=0).eval()
    state, fresh = distill.teacher_to_student_state(teacher, vit)
    t = teacher.state_dict()
    for i in range(2):
        for p in ("weight", "bias"):
            state[f"blocks.{i}.mlp.fc1.{p}"] = t[f"encoder.layer.{i}.mlp.fc1.{p}"]
            state[f"blocks.{i}.mlp.fc2.{p}"] = t[f"encoder.layer.{i}.mlp.fc2.{p}"]
    assert sorted(fresh) == sorted(k for k in state if ".mlp." in k)
    vit.load_state_dict(state)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(x), teacher(pixel_values=x).last_hidden_state,
                                   atol=1e-4, rtol=1e-4)


def test_student_starts_as_teacher_without_ffn_and_is_gated():
    from nalora.discovery import find_gated_ffns, find_mlps

    student = distill.make_student(TINY_STUDENT, 28)
    fresh = distill.init_from_teacher(student, tiny_dinov2(seed=1))
    assert fresh and all(".mlp." in k for k in fresh)
    assert all(float(b.mlp.fc2.weight.detach().abs().sum()) == 0 for b in student.blocks)
    gated = find_gated_ffns(student)
    assert [f.name for f in gated] == ["blocks.0.mlp", "blocks.1.mlp"]
    assert all(f.tower == "vision" and f.activation == "silu" and f.kind == "timm_swiglu" and f.d_ff == 48
               for f in gated)
    assert not find_mlps(student)


def test_default_student_matches_dinov2_s_size():
    student = distill.make_student(StudentConfig(), 224)
    n = sum(p.numel() for p in student.parameters())
    assert student.blocks[0].mlp.fc1_g.out_features == 1024
    assert abs(n - 22.06e6) / 22.06e6 < 0.03  # DINOv2-S: 22.06 M (with its 518 px position table)


def test_augment_is_seeded_and_in_range():
    x = torch.randint(0, 256, (5, 3, 20, 20), dtype=torch.uint8)
    a = distill.augment(x, 28, (0.35, 1.0), torch.Generator().manual_seed(0))
    b = distill.augment(x, 28, (0.35, 1.0), torch.Generator().manual_seed(0))
    c = distill.augment(x, 28, (0.35, 1.0), torch.Generator().manual_seed(1))
    assert a.shape == (5, 3, 28, 28) and torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= 0 and float(a.max()) <= 1


def test_knn_accuracy():
    bank = torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    query = torch.tensor([[1.0, 0.05], [0.05, 1.0]])
    assert distill.knn_accuracy(bank, labels, query, torch.tensor([0, 1]), k=2) == 1.0
    assert distill.knn_accuracy(bank, labels, query, torch.tensor([1, 0]), k=2) == 0.0


def test_build_deterministic_with_provenance_and_quality(tmp_path):
    srcs = _sources()
    prov = _build(tmp_path / "a", sources=srcs)
    _build(tmp_path / "b")
    _build(tmp_path / "c", seed=1)
    sha = {k: hashlib.sha256((tmp_path / k / distill.WEIGHTS).read_bytes()).hexdigest() for k in "abc"}
    assert sha["a"] == sha["b"] != sha["c"]
    assert prov["weights_sha256"] == sha["a"]
    assert not torch.are_deterministic_algorithms_enabled()  # the build's setting does not leak
    # Training reads only train images; validation images are read by the quality record alone (once).
    assert all(s["validation"].reads == 1 for s in srcs.values())
    saved = json.loads((tmp_path / "a" / distill.PROVENANCE_JSON).read_text())
    assert saved["teacher"]["name"] == "tiny-dinov2" and saved["teacher"]["sha256"] == "ab" * 32
    assert saved["data"] == {"src-a": {"split": "train", "n_images": 12}, "src-b": {"split": "train", "n_images": 9}}
    assert saved["held_out"] == {"src-a": "validation", "src-b": "validation"}
    assert saved["config"]["steps"] == 3 and saved["config"]["seed"] == 0
    assert "git_commit" in saved["code"] and len(saved["code"]["distill_py_sha256"]) == 64
    q = json.loads((tmp_path / "a" / distill.QUALITY_JSON).read_text())
    assert q["held_out_split"] == "validation" and q["knn"]["k"] == 3
    for rec in q["per_source"].values():
        assert set(rec) == {"n_validation", "n_bank", "cos_cls", "cos_patch", "knn_acc_student", "knn_acc_teacher"}
        assert -1 <= rec["cos_cls"] <= 1 and 0 <= rec["knn_acc_teacher"] <= 1
    # The saved student reloads at another size (position embedding resampled) and runs.
    student = distill.load_student(tmp_path / "a", image_size=42)
    assert student.forward_features(torch.randn(1, 3, 42, 42)).shape == (1, 1 + 36, 32)


def test_distillation_moves_student_towards_teacher(tmp_path):
    """A plausible bug (no optimiser step, wrong loss sign) leaves the loss flat or rising."""
    prov = _build(tmp_path / "a", steps=30)
    hist = prov["loss_history"]
    assert hist[-1]["loss"] < hist[0]["loss"]


def test_time_budget_stops_training_and_is_recorded(tmp_path, monkeypatch):
    """A build that would overrun a GPU command's wall-clock limit stops and says how far it got."""
    clock = iter(range(0, 10_000, 10))  # every call to the clock advances it by 10 s
    monkeypatch.setattr(distill.time, "monotonic", lambda: float(next(clock)))
    prov = _build(tmp_path / "a", steps=30, max_minutes=0.5)
    assert 0 < prov["steps_done"] < 30 and prov["config"]["max_minutes"] == 0.5
    assert prov["loss_history"][-1]["step"] == prov["steps_done"] - 1
    assert _build(tmp_path / "b", steps=5)["steps_done"] == 5


def test_bad_options_fail_before_work(tmp_path):
    with pytest.raises(ValueError, match="unknown distillation option 'stepz'"):
        DistillConfig.from_dict({"stepz": 3})
    with pytest.raises(ValueError, match="not a multiple of patch size"):
        distill.build_vit_s_swiglu(tmp_path, config=DistillConfig(image_size=30, student=TINY_STUDENT),
                                   sources=_sources(), teacher=_teacher)


def test_composed_vlm_gated_in_both_towers_and_nalora_injects_both():
    from benchmarks.vlm.factory import build_vlm
    from nalora import discovery, injection

    model = build_vlm("tiny-vit-swiglu+tiny-byte-llama", align=False).model
    gated = discovery.find_gated_ffns(model)
    assert {f.tower for f in gated} == {"vision", "language"}
    assert sorted(f.name for f in gated if f.tower == "vision") == ["vision_tower.blocks.0.mlp",
                                                                    "vision_tower.blocks.1.mlp"]
    assert not [m for m in discovery.find_mlps(model) if m.tower == "vision"]
    adapted = injection.inject(model, "nalora", targets=("gate", "up", "down"), rank=2, trainable=["connector"])
    assert {r["tower"] for r in adapted.report} == {"vision", "language"}
    names = [n for n, p in adapted.model.named_parameters() if p.requires_grad]
    assert any("vision_tower" in n and "fc1_g" in n and "lora" in n for n in names)
    assert any("language_model" in n and "gate_proj" in n and "lora" in n for n in names)


def test_fetch_builds_into_asset_cache_and_loads_as_encoder(tmp_path, monkeypatch):
    """`nalora-bench fetch vit-s-swiglu` path: converter -> cache entry with the build's provenance ->
    `load_encoder` (the composed VLM's loader) at another image size."""
    from benchmarks.assets.cache import Cache
    from benchmarks.assets.fetch import fetch_one
    from benchmarks.vlm.build import load_encoder

    monkeypatch.setenv("NALORA_BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(distill, "default_sources", lambda names: _sources())
    monkeypatch.setattr(distill, "_default_teacher", _teacher)
    monkeypatch.setenv(distill.ENV_CONFIG, json.dumps({
        "device": "cpu", "steps": 2, "batch_size": 4, "image_size": 28, "eval_per_source": 4,
        "knn_bank_per_source": 6, "knn_k": 3, "student": TINY_STUDENT.__dict__}))
    rec = fetch_one(distill.ASSET_NAME, Cache(), log=lambda *_: None)
    assert rec["main_file"] == "model/model.safetensors"
    assert rec["info"]["teacher"]["sha256"] == "ab" * 32 and rec["info"]["config"]["steps"] == 2
    # Built on one machine, imported into another cache from a tar of the entry + its record.
    import tarfile

    with tarfile.open(tmp_path / "e.tar", "w") as tf:
        tf.add(tmp_path / "cache" / "entries" / distill.ASSET_NAME, f"entries/{distill.ASSET_NAME}")
    (tmp_path / "rec.json").write_text(json.dumps(rec))
    monkeypatch.setenv("NALORA_BENCH_CACHE", str(tmp_path / "cache2"))
    distill.main(["--import", str(tmp_path / "e.tar"), str(tmp_path / "rec.json")])
    assert not list((tmp_path / "cache2" / ".tmp").iterdir())
    bad = dict(rec, files={**rec["files"], "model/model.safetensors": {"size": 1, "sha256": "0"}})
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="model/model.safetensors does not match"):
        distill.import_entry(tmp_path / "e.tar", tmp_path / "bad.json")
    enc = load_encoder(distill.ASSET_NAME, image_size=35)
    assert enc.provenance["name"] == distill.ASSET_NAME and set(enc.provenance["quality"]) >= {"cos_cls"}
    assert enc.tower.forward_features(torch.randn(1, 3, 35, 35)).shape == (1, 26, 32)


def test_asset_converter_refuses_cpu_without_opt_in(monkeypatch, tmp_path):
    monkeypatch.delenv(distill.ENV_CONFIG, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs a GPU"):
        distill.convert_asset(tmp_path)


def test_quality_markdown_reports_every_source_and_the_build(tmp_path):
    prov = _build(tmp_path / "a", sources=_sources())
    md = distill.quality_markdown({"info": prov})
    for name, rec in prov["quality"]["per_source"].items():
        assert f"| {name} | {rec['n_validation']} | {rec['n_bank']} | {rec['cos_cls']:.4f} |" in md
    assert f"{prov['steps_done']} of 3 steps" in md and md.count("\n| ") == 1 + len(prov["quality"]["per_source"]) + 1
