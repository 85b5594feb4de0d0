"""lm-eval interop: a saved NA-LoRA adapter scored by lm_eval's ``hf`` model (``peft=``) as by our evaluator.

Tiny random Llama (``tasks.common.tiny_llama`` saved with ``save_pretrained``) on the 8-example local
QuaRTz fixture; everything offline.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval is not installed (optional extra: pip install '.[interop]')")

from benchmarks.interop import lm_eval_check as check  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "tasks" / "quartz"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One CLI run on the tiny model: (its JSON record, its work dir with model, adapter and lm-eval task)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    out, work = tmp_path_factory.mktemp("out"), tmp_path_factory.mktemp("work")
    threads = torch.get_num_threads()
    try:
        rc = check.main([
            "--task", "quartz", "--model", "tiny-llama", "--data-dir", str(FIXTURE), "--steps", "10",
            "--lr", "1e-2", "--threads", str(threads), "--out", str(out), "--work-dir", str(work),
        ])
    finally:
        torch.set_num_threads(threads)
        mp.undo()
    assert rc == 0
    rec = json.loads((out / "lm_eval_quartz.json").read_text())
    assert (out / "lm_eval_quartz.md").read_text().startswith("# lm-eval interop: `quartz`")
    return rec, work


def test_lm_eval_scores_saved_nalora_adapter_like_the_project(run):
    rec, work = run
    c = rec["comparison"]
    assert c["ok"] and all(c["criteria"].values())
    assert c["n"] == 8 and c["choices"] == 16
    assert c["max_abs_ll_diff"] <= 1e-3
    assert c["same_pred"] == c["same_pred_norm"] == c["same_acc"] == c["same_acc_norm"] == 8
    assert c["metrics"]["project"] == c["metrics"]["lm_eval"]
    # the per-example record carries both evaluators' numbers
    ex = rec["per_example"][0]
    assert len(ex["project_ll"]) == len(ex["lm_eval_ll"]) == 2
    # a plain peft LoRA adapter, with NA-LoRA's mask folded into B_gate (zero rows) and no NA-LoRA state
    assert rec["adapter"]["peft_type"] == "LORA"
    # peft's own files only (its model card besides): nothing NA-LoRA-specific to load
    assert set(rec["adapter"]["files"]) - {"README.md"} == {"adapter_config.json", "adapter_model.safetensors"}
    assert rec["adapter"]["modules"] == {"down_proj": 2, "gate_proj": 2, "up_proj": 2}
    masked = rec["adapter"]["masked_gate_rows"]
    assert 0 < masked["zero_rows"] < masked["rows"]
    assert rec["training"]["method_config"]["mask_interval"] == 2
    # the adapter matters: scoring the base model would be caught
    assert c["adapter_effect"]["max_abs_ll_change_vs_base"] > 10 * c["tolerance_abs_ll"]


def test_lm_eval_ignoring_the_adapter_is_caught(run):
    """The plausible bug this check exists for: lm_eval scoring the base model (``peft=`` dropped)."""
    rec, work = run
    task_dir = work / "lm_eval_task"
    base = check.lm_eval_scores(task_dir, rec["lm_eval"]["task"], work / "base", None, batch_size=16)
    per = rec["per_example"]
    ours = check.Scores([e["id"] for e in per], [e["project_ll"] for e in per], [e["project_acc"] for e in per],
                        [e["project_acc_norm"] for e in per], rec["comparison"]["metrics"]["project"])
    docs = [json.loads(line) for line in next(task_dir.glob("*.jsonl")).read_text().splitlines()]
    result = check.compare(ours, base, docs, [e["base_ll"] for e in per], tol=1e-3)
    assert not result["ok"]
    assert not result["criteria"]["every choice log-likelihood within 0.001 (abs)"]
    # lm_eval's base-model scores are our base-model scores: the difference is the adapter, not the harness
    assert max(abs(a - b) for e, ll in zip(per, base.lls) for a, b in zip(e["base_ll"], ll)) <= 1e-3


def _scores(lls, labels=(0, 1)):
    acc = [int(max(range(len(ll)), key=lambda j: (ll[j], -j)) == y) for ll, y in zip(lls, labels)]
    return check.Scores(["a", "b"], lls, acc, acc, {"acc": sum(acc) / 2, "acc_norm": sum(acc) / 2})


DOCS = [{"id": "a", "choices": ["x", "y"], "label": 0}, {"id": "b", "choices": ["x", "y"], "label": 1}]


def test_compare_tolerance_and_effect_guard():
    ours = _scores([[-1.0, -2.0], [-3.0, -1.0]])
    base = [[-2.0, -1.0], [-3.0, -1.0]]
    assert check.compare(ours, _scores([[-1.0004, -2.0], [-3.0, -1.0]]), DOCS, base, tol=1e-3)["ok"]
    # a log-likelihood off by more than the tolerance fails even when every argmax agrees
    off = check.compare(ours, _scores([[-1.002, -2.0], [-3.0, -1.0]]), DOCS, base, tol=1e-3)
    assert not off["ok"] and off["same_pred"] == 2
    # an adapter that changes nothing cannot show that lm_eval applied it
    inert = check.compare(ours, ours, DOCS, [[-1.0, -2.0], [-3.0, -1.0]], tol=1e-3)
    assert not inert["ok"] and inert["max_abs_ll_diff"] == 0
    with pytest.raises(check.InteropError, match="different examples"):
        check.compare(ours, check.Scores(["a", "c"], ours.lls, ours.acc, ours.acc_norm, ours.metrics), DOCS, base, 1e-3)


def test_export_rejects_tasks_whose_context_varies_per_choice():
    from tasks.registry import get_task

    task = get_task("quartz", data_dir=str(FIXTURE))
    task.requests = lambda ex: [(f"{task.doc_to_text(ex)} {c}", " end") for c in task.doc_to_choices(ex)]
    with pytest.raises(ValueError, match="context varies per choice"):
        check.export_docs(task, "test", None)
