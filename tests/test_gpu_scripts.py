"""The GPU-visit helper that moves results files around (scripts/gpu/slim.sh): nothing may be lost."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((root / "results").rglob("*")) if p.is_file()}


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_slim_keeps_the_visits_records_and_restores_every_file(tmp_path):
    runs = tmp_path / "results/default/runs"
    runs.mkdir(parents=True)
    for i, task in enumerate(["gsm8k", "sarcasm", "gsm8k", "socialiqa"]):
        (runs / f"r{i}.json").write_text(json.dumps({"run_id": f"r{i}", "config": {"task": task}}))
        (runs / f"r{i}.hist.json.gz").write_bytes(b"side %d" % i)
    (tmp_path / "results/default/leaderboard.csv").write_text("run_id\n")
    (tmp_path / "results/default/interrupted.jsonl").write_text('{"task": "gsm8k"}\n')
    (tmp_path / "results/perf/h200").mkdir(parents=True)
    (tmp_path / "results/perf/h200/x.json").write_text("{}")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    before = _tree(tmp_path)
    env = {**os.environ, "PY": sys.executable}
    slim = ["bash", str(REPO / "scripts/gpu/slim.sh")]
    out = subprocess.run(slim + ["default", "gsm8k"], cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert "kept 5 files" in out.stdout
    assert sorted(_tree(tmp_path)) == ["results/default/interrupted.jsonl",
                                       "results/default/runs/r0.hist.json.gz", "results/default/runs/r0.json",
                                       "results/default/runs/r2.hist.json.gz", "results/default/runs/r2.json"]
    refused = subprocess.run(slim + ["default", "gsm8k"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "restore first" in refused.stderr  # never sets aside twice
    (runs / "new.json").write_text("{}")  # a record the visit brought home
    subprocess.run(slim + ["--restore"], cwd=tmp_path, env=env, capture_output=True, check=True)
    after = _tree(tmp_path)
    assert after.pop("results/default/runs/new.json") and after == before
    assert not (tmp_path / ".slim").exists()


def test_collect_adds_new_records_and_takes_a_rerun_over_the_record_it_replaces(tmp_path):
    """A visit's archive holds its whole results folder: records already here are kept, unless the visit ran them
    again (--retry-failed), when the later run replaces the record and its side file."""
    def rec(root: Path, rid: str, status: str, finished: str, side: bytes | None) -> None:
        root.mkdir(parents=True, exist_ok=True)
        (root / f"{rid}.json").write_text(json.dumps({"run_id": rid, "status": status,
                                                      "provenance": {"finished_at": finished}}))
        if side is not None:
            (root / f"{rid}.hist.json.gz").write_bytes(side)

    here, there = tmp_path / "results/default/runs", tmp_path / "visit/default/runs"
    rec(here, "kept", "ok", "2026-12-02T10:00:00+00:00", b"kept")
    rec(here, "rerun", "failed", "2026-12-02T10:00:00+00:00", b"old side")
    rec(here, "older", "ok", "2026-12-02T12:00:00+00:00", b"here")
    rec(there, "kept", "ok", "2026-12-02T10:00:00+00:00", b"kept")
    rec(there, "rerun", "ok", "2026-12-04T02:00:00+00:00", b"new side")
    rec(there, "older", "failed", "2026-12-02T11:00:00+00:00", None)
    rec(there, "new", "ok", "2026-12-04T02:05:00+00:00", b"new")
    (tmp_path / "visit/default/invocations.jsonl").write_text('{"id": "a"}\n')
    (tmp_path / "results/default/interrupted.jsonl").write_text('{"run_id": "x"}\n')
    (tmp_path / "visit/default/interrupted.jsonl").write_text('{"run_id": "x"}\n{"run_id": "y"}\n')
    subprocess.run(["tar", "czf", str(tmp_path / "default.tgz"), "-C", str(tmp_path / "visit"), "default"], check=True)
    out = subprocess.run(["bash", str(REPO / "scripts/gpu/collect.sh"), "default", str(tmp_path / "default.tgz")],
                         cwd=tmp_path, env={**os.environ, "PY": sys.executable, "REPORT": "0"},
                         capture_output=True, text=True, check=True)
    assert "1 new run records, 1 replaced by a later run of the same id (4 in all)" in out.stdout
    status = {p.stem: json.loads(p.read_text())["status"] for p in here.glob("*.json")}
    assert status == {"kept": "ok", "rerun": "ok", "older": "ok", "new": "ok"}
    assert (here / "rerun.hist.json.gz").read_bytes() == b"new side"
    assert (here / "older.hist.json.gz").read_bytes() == b"here"
    assert (tmp_path / "results/default/invocations.jsonl").read_text() == '{"id": "a"}\n'
    assert (tmp_path / "results/default/interrupted.jsonl").read_text() == '{"run_id": "x"}\n{"run_id": "y"}\n'
