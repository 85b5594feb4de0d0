"""The task registry: decorator, built-in discovery, --include-path plugins, entry points, YAML, `list tasks`."""

from __future__ import annotations

import argparse
import inspect
import io
import json
import re
import socket
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

from benchmarks.runner.sidefile import read_full
from tasks import registry
from tasks.base import Task
from tasks.registry import get_task, list_tasks, load_tasks, register_task, task_source

ROOT = Path(__file__).resolve().parents[1]
BUILTIN_LLM = {
    "socialiqa", "quartz", "sarcasm", "movie-reviews", "gsm8k", "boolq", "piqa", "siqa", "hellaswag",
    "winogrande", "arc_easy", "arc_challenge", "openbookqa", "gsm8k-hub",
}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture
def clean_registry():
    """Snapshot the registry and restore it, so tests may register throwaway tasks."""
    saved = (dict(registry._TASKS), dict(registry._SOURCES), list(registry._ERRORS), set(registry._LOADED))
    yield
    for store, old in zip((registry._TASKS, registry._SOURCES, registry._ERRORS, registry._LOADED), saved):
        store.clear()
        store.update(old) if isinstance(store, (dict, set)) else store.extend(old)


def _plugin_source(doc: str = "README.md") -> str:
    """The first python block of the "Adding a task" section of README.md (or of ``doc``)."""
    text = (ROOT / doc).read_text()
    if doc == "README.md":
        text = text[text.index("## Adding a task"):]
    return re.search(r"```python\n(.*?)```", text, re.DOTALL).group(1)


def test_decorator_registers_and_rejects_clashes(clean_registry):
    class A(Task):
        load_splits = setup = train_batches = loss = evaluate = None

    class B(A):
        pass

    register_task("zz-a")(A)
    assert A.name == "zz-a" and registry.task_class("zz-a") is A and "zz-a" in list_tasks()
    register_task("zz-a")(A)  # the same class again (a re-import) is fine
    with pytest.raises(ValueError, match="already registered"):
        register_task("zz-a")(B)
    with pytest.raises(ValueError, match="Task subclass"):
        register_task("zz-b")(dict)
    with pytest.raises(ValueError, match="non-empty"):
        register_task(" ")


def test_builtin_tasks_found_with_families():
    load_tasks()
    assert BUILTIN_LLM <= set(list_tasks("llm"))
    assert not BUILTIN_LLM & set(list_tasks("vlm"))
    assert task_source("socialiqa") == "builtin"
    assert not [e for e in registry.load_errors() if "/tasks/llm/" in e.path], registry.load_errors()


def test_unknown_task_names_the_known_ones():
    with pytest.raises(KeyError, match="unknown task 'nope'.*socialiqa"):
        get_task("nope")


def test_every_builtin_llm_task_declares_its_contract():
    load_tasks()
    for name in BUILTIN_LLM:
        task = get_task(name)
        d = task.describe()
        assert d["family"] == "llm" and d["dataset"] and d["source"] and d["protocol"], name
        assert task.selection_metric in task.metrics and task.report_metric in task.metrics, name
        assert all(task.metrics.values()), name  # every metric here is higher-is-better
        assert task.requires_network == ("/" in task.dataset), name  # hub ids have an org, assets do not


@pytest.mark.parametrize("doc", ["README.md", "docs/adding_a_task.md"])
def test_include_path_plugin_end_to_end(tmp_path, clean_registry, doc):
    """The plugin of the README (and of the longer guide): load, setup on a tiny model, train, evaluate."""
    (tmp_path / "sum_check.py").write_text(_plugin_source(doc))
    errors = load_tasks(include_paths=[tmp_path], builtin=False, entry_points=False)
    assert errors == []
    assert task_source("sum-check").startswith("include:") and "sum_check.py" in task_source("sum-check")
    task = get_task("sum-check")
    setup = task.setup("tiny-llama")
    opt = torch.optim.AdamW(setup.model.parameters(), lr=1e-2)
    batches = task.train_batches(setup, batch_size=4, seed=0)
    first = None
    for _ in range(4):
        batch = next(batches)
        loss = task.loss(setup, setup.model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        first = loss.item() if first is None else first
    assert torch.isfinite(loss) and loss.item() < first
    metrics = task.evaluate(setup, setup.model, "test", limit=4, batch_size=2)
    assert set(metrics) == {"acc"} and 0.0 <= metrics["acc"] <= 1.0
    assert task.chance() == {"acc": 0.5}


def test_yaml_plugin_and_broken_files_reported_without_hiding_others(tmp_path, clean_registry):
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "validation", "test"):
        (data / f"{split}.jsonl").write_text('{"q": "Is 2 even", "label": 1}\n{"q": "Is 3 even", "label": 0}\n')
    (tmp_path / "even.yaml").write_text(
        "task: even-yesno\ndataset: local\nprompt: \"{q}?\\nAnswer:\"\nchoices: ['no', 'yes']\nlabel: label\n"
        "metrics: [acc]\n"
    )
    (tmp_path / "broken.py").write_text("import nonexistent_module_xyz\n")
    (tmp_path / "bad.yaml").write_text("task: bad\ndataset: x\nprompt: p\nchoices: [a, b]\nlabel: label\nmetrics: [f1]\n")
    (tmp_path / "typo.yaml").write_text("task: typo\ndataset: x\nprompt: p\nchoices: [a, b]\nlabel: label\npromt: q\n")
    errors = load_tasks(include_paths=[tmp_path], builtin=False, entry_points=False)
    by_file = {Path(e.path).name: e.problem for e in errors}
    assert set(by_file) == {"broken.py", "bad.yaml", "typo.yaml"}
    assert "nonexistent_module_xyz" in by_file["broken.py"] and "line 1" in by_file["broken.py"]
    assert "metrics" in by_file["bad.yaml"] and "'promt'" in by_file["typo.yaml"]
    assert all("\n" not in p for p in by_file.values())

    task = get_task("even-yesno", data_dir=data)
    setup = task.setup("tiny-llama")
    assert task.doc_to_text(task.load_splits()["test"][0]) == "Is 2 even?\nAnswer:"
    assert task.train_pair(task.load_splits()["test"][0]) == ("Is 2 even?\nAnswer:", " yes")
    assert set(task.evaluate(setup, setup.model, "test")) == {"acc"}

    # `list tasks` shows the good task and names each broken file with its problem; exit code 1.
    from tasks import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    out = io.StringIO()
    rc = cli._list_tasks(parser.parse_args(["tasks", "--include-path", str(tmp_path)]), out=out)
    text = out.getvalue()
    assert rc == 1
    assert re.search(r"^even-yesno\s+llm\s+\S", text, re.MULTILINE)
    assert str(tmp_path / "broken.py") in text and "ModuleNotFoundError" in text
    assert re.search(r"^socialiqa\s+llm", text, re.MULTILINE)  # the built-ins are still listed


def test_missing_include_path_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_tasks(include_paths=[tmp_path / "nope"], builtin=False, entry_points=False)


def test_entry_point_plugins(tmp_path, monkeypatch, clean_registry):
    pkg = tmp_path / "ep_tasks_pkg.py"
    pkg.write_text(_plugin_source().replace('"sum-check"', '"sum-check-ep"'))
    monkeypatch.syspath_prepend(str(tmp_path))
    good = metadata.EntryPoint("sum", "ep_tasks_pkg", registry.ENTRY_POINT_GROUP)
    bad = metadata.EntryPoint("bad", "ep_missing_pkg_xyz", registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry.metadata, "entry_points",
                        lambda group: [good, bad] if group == registry.ENTRY_POINT_GROUP else [])
    errors = load_tasks(builtin=False)
    assert "sum-check-ep" in list_tasks() and task_source("sum-check-ep").startswith("entry-point:")
    assert any("ep_missing_pkg_xyz" in e.path and "ModuleNotFoundError" in e.problem for e in errors)
    sys.modules.pop("ep_tasks_pkg", None)


def test_list_tasks_reports_not_fetched_hub_data():
    from tasks import cli

    load_tasks()
    assert cli.split_sizes(get_task("piqa")).startswith("not fetched")
    fixture = get_task("piqa", data_dir=ROOT / "tests/fixtures/tasks/piqa")
    assert cli.split_sizes(fixture) == "7/1/8"  # 8 train rows, 10% held out as validation; test = hub validation


def test_list_methods_models_datasets(capsys):
    from tasks import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    for what, expect in (("methods", r"^lora$"), ("models", r"^smollm2-135m\s"), ("datasets", r"^socialiqa\s")):
        assert cli.main(parser.parse_args([what])) == 0
        text = capsys.readouterr().out
        assert re.search(expect, text, re.MULTILINE), what
        if what != "methods":  # every column has a header; heavy assets (left out of `fetch --all`) say so
            assert text.splitlines()[0].split() == ["name", "status", "heavy", "license", "description"]
    assert re.search(r"^cifar10\s+(not fetched|fetched)\s+yes \(not in --all\)", text, re.MULTILINE)
    with pytest.raises(SystemExit):
        parser.parse_args(["widgets"])


def test_readme_plugin_through_the_runner(tmp_path, clean_registry):
    """`nalora-bench run --include-path DIR` on a suite naming the README's plugin task, then the report."""
    from benchmarks.cli import main as cli

    plugins = tmp_path / "my_tasks"
    plugins.mkdir()
    (plugins / "sum_check.py").write_text(_plugin_source())
    suite = tmp_path / "my_suite.yaml"
    suite.write_text(
        "models: {llm: [tiny-llama]}\ntasks: [sum-check]\nmethods: [lora, nalora]\nseeds: [0]\nlr_grid: [1.0e-3]\n"
        "training: {steps: 4, batch_size: 4, eval_every: 0, eval_limit: 4, test_limit: 4, log_every: 2, diag_batches: 1}\n"
    )
    out = tmp_path / "results"
    assert cli(["run", "--suite", str(suite), "--include-path", str(plugins), "--out", str(out), "--no-progress"]) == 0
    recs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    assert sorted(r["config"]["method"] for r in recs) == ["lora", "nalora"]
    # trained and evaluated through the runner (a tiny model after a few steps may be judged "collapsed": a result)
    assert all(r["status"] in ("ok", "collapsed") and r["error"] is None and r["config"]["task"] == "sum-check"
               for r in recs), [r["error"] for r in recs]
    assert cli(["report", "--results", str(out)]) == 0
    assert "sum-check" in (out / "leaderboard.csv").read_text()


# -- task fingerprint (run ids must change when a task's definition or data changes) ---------------

_YAML = ("task: fp-task\ndata_files: {{train: d.jsonl, validation: d.jsonl, test: d.jsonl}}\n"
         "prompt: \"{prompt}\"\nchoices: {choices}\nlabel: label\nmetrics: [acc]\n")


def _yaml_task(tmp_path, prompt="{q}?\\nAnswer:", choices="['no', 'yes']"):
    from tasks.yaml_task import task_class_from_yaml

    (tmp_path / "fp.yaml").write_text(_YAML.format(prompt=prompt, choices=choices))
    return task_class_from_yaml(tmp_path / "fp.yaml")()


def test_fingerprint_is_stable_and_follows_prompt_labels_and_data(tmp_path, monkeypatch):
    data = tmp_path / "d.jsonl"
    data.write_text('{"q": "Is 2 even", "label": 1}\n{"q": "Is 3 even", "label": 0}\n')
    task = _yaml_task(tmp_path)
    base = task.fingerprint()
    assert len(base) == 64 and base == task.fingerprint() == _yaml_task(tmp_path).fingerprint()
    assert _yaml_task(tmp_path, prompt="{q}?\\nReply:").fingerprint() != base  # prompt edited
    assert _yaml_task(tmp_path, choices="['No', 'Yes']").fingerprint() != base  # labels edited
    data.write_text('{"q": "Is 2 even", "label": 1}\n{"q": "Is 5 even", "label": 0}\n')
    assert _yaml_task(tmp_path).fingerprint() != base  # data edited
    data.write_text('{"q": "Is 2 even", "label": 1}\n{"q": "Is 3 even", "label": 0}\n')
    assert _yaml_task(tmp_path).fingerprint() == base  # same definition, same data: same id

    # Cheap: computing it never loads the data of a task with local files or a cached asset.
    from tasks.llm.lm import LMTask

    def refuse(self):
        raise AssertionError("fingerprint loaded the data")

    monkeypatch.setattr(LMTask, "load_splits", refuse)
    assert _yaml_task(tmp_path).fingerprint() == base
    get_task("sarcasm").fingerprint()


def test_fingerprint_of_data_dir_is_content_not_path(tmp_path):
    import shutil

    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(ROOT / "tests/fixtures/tasks/quartz", a)
    shutil.copytree(ROOT / "tests/fixtures/tasks/quartz", b)
    assert get_task("quartz", data_dir=a).fingerprint() == get_task("quartz", data_dir=b).fingerprint()
    with open(b / "test.jsonl", "a") as f:
        f.write('{"question": "Extra?", "choices": ["x", "y"], "label": 0}\n')
    assert get_task("quartz", data_dir=a).fingerprint() != get_task("quartz", data_dir=b).fingerprint()
    assert get_task("quartz").fingerprint() != get_task("sarcasm").fingerprint()


def test_fingerprint_of_a_cached_asset_follows_its_manifest(tmp_path, monkeypatch):
    """An asset task is identified by the sha256 the cache manifest records for its data files."""
    monkeypatch.setenv("NALORA_BENCH_CACHE", str(tmp_path))
    (tmp_path / "entries" / "sarcasm").mkdir(parents=True)

    def manifest(data_sha: str, state_sha: str) -> None:
        files = {"data/test/data-00000-of-00001.arrow": {"sha256": data_sha, "size": 1},
                 "data/test/state.json": {"sha256": state_sha, "size": 1}}
        (tmp_path / "manifest.json").write_text(json.dumps({"sarcasm": {"files": files, "main_file": "x"}}))

    manifest("a" * 64, "s" * 64)
    first = get_task("sarcasm").fingerprint()
    manifest("a" * 64, "t" * 64)  # datasets' own state fingerprint: not the data
    assert get_task("sarcasm").fingerprint() == first
    manifest("b" * 64, "t" * 64)
    assert get_task("sarcasm").fingerprint() != first


def test_fingerprint_of_a_plugin_follows_the_builtin_it_extends(tmp_path):
    """A plugin that changes one option of a built-in is defined by both files: editing the built-in's file
    changes the plugin's run ids; abstract bases (shared machinery) are not part of any definition."""
    from tasks.vlm.qa import FashionMNISTQA, VisionQATask

    class Variant(FashionMNISTQA):
        pass

    registry.register_task("fp-variant")(Variant)
    try:
        files = Variant().definition_files()
        assert files[0] == __file__ and inspect.getfile(FashionMNISTQA) in files
        assert len(files) == 2 and FashionMNISTQA().definition_files() == [inspect.getfile(FashionMNISTQA)]
        assert inspect.getfile(VisionQATask) == inspect.getfile(FashionMNISTQA)  # same file: listed once
    finally:
        registry.unregister_task("fp-variant")


def test_fingerprint_covers_constructor_options():
    assert get_task("fashion-mnist-probe", max_train=10).fingerprint() != get_task("fashion-mnist-probe").fingerprint()
    assert get_task("fashion-mnist-probe", max_train=10).fingerprint() == registry.task_class("fashion-mnist-probe")(10).fingerprint()


# -- name clashes and YAML mistakes: one-line errors before any work -------------------------------


def test_plugin_reusing_a_builtin_name_is_an_error_naming_both(tmp_path, clean_registry):
    load_tasks()
    (tmp_path / "mine.py").write_text(
        "from tasks.registry import register_task\nfrom tasks.llm.lm import ChoiceTask\n\n"
        "@register_task('sarcasm')\nclass Mine(ChoiceTask):\n    dataset = 'x'\n"
    )
    with pytest.raises(registry.TaskNameClash, match=r"sarcasm\.yaml.*mine\.py") as err:
        load_tasks(include_paths=[tmp_path])
    assert "\n" not in str(err.value)
    with pytest.raises(registry.TaskNameClash):  # every later load too: `run` cannot go on with the built-in
        load_tasks(include_paths=[tmp_path])
    assert registry.task_class("sarcasm").__name__ != "Mine"


def test_two_plugin_files_with_one_name_is_an_error_naming_both_files(tmp_path, clean_registry):
    for stem in ("first", "second"):
        (tmp_path / f"{stem}.py").write_text(
            "from tasks.registry import register_task\nfrom tasks.llm.lm import ChoiceTask\n\n"
            f"@register_task('dup-task')\nclass T_{stem}(ChoiceTask):\n    dataset = 'x'\n"
        )
    with pytest.raises(registry.TaskNameClash, match=r"first\.py.*second\.py|second\.py.*first\.py"):
        load_tasks(include_paths=[tmp_path], builtin=False, entry_points=False)


def test_yaml_label_offset_past_the_choices_is_one_line(tmp_path, clean_registry):
    (tmp_path / "d.jsonl").write_text('{"q": "a", "label": "1"}\n{"q": "b", "label": "3"}\n')
    (tmp_path / "off.yaml").write_text(
        "task: off-task\ndata_files: {train: d.jsonl, validation: d.jsonl, test: d.jsonl}\nprompt: '{q}'\n"
        "choices: [x, y]\nlabel: {field: label, offset: -1}\n"
    )
    assert load_tasks(include_paths=[tmp_path], builtin=False, entry_points=False) == []
    with pytest.raises(ValueError, match=r"task 'off-task': label field 'label' = '3' \+ offset -1 gives choice 2, "
                                         r"outside the 2 choices") as err:
        get_task("off-task").load_splits()
    assert "\n" not in str(err.value)


def test_unknown_yaml_key_suggests_the_closest(tmp_path, clean_registry):
    (tmp_path / "typo.yaml").write_text("task: t\ndataset: x\npromt: p\nchoices: [a, b]\nlabel: label\n")
    (tmp_path / "typo2.yaml").write_text("task: t2\ndataset: x\nprompt: p\nchoices: [a, b]\nlabel: label\nmetrix: [acc]\n")
    errors = {Path(e.path).name: e.problem for e in load_tasks(include_paths=[tmp_path], builtin=False, entry_points=False)}
    assert "unknown key(s) 'promt' (did you mean 'prompt'?)" in errors["typo.yaml"]
    assert "'metrix' (did you mean 'metrics'?)" in errors["typo2.yaml"]


# -- local data: YAML data_files, `list tasks` reasons ---------------------------------------------


def test_yaml_data_files_csv_and_parquet(tmp_path, clean_registry):
    import datasets

    rows = [{"q": f"Is {i} even", "label": int(i % 2 == 0)} for i in range(6)]
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "train.csv"), index=False)
    datasets.Dataset.from_list(rows[:3]).to_parquet(str(tmp_path / "val.parquet"))
    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows[3:]) + "\n")
    (tmp_path / "local.yaml").write_text(
        "task: local-even\ndata_files: {train: train.csv, validation: val.parquet, test: test.jsonl}\n"
        "prompt: \"{q}?\\nAnswer:\"\nchoices: ['no', 'yes']\nlabel: label\nmetrics: [acc]\n"
    )
    assert load_tasks(include_paths=[tmp_path], builtin=False, entry_points=False) == []
    task = get_task("local-even")
    assert [len(task.load_splits()[s]) for s in ("train", "validation", "test")] == [6, 3, 3]
    assert task.assets("tiny-llama") == ["tiny-llama"]  # local data: nothing to fetch
    assert task.describe()["data_files"] == {"train": "train.csv", "validation": "val.parquet", "test": "test.jsonl"}
    (tmp_path / "missing.yaml").write_text(
        "task: m\ndata_files: {train: nope.jsonl}\nprompt: p\nchoices: [a, b]\nlabel: label\n")
    errors = load_tasks(include_paths=[tmp_path], builtin=False, entry_points=False)
    assert any("data_files.train" in e.problem and "nope.jsonl" in e.problem for e in errors)


def test_list_tasks_says_why_a_task_is_unavailable(tmp_path, clean_registry):
    from tasks import cli

    (tmp_path / "gone.py").write_text(
        "from tasks.registry import register_task\nfrom tasks.llm.lm import ChoiceTask\n\n"
        "@register_task('gone-task')\nclass Gone(ChoiceTask):\n    dataset = 'x'\n"
        "    def load_splits(self):\n        raise ValueError('my data server is down')\n"
    )
    load_tasks(include_paths=[tmp_path], builtin=False, entry_points=False)
    assert cli.split_sizes(get_task("gone-task")) == "unavailable (ValueError: my data server is down)"


def _guide_block(lang: str, after: str) -> str:
    text = (ROOT / "docs/adding_a_task.md").read_text()
    return re.search(rf"```{lang}\n(.*?)```", text[text.index(after):], re.DOTALL).group(1)


def _guide_command(after: str, out: Path) -> list[str]:
    """The guide's `nalora-bench run ...` command of the section ``after``, as CLI arguments, writing to ``out``."""
    import shlex

    argv = shlex.split(_guide_block("bash", after))
    assert argv[:2] == ["nalora-bench", "run"] and "--tasks" in argv and "--include-path" in argv, argv
    return [*argv[1:], "--out", str(out), "--no-progress"]


def _sha256(path: str | Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _files_by_path(rec: dict) -> dict[str, dict]:
    files = rec["provenance"]["files"]  # in the side file: ``rec`` is read with ``read_full``
    for f in files:  # every listed file with the sha256 of its bytes now (hashed here independently)
        assert f["sha256"] == _sha256(f["path"]) and f["bytes"] == Path(f["path"]).stat().st_size, f
    return {f["path"]: f for f in files}


def test_guide_language_plugin_with_local_files_through_the_runner(tmp_path, clean_registry, monkeypatch):
    """The guide's YAML plugin on local JSONL, run by the guide's own `run --tasks parity --include-path` command."""
    from benchmarks.cli import main as cli

    plugins = tmp_path / "my_tasks"
    plugins.mkdir()
    (plugins / "parity.yaml").write_text(_guide_block("yaml", "## A language task on local files"))
    for split, ns in (("train", range(0, 16)), ("val", range(16, 20)), ("test", range(20, 26))):
        (plugins / f"parity_{split}.jsonl").write_text("".join(json.dumps({"n": n, "label": int(n % 2 == 0)}) + "\n" for n in ns))
    out = tmp_path / "results"
    monkeypatch.chdir(tmp_path)  # the guide's relative `--include-path my_tasks`
    assert cli(_guide_command("## A language task on local files", out)) == 0
    recs = [read_full(p) for p in sorted((out / "runs").glob("*.json"))]
    assert sorted(r["config"]["method"] for r in recs) == ["lora", "nalora"]
    assert all(r["status"] in ("ok", "collapsed") and r["error"] is None and r["config"]["task"] == "parity"
               for r in recs), [r["error"] for r in recs]
    assert recs[0]["task_info"]["chance"] == {"acc": 0.5}
    # Provenance: exactly the three local data files, each with its sha256 (tiny-llama has no weight files).
    files = _files_by_path(recs[0])
    assert sorted(files) == [str((plugins / f"parity_{s}.jsonl").resolve()) for s in ("test", "train", "val")]
    assert {f["role"] for f in files.values()} == {"data"}


def _cache_with(tmp_path: Path, names: tuple[str, ...]) -> Path:
    """An asset cache under ``tmp_path`` holding the real cache's ``names`` (linked, not copied), so a test's
    aligned connector is written here and not into the user's cache."""
    from benchmarks.assets import cache_dir

    real = cache_dir()
    root = tmp_path / "cache"
    (root / "entries").mkdir(parents=True)
    manifest = json.loads((real / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({n: manifest[n] for n in names}))
    for n in names:
        (root / "entries" / n).symlink_to(real / "entries" / n)
    return root


def _shapes_plugin(plugins: Path) -> list[Path]:
    """The guide's vision plugin and its PNG files (two classes that differ in brightness)."""
    import numpy as np
    from PIL import Image

    plugins.mkdir()
    (plugins / "shapes.py").write_text(_guide_block("python", "## A vision task on local images"))
    rng = np.random.default_rng(0)
    pngs = []
    for split, n in (("train", 6), ("validation", 2), ("test", 3)):
        for cls, value in (("circle", 40), ("square", 200)):
            folder = plugins / "shapes_data" / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                arr = (rng.random((28, 28)) * 30 + value).astype("uint8")
                Image.fromarray(arr).convert("RGB").save(folder / f"{i}.png")
                pngs.append((folder / f"{i}.png").resolve())
    return pngs


def test_guide_vision_plugin_through_the_runner_records_every_file(tmp_path, clean_registry, monkeypatch, capfd):
    """The guide's vision plugin run by its own `run --tasks shapes --include-path` command on the tiny composed
    VLM, connector aligned as in a real run: the record lists every weight and data file with a correct sha256,
    and `--no-progress` leaves stderr free of progress bars (alignment, weight loading, training, evaluation)."""
    from conftest import require_assets

    from benchmarks.cli import main as cli

    require_assets("fashion-mnist", "emoji")  # the connector's default alignment data
    cache = _cache_with(tmp_path, ("fashion-mnist", "emoji"))
    monkeypatch.setenv("NALORA_BENCH_CACHE", str(cache))
    monkeypatch.setenv("NALORA_BENCH_NO_PROGRESS", "0")  # progress on: --no-progress itself must silence it
    pngs = _shapes_plugin(tmp_path / "my_tasks")
    out = tmp_path / "results"
    monkeypatch.chdir(tmp_path)
    capfd.readouterr()
    assert cli(_guide_command("## A vision task on local images", out)) == 0
    err = capfd.readouterr().err
    assert not re.search(r"\d+%\||it/s\]|s/it\]|step/s\]|fwd/s\]", err), err[-2000:]
    recs = [read_full(p) for p in sorted((out / "runs").glob("*.json"))]
    assert len(recs) == 1 and recs[0]["error"] is None and recs[0]["status"] in ("ok", "collapsed"), recs[0]["error"]
    assert recs[0]["config"]["task"] == "shapes" and recs[0]["task_info"]["chance"] == {"acc": 0.5, "acc_norm": 0.5}
    files = _files_by_path(recs[0])
    connector = sorted((cache / "vlm-connectors").glob("tiny-dinov2+tiny-byte-llama-*/connector.safetensors"))
    assert len(connector) == 1 and files[str(connector[0].resolve())]["role"] == "weights"
    assert {str(p) for p in pngs} <= set(files) and all(files[str(p)]["role"] == "data" for p in pngs)
    manifest = json.loads((cache / "manifest.json").read_text())
    for name in ("fashion-mnist", "emoji"):  # what the connector was aligned on: every file of both entries
        want = {str((cache / "entries" / name / rel).resolve()): f["sha256"] for rel, f in manifest[name]["files"].items()}
        assert {p: files[p]["sha256"] for p in want} == want
    assert len(files) == 1 + len(pngs) + sum(len(manifest[n]["files"]) for n in ("fashion-mnist", "emoji"))


def test_guide_vision_plugin_with_local_images(tmp_path, clean_registry):
    import numpy as np
    from PIL import Image

    plugins = tmp_path / "my_tasks"
    _shapes_plugin(plugins)
    assert load_tasks(include_paths=[plugins], builtin=False, entry_points=False) == []
    task = get_task("shapes", align=False)
    assert task.classes() == ["circle", "square"] and task.chance() == {"acc": 0.5, "acc_norm": 0.5}
    setup = task.setup("tiny-dinov2+tiny-byte-llama")
    loss = task.loss(setup, setup.model, next(task.train_batches(setup, batch_size=4, seed=0)))
    assert torch.isfinite(loss)
    metrics, per = task.evaluate_examples(setup, setup.model, "test")
    assert metrics["n"] == 6 and len(per["correct"]) == 6
    assert len(task.heldout_batches(setup, n=1, batch_size=4)) == 1
    first = task.fingerprint()
    Image.fromarray(np.zeros((28, 28), "uint8")).convert("RGB").save(plugins / "shapes_data/test/circle/0.png")
    assert get_task("shapes", align=False).fingerprint() != first  # edited images: a new task identity
