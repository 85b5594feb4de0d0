"""Issue 14 (users): any registered task / model from the command line, task options in suites, a dry run
that changes nothing, progress and thread caps, and the CPU demo suite. Fake tasks as in test_runner.py."""

from __future__ import annotations

import io
import json
import os
import subprocess
import time

import pytest
import torch
from conftest import require_assets

from tests.test_runner import (
    BASE_SUITE,
    REPO,
    FakeTask,
    fake_resolver,
    load,
    run,
    runs,
    tiny_llama,
    write_suite,
)


@pytest.fixture(autouse=True)
def _restore_progress_bars(monkeypatch):
    """``run_suite(progress=False)`` silences the HF bars process-wide; give the next test them back."""
    for var in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS", "NALORA_BENCH_NO_PROGRESS"):
        monkeypatch.delenv(var, raising=False)
    yield
    for var in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS", "NALORA_BENCH_NO_PROGRESS"):
        os.environ.pop(var, None)
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    datasets.enable_progress_bars()


class OptTask(FakeTask):
    """A task with a constructor option, as a plugin with ``data_dir=`` has."""

    name = "fake-opt"

    def __init__(self, tag: str = "none") -> None:
        self.tag = tag

    def describe(self) -> dict:
        return {**super().describe(), "tag": self.tag}


def opt_resolver(name: str, **options):
    """``fake_resolver`` that also knows ``fake-opt`` and passes options to the constructor."""
    return OptTask(**options) if name == "fake-opt" else fake_resolver(name, **options)


# ---------------------------------------------------------------------------------------------
# 1. --tasks / --models name anything registered


def test_tasks_flag_takes_a_task_outside_the_suite(tmp_path):
    suite = write_suite(tmp_path / "s.yaml", BASE_SUITE)  # its only task is `fake`
    assert run(suite, tmp_path / "r", tasks=["fake-dev"]) == 0
    (rec,) = runs(tmp_path / "r").values()
    # The suite supplies the settings: its training recipe, its methods, its lr.
    assert rec["config"]["task"] == "fake-dev" and rec["status"] == "ok"
    assert rec["config"]["training"]["steps"] == 3 and rec["config"]["method"] == "lora"
    assert rec["config"]["model"] == "tiny-llama"  # the task's family default (the suite names no models)


def test_tasks_flag_mixes_own_and_other_tasks(tmp_path):
    s = load(write_suite(tmp_path / "s.yaml", BASE_SUITE.replace("tasks: [fake]", "tasks: [{name: fake, training: {steps: 2}}]")),
             tasks=["fake", "fake-dev"])
    by = {t.name: t for t in s.tasks}
    assert by["fake"].training.steps == 2 and not by["fake"].added  # its own entry keeps its override
    assert by["fake-dev"].training.steps == 3 and by["fake-dev"].added


def test_unknown_task_or_model_suggests_close_names(tmp_path):
    from benchmarks.runner.suite import SuiteError

    suite = write_suite(tmp_path / "s.yaml", BASE_SUITE)
    with pytest.raises(SuiteError) as e:
        load(suite, tasks=["fak"])
    assert str(e.value).startswith("--tasks: unknown task 'fak' (did you mean fake") and "\n" not in str(e.value)
    with pytest.raises(SuiteError) as e:
        load(suite, models=["tiny-lama"])
    assert str(e.value).startswith("--models: unknown model 'tiny-lama' (did you mean tiny-llama")
    assert "\n" not in str(e.value)
    with pytest.raises(SuiteError) as e:  # a real registry name, misspelt
        load(suite, tasks=["sarcsm"])
    assert "did you mean sarcasm" in str(e.value)


def test_models_flag_with_the_suites_own_models_keeps_each_family_on_its_own():
    """``--models`` naming models of the suite selects among them: ``default``'s language tasks on SmolLM2, its
    vision-language tasks on the DINOv2 VLM, never one family's model on the other's tasks (it replaced every
    task's models until 2026-12-07: SmolLM2 on emoji, the VLM on movie-reviews). A name outside the suite replaces."""
    from benchmarks.runner.grid import expand
    from benchmarks.runner.suite import load_suite

    def pairs(**kw):
        s = load_suite("default", methods=["lora"], seeds=[0], check=False, **kw)
        family = {"fashion-mnist": "vlm", "emoji": "vlm"}
        return {(sp.config["model"], sp.config["task"]) for sp in expand(s, lambda n: (family.get(n, "llm"), "x"))}

    got = pairs(tasks=["movie-reviews", "emoji"], models=["smollm2-135m", "dinov2-s+smollm2-135m"])
    assert got == {("smollm2-135m", "movie-reviews"), ("dinov2-s+smollm2-135m", "emoji")}
    assert {m for m, _ in pairs(models=["gemma3-270m"])} == {"gemma3-270m"}  # the VLM tasks drop out
    assert pairs(tasks=["emoji"], models=["tiny-llama"]) == {("tiny-llama", "emoji")}


def test_models_flag_replaces_the_suites_models(tmp_path):
    suite = write_suite(tmp_path / "s.yaml", BASE_SUITE + "models: [smollm2-135m]\n")
    assert load(suite).models_for(load(suite).tasks[0], "llm", "x") == ["smollm2-135m"]
    assert run(suite, tmp_path / "r", models=["tiny-llama"]) == 0
    (rec,) = runs(tmp_path / "r").values()
    assert rec["config"]["model"] == "tiny-llama"


def test_list_models_shows_test_models():
    from tasks.cli import _list_assets

    buf = io.StringIO()
    _list_assets("model", out=buf)
    lines = {line.split()[0] for line in buf.getvalue().splitlines()[2:] if line.strip()}
    assert {"tiny-llama", "smollm2-135m"} <= lines


def test_run_all_passes_models():
    text = (REPO / "run_all.sh").read_text()
    assert "--models" in text.split("case")[1]  # parsed, not "unknown argument"
    assert "--stack)" in text.split("case")[1]


# ---------------------------------------------------------------------------------------------
# 2. Task options in suites


OPT_SUITE = BASE_SUITE.replace("tasks: [fake]", "tasks: [{name: fake-opt, options: {tag: blue}}]")


def test_task_options_reach_the_constructor_and_the_run_id(tmp_path):
    assert run(write_suite(tmp_path / "s.yaml", OPT_SUITE), tmp_path / "r", resolver=opt_resolver) == 0
    (rec,) = runs(tmp_path / "r").values()
    assert rec["config"]["task_options"] == {"tag": "blue"} and rec["task_info"]["tag"] == "blue"
    assert run(write_suite(tmp_path / "t.yaml", OPT_SUITE.replace("blue", "red")), tmp_path / "r",
               resolver=opt_resolver) == 0
    recs = runs(tmp_path / "r")
    assert len(recs) == 2 and {r["task_info"]["tag"] for r in recs.values()} == {"blue", "red"}
    # Without options the config has no task_options key: ids of existing runs do not change.
    assert run(write_suite(tmp_path / "u.yaml", BASE_SUITE), tmp_path / "q") == 0
    assert "task_options" not in next(iter(runs(tmp_path / "q").values()))["config"]


def test_unknown_task_option_is_a_load_error(tmp_path):
    from benchmarks.runner.suite import SuiteError, load_suite

    with pytest.raises(SuiteError) as e:
        load_suite(write_suite(tmp_path / "bad.yaml", OPT_SUITE.replace("tag: blue", "tagg: blue")), resolver=opt_resolver)
    msg = str(e.value)
    assert msg.startswith("suite bad.yaml: tasks.fake-opt.options.tagg: not an option of task 'fake-opt'")
    assert "did you mean tag" in msg and "\n" not in msg


def test_registry_resolver_passes_options():
    from benchmarks.runner.execute import registry_resolver

    assert registry_resolver("sarcasm", data_dir="/nowhere").data_dir == "/nowhere"


# ---------------------------------------------------------------------------------------------
# 3. A dry run changes nothing


def test_run_all_dry_run_fetches_and_writes_nothing(tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "new-folder"
    env = {**os.environ, "NALORA_BENCH_CACHE": str(cache), "PYTHONPATH": str(REPO)}
    p = subprocess.run(["./run_all.sh", "--suite", "smoke", "--tasks", "sarcasm", "--methods", "lora",
                        "--models", "tiny-llama", "--out", str(out), "--dry-run", "--no-progress"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "would fetch: sarcasm" in p.stdout and "todo" in p.stdout
    assert not out.exists()  # no report, no run folder
    assert not any(cache.glob("entries/*"))  # nothing downloaded


# ---------------------------------------------------------------------------------------------
# 4. Progress and threads


def test_eval_progress_counts_forward_passes_and_removes_its_hook(capsys):
    from benchmarks.runner.progress import eval_progress

    model = tiny_llama()
    x = torch.randint(1, 32, (2, 8))
    with eval_progress(model, "eval validation", True) as bar:
        model(input_ids=x)
        model(input_ids=x)
        assert bar.n == 2
    assert not model._forward_pre_hooks
    with eval_progress(model, "quiet", False) as bar:
        model(input_ids=x)
    assert bar is None and not model._forward_pre_hooks


def test_eval_progress_leaves_the_forwards_arguments_alone(monkeypatch):
    """tqdm's update returns True whenever it redraws (at most once a second), and a pre-hook's return value replaces
    the forward's arguments: a forward after a redraw got ``(True,)`` beside its input_ids (found 2026-12-07)."""
    from tqdm.auto import tqdm

    from benchmarks.runner.progress import eval_progress

    monkeypatch.setattr(tqdm, "update", lambda self, n=1: True)  # every forward redraws
    model = tiny_llama()
    x = torch.randint(1, 32, (2, 8))
    want = model(input_ids=x).logits
    with eval_progress(model, "eval validation", True):
        assert torch.equal(model(input_ids=x).logits, want) and torch.equal(model(x).logits, want)


def test_eval_progress_counts_each_forward_of_a_peft_model_once_generation_included(capsys):
    """peft's ``generate`` calls its base model, not the adapted model's forward: each scored batch and each
    generated token is one forward on the bar (a hook on the adapted model counted no generated token)."""
    from peft import LoraConfig, get_peft_model

    from benchmarks.runner.progress import eval_progress

    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["gate_proj"], r=2))
    x = torch.randint(1, 32, (2, 5))
    with eval_progress(model, "eval validation", True) as bar:
        model(input_ids=x)
        assert bar.n == 1
        model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert bar.n == 1 + 4
    assert not model._forward_pre_hooks and not model.get_base_model()._forward_pre_hooks


def test_evaluation_shows_progress_unless_told_not_to(tmp_path, capsys):
    from benchmarks.runner.cli import run_suite
    from tests.test_runner import stand_in_inject

    suite = write_suite(tmp_path / "s.yaml", BASE_SUITE)
    run_suite(str(suite), tmp_path / "a", resolver=fake_resolver, injector=stand_in_inject, log=lambda s: None,
              progress=True)
    assert "eval test" in capsys.readouterr().err
    run_suite(str(suite), tmp_path / "b", resolver=fake_resolver, injector=stand_in_inject, log=lambda s: None,
              progress=False)
    assert "eval" not in capsys.readouterr().err


def test_no_progress_silences_weight_loading_bars(tmp_path, monkeypatch):
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    assert run(write_suite(tmp_path / "s.yaml", BASE_SUITE), tmp_path / "r") == 0  # run() passes progress=False
    assert not hf_logging.is_progress_bar_enabled()
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"  # inherited by spawned workers


def test_in_process_runner_caps_torch_threads(tmp_path, monkeypatch):
    from benchmarks.runner import pool

    calls: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 64)  # torch's default on a big host
    assert run(write_suite(tmp_path / "s.yaml", BASE_SUITE), tmp_path / "r", threads=1) == 0
    assert calls == [1]
    assert run(write_suite(tmp_path / "s.yaml", BASE_SUITE), tmp_path / "q") == 0
    assert calls == [1, pool.available_cpus()]


# ---------------------------------------------------------------------------------------------
# 5. The CPU demo


def test_demo_suite_is_small_and_run_all_picks_it_on_a_cpu():
    from benchmarks.runner.suite import load_suite

    demo = load_suite("demo")
    assert [t.name for t in demo.tasks] == ["sarcasm"] and {m.label for m in demo.methods} == {"lora", "nalora"}
    assert demo.models["llm"] == ["smollm2-135m"] and demo.seeds == [0]
    assert all(len(m.lr_grid) == 1 and m.lr_bounds == (m.lr_grid[0],) * 2 for m in demo.methods)  # no lr rounds
    tr = demo.tasks[0].training
    assert tr.steps <= 60 and tr.eval_limit <= 96 and tr.test_limit <= 96  # measured: about 2/3 of the 5-minute budget
    text = (REPO / "run_all.sh").read_text()
    closing = next(line for line in text.splitlines() if "that was the CPU demo" in line)
    assert "SUITE=demo" in text and "./run_all.sh --suite default" in closing and "on a GPU" in closing
    # smoke stays the broader CPU check
    assert len(load_suite("smoke").tasks) > len(demo.tasks)


@pytest.mark.slow
def test_cpu_demo_end_to_end_within_its_budget(tmp_path):
    """`./run_all.sh` on a machine without a GPU: the demo ends within 5 minutes (issue 14) with every result
    kind written and both runs ok (a demo whose runs collapse would teach the wrong thing)."""
    require_assets("smollm2-135m", "sarcasm")
    out = tmp_path / "demo"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    t0 = time.monotonic()
    p = subprocess.run(["./run_all.sh", "--out", str(out), "--no-progress"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
    wall = time.monotonic() - t0
    assert p.returncode == 0, p.stderr[-2000:]
    assert "that was the CPU demo" in p.stdout
    runs = [json.loads(f.read_text()) for f in (out / "runs").glob("*.json")]
    assert len(runs) == 2 and {r["status"] for r in runs} == {"ok"}
    assert (out / "leaderboard.csv").is_file() and (out / "index.html").is_file() and (out / "findings.md").is_file()
    assert any((out / "tables").glob("main_*.md")) and len(list((out / "plots").glob("*.png"))) >= 3
    assert wall < 300, f"the CPU demo took {wall:.0f} s, over its 5-minute budget"


def test_shipped_demo_needs_only_cached_kinds_of_assets():
    from benchmarks.runner.assets_needed import assets_needed

    assert assets_needed("demo") == ["sarcasm", "smollm2-135m"]


# ---------------------------------------------------------------------------------------------
# 6. Provenance: every weight and data file with its sha256, each file hashed once per process


def test_files_are_hashed_once_per_file_version(tmp_path, monkeypatch):
    from benchmarks.assets import cache as cache_mod

    reads: list[str] = []
    real = cache_mod.sha256_file
    monkeypatch.setattr(cache_mod, "sha256_file", lambda p, *a: reads.append(str(p)) or real(p, *a))
    f = tmp_path / "w.bin"
    f.write_bytes(b"weights v1")
    first = cache_mod.sha256_cached(f)
    assert cache_mod.sha256_cached(f) == first and len(reads) == 1  # a second run: no second read
    f.write_bytes(b"weights v2!")  # edited in place: another size/mtime, hashed again
    assert cache_mod.sha256_cached(f) != first and len(reads) == 2
    assert cache_mod.sha256_cached(f, fresh=True) and len(reads) == 3


def test_builtin_composed_vlm_record_names_every_tower_data_and_connector_file(tmp_path, monkeypatch):
    """A built-in composed-VLM task (dinov2-s+smollm2-135m on fashion-mnist): the record's files are every
    file of both towers' and both alignment datasets' cache entries, plus the connector, each with its sha256.
    A stand-in cache (small files under the real asset names) keeps it cheap."""
    import hashlib
    import json

    from benchmarks.runner.execute import _used
    from tasks.registry import get_task

    root = tmp_path / "cache"
    manifest = {}
    for name, kind, rels in (("dinov2-s", "model", ["model/model.safetensors", "model/config.json"]),
                             ("smollm2-135m", "model", ["model/model.safetensors", "model/tokenizer.json"]),
                             ("fashion-mnist", "dataset", ["data/train/data-00000-of-00001.arrow"]),
                             ("emoji", "dataset", ["data/test/data-00000-of-00001.arrow"])):
        files = {}
        for rel in rels:
            p = root / "entries" / name / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(f"{name}/{rel}".encode())
            files[rel] = {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        manifest[name] = {"kind": kind, "files": files, "main_file": rels[0], "sources": [], "license": "x",
                          "converted_at": "t", "converter_version": 1}
    (root / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setenv("NALORA_BENCH_CACHE", str(root))
    connector = tmp_path / "connector.safetensors"
    connector.write_bytes(b"aligned")

    assets, files = _used("dinov2-s+smollm2-135m", get_task("fashion-mnist"), [str(connector)])
    assert set(assets) >= {"dinov2-s", "smollm2-135m", "fashion-mnist", "emoji"}
    want = {str((root / "entries" / n / rel).resolve()): (f["sha256"], "weights" if m["kind"] == "model" else "data")
            for n, m in manifest.items() for rel, f in m["files"].items()}
    want[str(connector.resolve())] = (hashlib.sha256(b"aligned").hexdigest(), "weights")
    assert {f["path"]: (f["sha256"], f["role"]) for f in files} == want
    from benchmarks.runner.provenance import asset_provenance

    assert set(asset_provenance(assets)) == {"dinov2-s", "smollm2-135m", "fashion-mnist", "emoji"}  # each part found


# ---------------------------------------------------------------------------------------------
# 7. Nothing long is silent: connector alignment and set-up


def test_alignment_shows_progress_unless_no_progress(capfd, monkeypatch):
    from PIL import Image

    from benchmarks.progress_env import quiet_progress
    from benchmarks.vlm import AlignConfig, build_vlm
    from benchmarks.vlm.align import align_connector

    build = build_vlm("tiny-dinov2+tiny-byte-llama", align=False)
    pairs = [(Image.new("RGB", (28, 28), (v, v, v)), f"a picture of a {c}") for v, c in ((20, "circle"), (230, "square"))]
    cfg = AlignConfig(steps=3, batch_size=2)
    monkeypatch.setenv("NALORA_BENCH_NO_PROGRESS", "0")
    capfd.readouterr()
    align_connector(build.model, build.io.transform, build.io.tokenizer, pairs, pairs, cfg)
    err = capfd.readouterr().err
    assert "align connector" in err and "/3 [" in err  # a bar counting the 3 steps
    quiet_progress()  # what --no-progress does (the fixture restores the environment)
    align_connector(build.model, build.io.transform, build.io.tokenizer, pairs, pairs, cfg)
    assert "align connector" not in capfd.readouterr().err


def test_setup_prints_a_line_per_step_and_lets_pip_speak(tmp_path):
    """scripts/setup.sh on a stand-in python: a timed line before each step, no `pip -q`, pins used."""
    import shutil

    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts/setup.sh", tmp_path / "scripts/setup.sh")
    for name in ("pyproject.toml", "constraints.txt"):
        shutil.copy(REPO / name, tmp_path / name)
    log = tmp_path / "calls.log"
    fake = tmp_path / "fakepy"
    fake.write_text(f'#!/usr/bin/env bash\nif [ "$2" = venv ]; then mkdir -p .venv/bin; cp "$0" .venv/bin/python; exit 0; fi\n'
                    f'echo "$*" >> {log}\necho "pip output for: $*"\n')
    fake.chmod(0o755)
    out = subprocess.run(["bash", "scripts/setup.sh"], cwd=tmp_path, env={**os.environ, "PYTHON": str(fake)},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    calls = log.read_text().splitlines()
    assert len(calls) == 3 and all(c.startswith("-m pip install") for c in calls)
    assert not any(" -q" in c or "--quiet" in c for c in calls)  # pip shows what it collects and installs
    assert all("-c constraints.txt" in c for c in calls[1:])
    steps = [line for line in out.stderr.splitlines() if line.startswith("setup [")]
    assert [s.split("/")[0] for s in steps] == ["setup [1", "setup [2", "setup [3", "setup [4"]
    assert "setup: done in" in out.stderr and out.stdout.count("pip output for") == 3
    again = subprocess.run(["bash", "scripts/setup.sh"], cwd=tmp_path, env={**os.environ, "PYTHON": str(fake)},
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and again.stderr == "" and len(log.read_text().splitlines()) == 3  # idempotent


def test_hardware_provenance_names_the_gpu_a_run_was_pinned_to(monkeypatch):
    from benchmarks.runner.provenance import hardware

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert hardware()["cuda_visible_devices"] == "1"  # how the pool / Ray spread a grid shows in the records
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert "cuda_visible_devices" not in hardware()
