"""Compact run records: side files of per-layer histories, the report reading them, `nalora-bench compact`."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import test_report as trp

from benchmarks.report.leaderboard import load_records
from benchmarks.report.plots import history_series
from benchmarks.runner import sidefile
from benchmarks.runner.health import compact as compact_examples
from benchmarks.runner.store import ResultStore, atomic_write_text, dump_json, to_jsonable

LAYERS = 30  # smollm2-135m: 30 gated FFNs
REFRESHES = 30  # 300 optimiser steps, a mask refresh every 10
N_TEST, N_VAL = 10_000, 500  # Fashion-MNIST's test split is the largest of the campaign grid
# 1 byte per test and validation example (the paired bootstrap's correct bits) plus what every record holds
# (config, metrics, meta, provenance, train/validation curves: about 8 KB in the committed v2 records).
# With 1,500 runs that is at most 36 MB of records, against about 150 KB per run before side files.
RECORD_BUDGET = 24 * 1024


def real_shaped_record() -> dict:
    """A NA-LoRA run with the shapes of a real smollm2-135m / Fashion-MNIST record (float32 values)."""
    rng = np.random.default_rng(0)

    def f32(*shape):
        return rng.random(shape, dtype=np.float32).tolist()

    rec = to_jsonable(trp._record("smollm2-135m", "t1", "nalora", 1e-3, 0))
    layers = [f"model.layers.{i}.mlp" for i in range(LAYERS)]
    steps = list(range(0, 10 * REFRESHES, 10))
    rec["nalora"] = {"history": {"step": steps, "layers": layers, "rho": f32(REFRESHES), "kept_fraction": f32(REFRESHES, LAYERS),
                                 "gamma_mean": f32(REFRESHES, LAYERS), "turnover": f32(REFRESHES, LAYERS),
                                 "occupancy": f32(REFRESHES, LAYERS, 3)}}
    rec["adapted_modules"] = [{"applied": "nalora" if role == "gate" else "lora", "kind": "gated", "layout": "separate",
                               "name": f"{layer}.{role}_proj", "role": role, "tower": "language"}
                              for layer in layers for role in ("gate", "up", "down")]
    rec["diagnostics"]["selection_misalignment"]["per_layer"] = {
        layer: {"misalignment": m, "pairs": 1449984.0, "regime_change": c} for layer, m, c in zip(layers, f32(LAYERS), f32(LAYERS))}
    rec["per_example"] = {split: compact_examples({"id": [f"{split}-{i}" for i in range(n)],
                                                   "pred": rng.integers(0, 10, n).tolist(), "correct": (rng.random(n) < 0.7).tolist()})
                          for split, n in (("test", N_TEST), ("validation", N_VAL))}
    rec["history"] = {"train_loss": [[s + 10, x] for s, x in zip(steps, f32(REFRESHES))],
                      "lr": [[s + 10, x] for s, x in zip(steps, f32(REFRESHES))],
                      "validation": [[s, {"acc": x}] for s, x in zip((100, 200, 300), f32(3))]}
    rec["provenance"]["packages"] = {f"package-{i}": f"{i}.{i}.{i}" for i in range(25)}
    sha = lambda i: hashlib.sha256(str(i).encode()).hexdigest()  # noqa: E731
    rec["provenance"]["assets"] = {name: {"name": name, "kind": "model", "main_file": {"path": "model.safetensors", "sha256": sha(name)},
                                          "sources": [{"package": f"{name}-part{i}", "sha256": sha(f"{name}{i}")} for i in range(5)]}
                                   for name in ("smollm2-135m", "fashion-mnist")}
    rec["provenance"]["files"] = [{"path": f"/cache/entries/x/file{i}", "sha256": sha(i), "bytes": 1000 * i, "role": "weights"}
                                  for i in range(12)]
    return rec


def test_store_writes_compact_record_and_report_reads_the_same_histories(tmp_path):
    rec = real_shaped_record()
    path = ResultStore(tmp_path).write(rec)
    on_disk = json.loads(path.read_text())
    assert "adapted_modules" not in on_disk and on_disk["nalora"] == {}
    assert all("pred" not in pe for pe in on_disk["per_example"].values())
    assert on_disk["per_example"]["test"]["correct"] == rec["per_example"]["test"]["correct"]  # the bootstrap's bits stay
    assert "per_layer" not in on_disk["diagnostics"]["selection_misalignment"]
    # the asset and file checksums go too; what the ledger and tables read of the provenance stays
    assert set(on_disk["provenance"]) == set(rec["provenance"]) - {"assets", "files"}
    assert on_disk["side"]["file"] == sidefile.side_path(path).name
    (loaded,) = load_records(tmp_path)
    assert loaded == rec
    assert history_series(loaded["nalora"]["history"]) == history_series(rec["nalora"]["history"])


def test_compact_record_fits_its_budget(tmp_path):
    rec = real_shaped_record()
    path = ResultStore(tmp_path).write(rec)
    size, side, legacy = path.stat().st_size, sidefile.side_path(path).stat().st_size, len(dump_json(rec))
    assert size <= RECORD_BUDGET, f"record {size} B > budget {RECORD_BUDGET} B"
    assert size + side < legacy / 3, (size, side, legacy)  # what is committed per run shrinks at least 3x


def test_side_file_bytes_are_reproducible(tmp_path):
    rec = real_shaped_record()
    a, b = ResultStore(tmp_path / "a").write(rec), ResultStore(tmp_path / "b").write(rec)
    assert a.read_bytes() == b.read_bytes()
    data = sidefile.side_path(a).read_bytes()
    assert data == sidefile.side_path(b).read_bytes() and data[4:8] == b"\0\0\0\0"  # gzip mtime 0


def test_run_without_bulky_parts_gets_no_side_file(tmp_path):
    rec = trp._record("m", "t3", "lora", 1e-3, 0, status="failed")
    path = ResultStore(tmp_path).write(rec)
    assert "side" not in json.loads(path.read_text()) and not sidefile.side_path(path).exists()


def _damage(results, capsys):
    """Break four NA-LoRA side files in four ways; returns the damaged records' paths."""
    paths = sorted(p for p in (results / "runs").glob("*.json") if "side" in json.loads(p.read_text())
                   and json.loads(p.read_text())["config"]["method"] == "nalora")[:5]
    side = [sidefile.side_path(p) for p in paths]
    side[0].unlink()                                              # missing
    data = bytearray(side[1].read_bytes())
    data[len(data) // 2] ^= 1
    side[1].write_bytes(bytes(data))                              # one bit flipped
    side[2].write_bytes(side[2].read_bytes()[:20])                # truncated
    shutil.copyfile(side[4], side[3])                             # another run's side file
    capsys.readouterr()
    return paths[:4]


def test_missing_or_damaged_side_file_is_one_warning_and_tables_are_unchanged(tmp_path, capsys):
    root = tmp_path / "r"
    trp.make_results(root)
    trp.report(root)
    before = trp.snapshot(root)
    damaged = _damage(root, capsys)
    trp.report(root, plots=True)  # plots skip the damaged runs' histories; nothing breaks
    err = capsys.readouterr().err.splitlines()
    assert trp.snapshot(root) == before
    for p in damaged:
        lines = [ln for ln in err if str(p) in ln]
        assert len(lines) == 1 and "side file" in lines[0] and "left out of the plots" in lines[0], err
    assert len([ln for ln in err if "side file" in ln]) == len(damaged)
    recs = {r["run_id"]: r for r in load_records(root)}
    assert all(recs[p.stem]["nalora"] == {} for p in damaged)
    assert sum(bool((r.get("nalora") or {}).get("history")) for r in recs.values()) > 0  # the others are attached


def test_side_file_is_written_before_the_record_and_an_orphan_is_harmless(tmp_path, monkeypatch, capsys):
    from benchmarks.runner import store as store_mod

    class Crash(Exception):
        pass

    def crash_on_record(path, text):
        raise Crash(path)  # killed after the side file was written, before the record

    rec = real_shaped_record()
    store = ResultStore(tmp_path)
    with monkeypatch.context() as m:
        m.setattr(store_mod, "atomic_write_text", crash_on_record)
        with pytest.raises(Crash):
            store.write(rec)
    assert sidefile.side_path(store.path(rec["run_id"])).exists() and not store.is_done(rec["run_id"])
    capsys.readouterr()
    assert load_records(tmp_path) == [] and capsys.readouterr().err == ""  # the orphaned side file: no record, no warning
    store.write(rec)  # the rerun replaces it
    assert load_records(tmp_path) == [rec]


def _legacy_results(root):
    """A results folder as committed before side files: full records in runs/ and tune/runs/."""
    scratch = root.parent / "scratch"  # make_results writes through the store (compact); keep only its records
    recs = trp.make_results(scratch)
    shutil.rmtree(scratch)
    recs.append(real_shaped_record())
    for rec in recs:
        atomic_write_text(root / "runs" / f"{rec['run_id']}.json", dump_json(rec))
    tune = to_jsonable(trp._record("m", "dev", "nalora", 1e-3, 0, phase="tune"))
    atomic_write_text(root / "tune" / "runs" / f"{tune['run_id']}.json", dump_json(tune))
    return {r["run_id"]: to_jsonable(r) for r in [*recs, tune]}


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and "runs" in p.parts}


def test_compact_migration_keeps_ids_and_report_and_is_idempotent(tmp_path, capsys):
    from benchmarks.cli import main

    root = tmp_path / "r"
    originals = _legacy_results(root)
    names = sorted(p.name for p in root.rglob("*.json"))
    trp.report(root)
    before = trp.snapshot(root)
    legacy_bytes = sum(len(b) for b in _files(root).values())
    bulky = sum(sidefile.compact(r)[1] is not None for r in originals.values())
    assert 0 < bulky < len(originals)  # records with nothing to move are already compact
    assert main(["compact", "--results", str(root)]) == 0
    assert f"{bulky} record(s) rewritten, {len(originals) - bulky} already compact" in capsys.readouterr().out
    assert sorted(p.name for p in root.rglob("*.json")) == names  # run ids (file names) unchanged
    for p in root.rglob("*.json"):
        if "runs" in p.parts:
            full = sidefile.read_full(p)
            assert full == originals[p.stem] and full["run_id"] == p.stem
    assert sum(len(b) for b in _files(root).values()) < legacy_bytes
    trp.report(root)
    assert trp.snapshot(root) == before
    compacted = _files(root)
    assert main(["compact", "--results", str(root)]) == 0
    assert f"0 record(s) rewritten, {len(originals)} already compact" in capsys.readouterr().out
    assert _files(root) == compacted


def test_compact_leaves_a_record_with_a_missing_side_file_alone(tmp_path, capsys):
    from benchmarks.cli import main

    root = tmp_path / "r"
    _legacy_results(root)
    main(["compact", "--results", str(root)])
    rec_path = next(p for p in (root / "runs").glob("*.json") if "side" in json.loads(p.read_text()))
    sidefile.side_path(rec_path).unlink()
    text = rec_path.read_text()
    capsys.readouterr()
    assert main(["compact", "--results", str(root)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and str(rec_path) in err[0] and "missing" in err[0]
    assert rec_path.read_text() == text


def test_compact_without_runs_is_one_line(tmp_path, capsys):
    from benchmarks.cli import main

    assert main(["compact", "--results", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no run records" in err[0]
