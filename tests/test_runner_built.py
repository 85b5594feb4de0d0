"""Built assets in a grid (benchmarks/runner/built_models.py): the cached entry is used on any machine, a GPU
builds a missing one once before the grid, a CPU-only machine runs the tiny stand-in, says so and records it.

A fake asset cache (``NALORA_BENCH_CACHE`` in a temp folder) and a patched ``torch.cuda.is_available``; the
runs are the fake copy task of test_runner.py, whose default model names ``vit-s-swiglu``.
"""

from __future__ import annotations

import pytest
import torch
from test_runner import BASE_SUITE, TASKS, FakeTask, run, runs, write_suite

from benchmarks.runner import built_models

COMPOSED = "vit-s-swiglu+tiny-byte-llama"
STAND_IN = "tiny-vit-swiglu+tiny-byte-llama"


class GatedVitTask(FakeTask):
    name = "fake-vit"
    default_model = COMPOSED


class GatedVitTask2(GatedVitTask):
    name = "fake-vit-2"


def resolver(name: str, **options):
    by = {**TASKS, GatedVitTask.name: GatedVitTask, GatedVitTask2.name: GatedVitTask2}
    if name not in by:
        raise KeyError(name)
    return by[name]()


def suite_file(tmp_path, tasks: str = "[fake-vit]"):
    return write_suite(tmp_path / "s.yaml", BASE_SUITE.replace("tasks: [fake]", f"tasks: {tasks}"))


def publish_fake_entry(name: str = "vit-s-swiglu") -> None:
    """A cache entry for ``name`` in the current (temp) cache, as a finished build leaves it."""
    from benchmarks.assets import Cache
    from benchmarks.assets.registry import current_version

    cache = Cache()
    with cache.build(name) as work:
        (work / "model").mkdir()
        (work / "model" / "weights").write_bytes(b"x")
        cache.publish(name, work, {"name": name, "converter_version": current_version(name)})


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("NALORA_BENCH_CACHE", str(root))
    return root


@pytest.fixture
def no_build(monkeypatch):
    def refuse(names, cache_dir):
        raise AssertionError(f"nothing may be built here, got {names}")

    monkeypatch.setattr(built_models, "_fetch", refuse)


def test_cpu_without_entry_runs_the_stand_in_says_so_and_records_it(tmp_path, cache, no_build, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    lines: list[str] = []
    assert run(suite_file(tmp_path), tmp_path / "r", resolver=resolver, log=lines.append) == 0
    notes = [x for x in lines if x.startswith("note:")]
    assert len(notes) == 1 and "vit-s-swiglu" in notes[0] and "tiny-vit-swiglu" in notes[0] and "no GPU" in notes[0]
    recs = list(runs(tmp_path / "r").values())
    assert recs and all(r["config"]["model"] == STAND_IN for r in recs)
    for r in recs:
        sub = r["meta"]["substituted"]
        assert sub["vit-s-swiglu"] == "tiny-vit-swiglu" and "no GPU" in sub["why"]

    # The report says it in the findings.
    from benchmarks.report.cli import build_report

    build_report(tmp_path / "r", plots=False)
    findings = (tmp_path / "r" / "findings.md").read_text()
    assert f"{len(recs)} run(s) used `tiny-vit-swiglu` in place of `vit-s-swiglu`" in findings

    # The same suite with the entry cached runs the real model: other run ids, nothing substituted.
    publish_fake_entry()
    lines.clear()
    assert run(suite_file(tmp_path), tmp_path / "r2", resolver=resolver, log=lines.append) == 0
    cached = list(runs(tmp_path / "r2").values())
    assert not any(x.startswith("note:") for x in lines)
    assert all(r["config"]["model"] == COMPOSED and "substituted" not in r["meta"] for r in cached)
    assert not {r["run_id"] for r in cached} & {r["run_id"] for r in recs}


@pytest.mark.parametrize("gpu", [False, True])
def test_cached_entry_is_used_on_any_machine(tmp_path, cache, no_build, monkeypatch, gpu):
    publish_fake_entry()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    from benchmarks.runner.suite import load_suite

    suite = load_suite(suite_file(tmp_path), resolver=resolver)
    plan = built_models.resolve_built(suite, _facts, log=lambda s: None)
    assert plan.cached == ["vit-s-swiglu"] and not plan.build and not plan.substituted
    assert suite.models_for(suite.tasks[0], "llm", COMPOSED) == [COMPOSED]


def _facts(name: str):
    from benchmarks.runner.grid import TaskFacts

    t = resolver(name)
    return TaskFacts(t.family, t.default_model)


def test_gpu_builds_a_missing_entry_once_before_the_grid(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    calls: list[list[str]] = []

    def fake_build(names, cache_dir):
        calls.append(list(names))
        publish_fake_entry()

    monkeypatch.setattr(built_models, "_fetch", fake_build)
    from benchmarks.runner.cli import run_suite
    from benchmarks.runner.suite import load_suite

    # A dry run decides and says so, but builds nothing.
    lines: list[str] = []
    run_suite(str(suite_file(tmp_path, "[fake-vit, fake-vit-2]")), tmp_path / "r", resolver=resolver,
              dry_run=True, progress=False, log=lines.append)
    assert not calls and any(x.startswith("would build vit-s-swiglu") for x in lines)
    assert not any(x.startswith("note:") for x in lines)

    # Two tasks name it: one build, its inputs first; afterwards the entry is cached and nothing is built again.
    suite = load_suite(suite_file(tmp_path, "[fake-vit, fake-vit-2]"), resolver=resolver)
    plan = built_models.resolve_built(suite, _facts, log=lambda s: None)
    assert calls == [["dinov2-s", "fashion-mnist", "emoji", "vit-s-swiglu"]]
    assert plan.build == ["vit-s-swiglu"] and not suite.substitutions
    plan = built_models.resolve_built(suite, _facts, log=lambda s: None)
    assert len(calls) == 1 and plan.cached == ["vit-s-swiglu"]


@pytest.mark.parametrize("gpu", [False, True])
def test_assets_needed_follows_the_decision(cache, monkeypatch, gpu):
    """run_all.sh fetches these: no vit-s-swiglu where it cannot be built; on a GPU, after what its build reads."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    from benchmarks.runner.assets_needed import assets_needed

    got = assets_needed("vision-tower")
    if gpu:
        assert got == ["dinov2-s", "emoji", "fashion-mnist", "smollm2-135m", "vit-s-swiglu"]
    else:
        assert got == ["emoji", "fashion-mnist", "smollm2-135m"]


def test_models_per_family_are_typed(tmp_path):
    """`models: {vlm: [...]}` gives the vision-language tasks their own list; an unknown family is an error."""
    from benchmarks.runner.suite import SuiteError, load_suite

    good = write_suite(tmp_path / "g.yaml", BASE_SUITE.replace("tasks: [fake]", "tasks: [fake-vit]")
                       + "models: {vlm: [dinov2-s+tiny-byte-llama, vit-s-swiglu+tiny-byte-llama]}\n")
    suite = load_suite(good, resolver=resolver)
    assert suite.models_for(suite.tasks[0], "vlm", "x") == ["dinov2-s+tiny-byte-llama", COMPOSED]
    assert suite.models_for(suite.tasks[0], "llm", "x") == ["x"]
    for text, needle in (("models: {vml: [tiny-llama]}\n", "models.vml: must be one of 'llm' or 'vlm'"),
                         ("models: {vlm: []}\n", "models.vlm: must not be empty")):
        with pytest.raises(SuiteError, match=needle):
            load_suite(write_suite(tmp_path / "b.yaml", BASE_SUITE + text), resolver=resolver)
