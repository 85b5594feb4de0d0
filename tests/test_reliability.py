"""The runner's fault model (docs/fault_model.md), one test per promise, on CPU with tiny models.

Faults that need root-proof conditions (a read-only or full disk) are simulated at the system-call
boundary (``os.open`` raising EROFS / ENOSPC, ``shutil.disk_usage`` reporting no room); process faults
(SIGKILL, a second runner) use real subprocesses.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import test_runner as tr
from conftest import require_assets

from benchmarks.assets.cache import AssetError, Cache, file_table
from benchmarks.runner.sidefile import read_full, side_path
from benchmarks.runner.store import ResultStore, StoreError

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TWO_SEEDS = tr.BASE_SUITE.replace("seeds: [0]", "seeds: [0, 1]")


def run_logged(suite: Path, out: Path, **kw) -> tuple[int, list[str]]:
    """``run_suite`` with the fakes of test_runner, returning (exit code, log lines)."""
    from benchmarks.runner.cli import run_suite

    lines: list[str] = []
    kw.setdefault("resolver", tr.fake_resolver)
    kw.setdefault("injector", tr.stand_in_inject)
    return run_suite(str(suite), out, progress=False, log=lines.append, **kw), lines


class Counting:
    """An injector that counts the runs it trained."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, *a, **kw):
        self.n += 1
        return tr.stand_in_inject(*a, **kw)


def fail_opens_under(monkeypatch, folder: Path, err: int, only: str = "") -> None:
    """Make ``os.open`` fail with ``err`` for files under ``folder`` (whose name contains ``only``)."""
    real_open = os.open
    folder = str(folder)

    def fake_open(path, flags, *a, **kw):
        p = os.fspath(path)
        if p.startswith(folder) and only in os.path.basename(p) and flags & (os.O_WRONLY | os.O_RDWR):
            raise OSError(err, os.strerror(err), p)
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(os, "open", fake_open)


# ---------------------------------------------------------------------------------------------
# The results folder: checked before training; a refused record is kept, not lost


def test_read_only_results_folder_fails_before_training(tmp_path, monkeypatch, capsys):
    suite = tr.write_suite(tmp_path / "s.yaml", tr.BASE_SUITE)
    out = tmp_path / "r"
    fail_opens_under(monkeypatch, out, errno.EROFS)
    inject = Counting()
    with pytest.raises(StoreError, match=r"results folder .*r/runs is not writable \(Read-only file system\)"):
        run_logged(suite, out, injector=inject)
    assert inject.n == 0  # nothing trained
    # A results "folder" that is a file: same one-line error from the CLI, before any work.
    from benchmarks.cli import main

    (tmp_path / "afile").write_text("x")
    require_assets("sarcasm")  # a real suite's asset check comes first: its task's data must be cached
    real = tr.write_suite(tmp_path / "real.yaml", tr.BASE_SUITE.replace("tasks: [fake]", "tasks: [sarcasm]"))
    assert main(["run", "--suite", str(real), "--out", str(tmp_path / "afile" / "r"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not writable" in err[0]


def test_full_results_folder_fails_before_training(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    suite = tr.write_suite(tmp_path / "s.yaml", tr.BASE_SUITE)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 * 2**30, 10 * 2**30 - 2**20, 2**20))
    inject = Counting()
    with pytest.raises(StoreError, match=r"has 1\.0 MiB free"):
        run_logged(suite, tmp_path / "r", injector=inject)
    assert inject.n == 0


def test_disk_full_at_write_keeps_the_record_and_the_next_run_adopts_it(tmp_path, monkeypatch, capsys):
    from benchmarks.runner.cli import EXIT_MORE_TO_DO

    suite = tr.write_suite(tmp_path / "s.yaml", TWO_SEEDS)
    out = tmp_path / "r"
    monkeypatch.setenv("NALORA_BENCH_ORPHANS", str(tmp_path / "orphans"))
    with monkeypatch.context() as m:
        fail_opens_under(m, out / "runs", errno.ENOSPC, only=".json.")  # the probe passes, records do not
        inject = Counting()
        rc, log = run_logged(suite, out, injector=inject)
    assert rc == EXIT_MORE_TO_DO and inject.n == 1  # no second run trained into a full disk
    assert "results folder refused a record" in " ".join(log)
    err = [ln for ln in capsys.readouterr().err.splitlines() if "could not write" in ln]
    assert len(err) == 1 and "No space left on device" in err[0]
    kept = Path(err[0].split("kept at ")[1].split(" ")[0])
    assert kept.is_file() and kept.is_relative_to(tmp_path / "orphans")
    orphan = read_full(kept)  # the side file is kept next to it (the fake run has adapted modules)
    assert orphan["status"] == "ok" and orphan["metrics"]["test"] and orphan["adapted_modules"]
    assert not list((out / "runs").glob("*.json"))
    # Room again: the kept record is adopted (not retrained) and the grid finishes.
    inject = Counting()
    rc, _ = run_logged(suite, out, injector=inject)
    assert rc == 0 and inject.n == 1
    recs = tr.runs(out)
    assert len(recs) == 2 and recs[orphan["run_id"]] == orphan
    assert not kept.exists() and not side_path(kept).exists()


def test_files_get_the_umasks_mode(tmp_path, src_dir):
    from benchmarks.assets.fetch import fetch
    from benchmarks.runner.store import atomic_write_text

    old = os.umask(0o022)
    try:
        suite = tr.write_suite(tmp_path / "s.yaml", tr.BASE_SUITE)
        run_logged(suite, tmp_path / "r")
        (rec,) = (tmp_path / "r" / "runs").glob("*.json")
        atomic_write_text(tmp_path / "r" / "leaderboard.csv", "a,b\n")
        fetch(["sarcasm"], source_dir=src_dir, cache_dir=tmp_path / "cache", progress=False)
        entry = tmp_path / "cache" / "entries" / "sarcasm"
        files = [rec, tmp_path / "r" / "leaderboard.csv", tmp_path / "cache" / "manifest.json",
                 *[p for p in entry.rglob("*") if p.is_file()]]
        assert {str(p): oct(p.stat().st_mode & 0o777) for p in files} == {str(p): "0o644" for p in files}
        assert oct(entry.stat().st_mode & 0o777) == "0o755"
    finally:
        os.umask(old)


# ---------------------------------------------------------------------------------------------
# One runner per results folder


class SlowTask(tr.FakeTask):
    """Marks (in $RELIAB_MARKER) when a run starts, then trains slowly: lets a test act mid-run."""

    name = "fake-marked"
    sleep = 0.5

    def setup(self, model_name, device="cpu"):
        marker = os.environ.get("RELIAB_MARKER")
        if marker:
            Path(marker).write_text(str(os.getpid()))
        return super().setup(model_name, device)


def resolver(name: str):
    return SlowTask() if name == SlowTask.name else tr.fake_resolver(name)


RUNNER_SCRIPT = """\
import sys
sys.path.insert(0, {tests!r})
import test_reliability as t, test_runner as tr
from benchmarks.runner.cli import run_suite
if __name__ == "__main__":  # spawned workers import this file again as __mp_main__
    sys.exit(run_suite({suite!r}, {out!r}, resolver=t.resolver, injector=tr.stand_in_inject, progress=False,
                       workers={workers}))
"""


def start_runner(tmp_path: Path, out: Path, seeds: int, workers: int = 0) -> tuple[subprocess.Popen, Path]:
    """A real runner process on a grid of slow runs; returns it once its first run has started."""
    suite = tr.write_suite(tmp_path / "slow.yaml", tr.BASE_SUITE.replace("tasks: [fake]", f"tasks: [{SlowTask.name}]")
                           .replace("seeds: [0]", f"seeds: {list(range(seeds))}").replace("steps: 3", "steps: 20"))
    script = tmp_path / "runner.py"
    script.write_text(RUNNER_SCRIPT.format(tests=str(HERE), suite=str(suite), out=str(out), workers=workers))
    marker = tmp_path / "started"
    env = {**os.environ, "PYTHONPATH": str(REPO), "RELIAB_MARKER": str(marker)}
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    t0 = time.time()
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() - t0 < 180, "the runner did not start a run"
        time.sleep(0.1)
    return proc, marker


def test_second_runner_on_one_folder_is_refused_naming_the_pid(tmp_path):
    out = tmp_path / "r"
    proc, _ = start_runner(tmp_path, out, seeds=3)
    try:
        inject = Counting()
        suite = tr.write_suite(tmp_path / "s.yaml", tr.BASE_SUITE)
        with pytest.raises(StoreError, match=rf"in use by another runner \(pid {proc.pid}\)"):
            run_logged(suite, out, injector=inject)
        assert inject.n == 0
    finally:
        proc.kill()
        proc.wait()
    # The kernel released the lock with the process: the folder is usable again, no stale-lock step.
    rc, _ = run_logged(tr.write_suite(tmp_path / "s.yaml", tr.BASE_SUITE), out)
    assert rc == 0


def test_temp_cleanup_never_deletes_a_live_writers_file(tmp_path):
    store = ResultStore(tmp_path / "r")
    store.runs_dir.mkdir(parents=True)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        live_tmp = store.runs_dir / f".abc.json.{live.pid}.0a1b2c3d.tmp"
        dead_tmp = store.runs_dir / f".abc.json.{dead.pid}.0a1b2c3d.tmp"
        legacy = store.runs_dir / ".abc.json.x1y2z3.tmp"  # an older writer's name: no pid, so only if old
        for p in (live_tmp, dead_tmp, legacy):
            p.write_text("{")
        assert store.clean_temp() == 1
        assert live_tmp.exists() and legacy.exists() and not dead_tmp.exists()
        os.utime(legacy, (time.time() - 7200,) * 2)
        assert store.clean_temp() == 1 and not legacy.exists()
    finally:
        live.kill()
        live.wait()


# ---------------------------------------------------------------------------------------------
# Environment failures are retried; method results stay results


class FlakyTask(tr.FakeTask):
    """Fails like a missing asset while $RELIAB_BROKEN names an existing file."""

    name = "fake-flaky"

    def setup(self, model_name, device="cpu"):
        broken = os.environ.get("RELIAB_BROKEN")
        if broken and Path(broken).exists():
            raise AssetError("cached asset 'x' is missing tokenizer.json; run `nalora-bench fetch x --force`")
        return super().setup(model_name, device)


def flaky_resolver(name: str):
    return FlakyTask() if name == FlakyTask.name else tr.fake_resolver(name)


def test_environment_failures_are_retried_by_default(tmp_path, monkeypatch):
    suite = tr.write_suite(tmp_path / "s.yaml", tr.BASE_SUITE.replace("tasks: [fake]", "tasks: [fake-flaky, fake, fake-broken]"))
    broken = tmp_path / "broken"
    broken.write_text("")
    monkeypatch.setenv("RELIAB_BROKEN", str(broken))
    out = tmp_path / "r"
    run_logged(suite, out, resolver=flaky_resolver)

    def by():
        return {(r["config"]["task"], r["config"]["method"]): r for r in tr.runs(out).values()}

    first = by()
    assert first[("fake-flaky", "lora")]["status"] == "failed"
    assert first[("fake-flaky", "lora")]["error"]["type"] == "environment"
    assert first[("fake-broken", "lora")]["error"]["type"] == "exception"  # not the environment: kept
    broken.unlink()  # the repair
    rc, log = run_logged(suite, out, resolver=flaky_resolver)
    second = by()
    assert second[("fake-flaky", "lora")]["status"] == "ok"  # retried without --retry-failed
    assert second[("fake-broken", "lora")] == first[("fake-broken", "lora")]  # not repeated ...
    main = [ln for ln in log if ln.startswith("main:")][0]
    assert "1 earlier environment failures retried" in main
    assert "1 of the already done runs are recorded not ok" in main and "--retry-failed" in main  # ... says how


@pytest.mark.parametrize("err, kind", [
    (RuntimeError("cannot load 'x' from the hub (offline?)"), "environment"),  # cause attached below
    (ImportError("No module named 'bitsandbytes'"), "environment"),
    (FileNotFoundError("data/validation.jsonl"), "environment"),
    (RuntimeError("No CUDA GPUs are available"), "environment"),
    (ValueError("rank must be positive"), "bad_config"),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), "exception"),
])
def test_failure_classes(err, kind):
    from benchmarks.runner.execute import _classify

    if "offline" in str(err):
        err.__cause__ = OSError("connection refused")  # raise RuntimeError(...) from OSError: a failed download
    assert _classify(err) == kind


def test_nan_loss_is_diverged_not_failed(tmp_path):
    suite = tr.write_suite(tmp_path / "s.yaml", tr.BASE_SUITE.replace("tasks: [fake]", "tasks: [fake-nan]"))
    rc, log = run_logged(suite, tmp_path / "r")
    (rec,) = tr.runs(tmp_path / "r").values()
    assert rec["status"] == "diverged" and "nan" in rec["error"]["message"].lower()
    assert "1 diverged" in [ln for ln in log if ln.startswith("main:")][0]
    # A diverged run is a result: not repeated by default.
    inject = Counting()
    run_logged(suite, tmp_path / "r", injector=inject)
    assert inject.n == 0


def test_train_statuses_health_and_per_example_are_recorded(tmp_path, monkeypatch):
    from benchmarks.runner import train

    real = train.train_run
    health = {"collapsed": True, "reasons": ["one class predicted"], "top_pred_share": 1.0, "val_vs_chance_p": 0.9}
    per_example = {"test": {"n": 2, "ids_sha256": "ab", "correct": "01", "pred": [1, 1]}}

    def collapsed(*a, **kw):
        return {**real(*a, **kw), "status": "collapsed", "health": health, "per_example": per_example}

    class Diverged(RuntimeError):
        pass

    def diverging(*a, **kw):
        raise Diverged("gradient norm is nan at step 3")

    suite = tr.write_suite(tmp_path / "s.yaml", tr.BASE_SUITE)
    monkeypatch.setattr(train, "train_run", collapsed)
    run_logged(suite, tmp_path / "a")
    (rec,) = tr.runs(tmp_path / "a").values()
    assert rec["status"] == "collapsed" and rec["health"] == health and rec["per_example"] == per_example
    monkeypatch.setattr(train, "train_run", diverging)
    monkeypatch.setattr(train, "Diverged", Diverged, raising=False)
    run_logged(suite, tmp_path / "b")
    (rec,) = tr.runs(tmp_path / "b").values()
    assert rec["status"] == "diverged" and rec["error"]["message"] == "Diverged: gradient norm is nan at step 3"


@pytest.mark.parametrize("damage", ["[]", "null", '{"run_id": "ab', "", "{}"])
def test_damaged_record_is_rerun_with_a_warning(tmp_path, capsys, damage):
    suite = tr.write_suite(tmp_path / "s.yaml", tr.BASE_SUITE)
    out = tmp_path / "r"
    run_logged(suite, out)
    (path,) = (out / "runs").glob("*.json")
    path.write_text(damage)
    capsys.readouterr()
    assert ResultStore(out).records() == []  # what `report` reads: skipped, not a crash
    rc, _ = run_logged(suite, out)
    assert rc == 0 and json.loads(path.read_text())["status"] == "ok"
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if str(path) in ln]
    assert len(warnings) == 1 and "treated as not run" in warnings[0]


# ---------------------------------------------------------------------------------------------
# kill -9 of the runner: its workers follow it


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").is_dir() and "zombie" not in Path(f"/proc/{pid}/status").read_text()


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the worker through /proc")
def test_sigkilled_runner_takes_its_workers_with_it(tmp_path):
    proc, marker = start_runner(tmp_path, tmp_path / "r", seeds=2, workers=1)
    worker = int(marker.read_text())  # the run started inside the worker
    assert worker != proc.pid and worker in _children(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)  # the runner only, as the OOM killer would
    proc.wait()
    t0 = time.time()
    try:
        while pid_alive(worker) and time.time() - t0 < 20:
            time.sleep(0.2)
        assert not pid_alive(worker), "the worker outlived its runner"
    finally:
        if pid_alive(worker):
            os.kill(worker, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------
# Assets: every file verified at load, a clear fix, no writes into the cache


@pytest.fixture
def src_dir(tmp_path) -> Path:
    from test_assets import N_EXTRA, _wheel

    d = tmp_path / "src"
    d.mkdir()
    sarcasm = "".join(json.dumps({"input": [{"role": "user", "content": f"headline {i}"}], "ideal": str(i % 2)}) + "\n"
                      for i in range(N_EXTRA))
    _wheel(d / "evals-3.0.1.post1-py3-none-any.whl", {"evals/registry/data/sarcasm/samples.jsonl": sarcasm})
    return d


@pytest.fixture
def tiny_model_cache(tmp_path) -> Path:
    """A cache whose 'smollm2-135m' entry is a tiny random Llama with its tokenizer."""
    from tasks.common import tiny_llama

    cache = Cache(tmp_path / "cache")
    model, tok = tiny_llama()
    with cache.build("smollm2-135m") as work:
        (work / "e").mkdir()
        model.save_pretrained(str(work / "e" / "model"))
        tok.save_pretrained(str(work / "e" / "model"))
        table = file_table(work / "e")
        cache.publish("smollm2-135m", work / "e", {
            "name": "smollm2-135m", "kind": "model", "files": table, "main_file": "model/model.safetensors",
            "converted_at": "now", "sources": [], "license": "", "converter_version": "1"})
    return cache.root


def test_one_byte_config_change_is_an_error_with_the_fix(tiny_model_cache):
    from benchmarks.assets.models import load_model

    load_model("smollm2-135m", cache_dir=tiny_model_cache)  # verified once in this process
    cfg = tiny_model_cache / "entries" / "smollm2-135m" / "model" / "config.json"
    text = cfg.read_text()
    assert '"num_hidden_layers": 2' in text
    cfg.write_text(text.replace('"num_hidden_layers": 2', '"num_hidden_layers": 1'))  # one byte
    with pytest.raises(AssetError, match=r"corrupted: model/config\.json .*run `nalora-bench fetch smollm2-135m --force`"):
        load_model("smollm2-135m", cache_dir=tiny_model_cache)


def test_deleted_tokenizer_is_one_line_naming_file_and_fix(tiny_model_cache):
    from benchmarks.assets.models import load_model

    (tiny_model_cache / "entries" / "smollm2-135m" / "model" / "tokenizer.json").unlink()
    with pytest.raises(AssetError, match=r"missing model/tokenizer\.json .*nalora-bench fetch smollm2-135m --force") as e:
        load_model("smollm2-135m", cache_dir=tiny_model_cache)
    assert "\n" not in str(e.value)


def test_deleted_data_file_is_one_line_naming_file_and_fix(tmp_path, src_dir):
    from benchmarks.assets import data
    from benchmarks.assets.fetch import fetch

    fetch(["sarcasm"], source_dir=src_dir, cache_dir=tmp_path / "c", progress=False)
    rec = Cache(tmp_path / "c").record("sarcasm")
    victim = next(f for f in rec["files"] if f.startswith("data/validation/") and f.endswith(".arrow"))
    assert victim != rec["main_file"]  # the old check looked at the main file only
    (tmp_path / "c" / "entries" / "sarcasm" / victim).unlink()
    with pytest.raises(AssetError, match=rf"missing {victim} .*nalora-bench fetch sarcasm --force"):
        data.load_dataset("sarcasm", cache_dir=tmp_path / "c")


def test_verification_hashes_once_per_process_but_sees_edits(tiny_model_cache, monkeypatch):
    from benchmarks.assets import cache as cache_mod

    c = Cache(tiny_model_cache)
    c.require("smollm2-135m")
    calls = []
    real = cache_mod.sha256_file
    monkeypatch.setattr(cache_mod, "sha256_file", lambda p, *a: calls.append(p) or real(p, *a))
    c.require("smollm2-135m")
    assert calls == []  # unchanged files: stat only
    tok = tiny_model_cache / "entries" / "smollm2-135m" / "model" / "tokenizer_config.json"
    tok.write_text(tok.read_text().replace("{", "{ ", 1)[:-1])  # same size, new content, new mtime
    with pytest.raises(AssetError, match="tokenizer_config.json fails its sha256 check"):
        c.require("smollm2-135m")
    assert [Path(p) for p in calls] == [tok.resolve()]  # hashed by its real path


def test_runs_write_no_cache_files_into_the_asset_cache(tmp_path, src_dir, monkeypatch):
    from benchmarks.assets.fetch import fetch
    from tasks.registry import get_task

    root = tmp_path / "c"
    fetch(["sarcasm"], source_dir=src_dir, cache_dir=root, progress=False)
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    monkeypatch.setenv("NALORA_BENCH_CACHE", str(root))
    task = get_task("sarcasm")
    assert len(task.examples("validation", limit=2)) == 2  # a seeded shuffle + select
    assert len(task.examples("train", limit=3)) == 3
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before
    Cache(root).require("sarcasm", full=True)


# ---------------------------------------------------------------------------------------------
# run_all.sh


def _run_all(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "run_all.sh"), *args], capture_output=True, text=True, timeout=30)


def test_run_all_flag_without_value_is_one_clear_line():
    for flag in ("--suite", "--out", "--tasks", "--backend", "--address"):
        p = _run_all(flag)
        assert p.returncode == 2 and p.stderr.strip() == f"run_all.sh: {flag} needs a value (see --help)"
    p = _run_all("--suite", "--out", "x")  # the next flag is not a value
    assert p.returncode == 2 and "--suite needs a value" in p.stderr


def test_run_all_help_is_only_the_usage():
    p = _run_all("--help")
    assert p.returncode == 0 and p.stdout.startswith("Reproduce the results")
    assert "set -" not in p.stdout and "cd " not in p.stdout and "#" not in p.stdout.splitlines()[0]


def test_no_rebuild_hint_when_run_all_rebuilds_the_report(tmp_path, monkeypatch):
    suite = tr.write_suite(tmp_path / "s.yaml", tr.BASE_SUITE)
    _, log = run_logged(suite, tmp_path / "a")
    assert any("nalora-bench report" in ln for ln in log)  # a plain `nalora-bench run` says how
    monkeypatch.setenv("NALORA_BENCH_REPORT_FOLLOWS", "1")
    _, log = run_logged(suite, tmp_path / "b")
    assert not any("report" in ln for ln in log)
    script = (REPO / "run_all.sh").read_text()
    assert 'NALORA_BENCH_REPORT_FOLLOWS=1 "${BENCH[@]}" run ' in script
    assert script.index('"${BENCH[@]}" run ') < script.index('"${BENCH[@]}" report ')
