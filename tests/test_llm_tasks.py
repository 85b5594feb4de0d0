"""Language tasks: tokenisation, SFT masks, lm-eval scoring, generation, and every built-in task end to end."""

from __future__ import annotations

import math
import random
import shutil
import socket
from pathlib import Path

import pytest
import torch
from conftest import require_assets

from tasks.common import (
    IGNORE_INDEX,
    choice_metrics,
    encode_pair,
    final_number,
    greedy_generate,
    loglikelihoods,
    sft_collate,
    static_cache,
    tiny_llama,
)
from tasks.registry import get_task, list_tasks, load_tasks

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "tasks"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama()


def _llm_tasks() -> list[str]:
    load_tasks()
    return list_tasks("llm")


def _brute_loglik(model, tok, context: str, continuation: str) -> float:
    ctx, cont = encode_pair(tok, context, continuation)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    return float(sum(logp[len(ctx) - 1 + j, t] for j, t in enumerate(cont)))


# -- tokenisation and masks ------------------------------------------------------------------------


def test_encode_pair_moves_trailing_space_like_lm_eval(tiny):
    _, tok = tiny
    ctx, cont = encode_pair(tok, "Answer: ", "yes")
    assert tok.decode(ctx) == "Answer:" and tok.decode(cont) == " yes"
    with pytest.raises(ValueError, match="empty continuation"):
        encode_pair(tok, "Answer:", "")


def test_sft_collate_trains_answer_tokens_only(tiny):
    _, tok = tiny
    batch = sft_collate(tok, [("Q: hi\nA:", " yes"), ("Q: a much longer prompt\nA:", " no")], append_eos=True)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    for row in range(2):
        labels, mask, ids = batch["labels"][row], batch["attention_mask"][row], batch["input_ids"][row]
        kept = labels != IGNORE_INDEX
        assert torch.equal(labels[kept], ids[kept])
        assert not kept[mask == 0].any()  # padding never trained
        answer = tok.decode(labels[kept])
        assert answer == [" yes", " no"][row] + tok.eos_token
    # the short row is right-padded
    assert batch["attention_mask"][0, -1] == 0 and batch["attention_mask"][1, -1] == 1


def test_sft_collate_truncates_prompt_from_the_left(tiny):
    _, tok = tiny
    batch = sft_collate(tok, [("x" * 100 + "\nA:", " yes")], max_length=20)
    assert batch["input_ids"].shape[1] == 20
    assert tok.decode(batch["input_ids"][0]).endswith("\nA: yes")
    assert tok.decode(batch["labels"][0][batch["labels"][0] != IGNORE_INDEX]) == " yes"


# -- scoring ---------------------------------------------------------------------------------------


def test_batched_loglikelihood_matches_single_unpadded_forward(tiny):
    model, tok = tiny
    reqs = [("Q: short\nA:", " yes"), ("Q: a rather longer question here\nA:", " no way"),
            ("Hi", " there friend"), ("Question: x\nAnswer: ", "abc")]
    got = loglikelihoods(model, tok, reqs, batch_size=3)
    want = [_brute_loglik(model, tok, c, x) for c, x in reqs]
    assert got == pytest.approx(want, abs=1e-4)
    assert all(v < 0 for v in got)


def test_choice_metrics_acc_and_length_normalised_acc():
    # example 1: raw argmax = 0 (short choice), per-character argmax = 1 (-0.3 > -1.0);
    # example 2: both pick 0 (-1/1 > -5/4).
    lls = [[-2.0, -3.0], [-1.0, -5.0]]
    choices = [["ab", "abcdefghij"], ["x", "yyyy"]]
    assert choice_metrics(lls, choices, [1, 0]) == {"acc": 0.5, "acc_norm": 1.0}
    assert choice_metrics(lls, choices, [0, 0]) == {"acc": 1.0, "acc_norm": 0.5}
    assert choice_metrics(lls, choices, [1, 0], norm=False) == {"acc": 0.5}
    # lm-eval divides by len(choice) without the leading space: -1/1 < -1.9/2; with the space it would flip.
    assert choice_metrics([[-1.0, -1.9]], [["a", "bc"]], [1])["acc_norm"] == 1.0
    with pytest.raises(ValueError, match="out of range"):
        choice_metrics(lls, choices, [2, 0])


@pytest.mark.parametrize("text,want", [
    ("so 3 + 4 = 7\n#### 7", "7"), ("#### 1,234", "1234"), ("The answer is $18.00.", "18"),
    ("-5 apples", "-5"), ("2.5 hours", "2.5"), ("no number", None), ("12 then 13", "13"),
])
def test_final_number(text, want):
    assert final_number(text) == want


def test_batched_greedy_generation_matches_one_at_a_time(tiny):
    model, tok = tiny
    prompts = ["Question: 1+1?\nAnswer:", "Q: a longer prompt than the first\nA:", "Hi"]
    batched = greedy_generate(model, tok, prompts, max_new_tokens=6, batch_size=3, stop=())
    single = [greedy_generate(model, tok, [p], max_new_tokens=6, stop=())[0] for p in prompts]
    assert batched == single and all(len(s) > 0 for s in single)


# -- task specifics --------------------------------------------------------------------------------


def test_prompts_and_labels_of_source_formats():
    load_tasks()
    siqa = get_task("siqa")
    ex = {"context": "Ann ran.", "question": "Why?", "answerA": "a", "answerB": "b", "answerC": "c", "label": "2"}
    assert siqa.doc_to_text(ex) == "Q: Ann ran. Why?\nA:" and siqa.doc_to_label(ex) == 1
    assert siqa.requests(ex)[1] == ("Q: Ann ran. Why?\nA:", " b")
    arc = get_task("arc_easy")
    ex = {"question": "Q?", "choices": {"text": ["x", "y", "z"], "label": ["A", "B", "C"]}, "answerKey": "C"}
    assert arc.doc_to_text(ex) == "Question: Q?\nAnswer:" and arc.doc_to_label(ex) == 2
    boolq = get_task("boolq")
    ex = {"passage": "P.", "question": "is it", "answer": True}
    assert boolq.train_pair(ex) == ("P.\nQuestion: is it?\nAnswer:", " yes")
    hs = get_task("hellaswag")
    ex = {"activity_label": "Cooking", "ctx_a": "A man cooks.", "ctx_b": "he [title] stirs", "endings": [" x [y]"] * 4,
          "label": "3"}
    assert hs.doc_to_text(ex) == "Cooking: A man cooks. He. stirs" and hs.doc_to_choices(ex)[0] == "x "  # lm-eval strips before removing brackets
    wg = get_task("winogrande")
    ex = {"sentence": "Tom beat Bob because _ was fast.", "option1": "Tom", "option2": "Bob", "answer": "1"}
    assert wg.requests(ex) == [("Tom beat Bob because Tom", " was fast."), ("Tom beat Bob because Bob", " was fast.")]
    mr = get_task("movie-reviews")
    assert mr.doc_to_text({"text": "Great.<br /><br />Fun", "label": 1}) == "Review: Great. Fun\nSentiment:"
    gsm = get_task("gsm8k")
    ex = {"question": "2+2?", "answer": "4", "solution": "2+2 = <<2+2=4>>4"}
    assert gsm.train_pair(ex) == ("Question: 2+2?\nAnswer:", " 2+2 = <<2+2=4>>4\n#### 4")


def test_choice_evaluation_follows_the_gold_label(monkeypatch, tiny):
    """Scores that favour the gold choice give acc 1, scores that favour another give acc 0."""
    task = get_task("arc_easy", data_dir=FIXTURES / "arc_easy")
    setup = task.setup_from(*tiny)
    data = task.examples("test")
    gold = {task.requests(ex)[task.doc_to_label(ex)] for ex in data}

    monkeypatch.setattr("tasks.llm.lm.loglikelihoods",
                        lambda model, tok, reqs, **kw: [0.0 if r in gold else -9.0 for r in reqs])
    assert task.evaluate(setup, setup.model, "test") == {"acc": 1.0, "acc_norm": 1.0}
    monkeypatch.setattr("tasks.llm.lm.loglikelihoods",
                        lambda model, tok, reqs, **kw: [-9.0 if r in gold else 0.0 for r in reqs])
    assert task.evaluate(setup, setup.model, "test") == {"acc": 0.0, "acc_norm": 0.0}


def test_generation_evaluation_exact_match(monkeypatch, tiny):
    task = get_task("gsm8k", data_dir=FIXTURES / "gsm8k")
    setup = task.setup_from(*tiny)
    golds = [ex["answer"] for ex in task.examples("test", limit=5)]
    monkeypatch.setattr("tasks.llm.lm.greedy_generate",
                        lambda model, tok, prompts, **kw: [f" so it is {g}.\n#### {g}" for g in golds])
    assert task.evaluate(setup, setup.model, "test", limit=5) == {"exact_match": 1.0}
    monkeypatch.setattr("tasks.llm.lm.greedy_generate",
                        lambda model, tok, prompts, **kw: [f"#### {int(g) + 1}" for g in golds])
    assert task.evaluate(setup, setup.model, "test", limit=5) == {"exact_match": 0.0}


def test_a_failed_static_cache_falls_back_to_dynamic_with_its_reason(monkeypatch, tiny):
    """The runner asks for the static cache on a GPU; when its compiled decoding fails, the task decodes with the
    dynamic cache (the same predictions), says why in one line for the record, and stays dynamic."""
    task = get_task("gsm8k", data_dir=FIXTURES / "gsm8k")
    setup = task.setup_from(*tiny)
    golds = [ex["answer"] for ex in task.examples("test", limit=5)]
    asked = []

    def generate(model, tok, prompts, cache="dynamic", **kw):
        asked.append(cache)
        if cache == "static":
            raise RuntimeError("CUDA graph capture failed\nsecond line")
        return [f"#### {g}" for g in golds]

    monkeypatch.setattr("tasks.llm.lm.greedy_generate", generate)
    setup.extras["generation_cache"] = "static"
    with pytest.warns(UserWarning, match="static cache failed"):
        assert task.evaluate(setup, setup.model, "test", limit=5) == {"exact_match": 1.0}
    assert setup.extras["generation_cache_fallback"] == \
        "static cache failed, dynamic from here: RuntimeError: CUDA graph capture failed"
    assert task.evaluate(setup, setup.model, "test", limit=5) == {"exact_match": 1.0}
    assert asked == ["static", "dynamic", "dynamic"]
    # a dynamic failure is the task's own: raised, never retried
    monkeypatch.setattr("tasks.llm.lm.greedy_generate", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("x")))
    with pytest.raises(RuntimeError, match="x"):
        task.evaluate(setup, setup.model, "test", limit=5)


def test_static_cache_generation_matches_dynamic():
    """Static cache (eager here: transformers compiles it on a GPU only): the same texts as the dynamic cache,
    with short batches filled up to the batch size and prompts left-padded to one width."""
    base, tok = tiny_llama(layers=2)
    model = _adapted_for_generation(base)
    prompts = _numbered_prompts(11)
    dyn = greedy_generate(model, tok, prompts, max_new_tokens=12, batch_size=4, stop=("\n\n",))
    assert greedy_generate(model, tok, prompts, max_new_tokens=12, batch_size=4, stop=("\n\n",), cache="static") == dyn
    assert greedy_generate(model, tok, prompts[:2], max_new_tokens=12, batch_size=4, cache="static",
                           stop=("\n\n",)) == dyn[:2]
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    assert greedy_generate(model, tok, prompts, max_new_tokens=12, batch_size=4, stop=("\n\n",),
                           cache="static-eager", compile_on_cpu=True) == dyn
    assert counters["stats"]["unique_graphs"] == graphs  # compiling was allowed on the CPU, and static-eager declined
    with pytest.raises(ValueError, match="generation cache must be one of dynamic, static, static-eager"):
        greedy_generate(model, tok, prompts, cache="paged")


def _tiny_gemma3(tok):
    """A random Gemma-3 text model (GeGLU tanh) over ``tok``: a sliding-window layer (window 16) and a full one."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=16,
                           layer_types=["sliding_attention", "full_attention"], max_position_embeddings=4096,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    return Gemma3ForCausalLM(cfg).eval()


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_static_cache_under_bf16_autocast_matches_dynamic(arch):
    """What a GPU run's evaluation does (bf16 autocast): the keys leave RoPE in fp32, the values in bf16, and
    transformers' own static layers failed on that (the H200, 2026-12-04: results/perf/h200). The project's static
    cache keeps both in bf16 and decodes the same texts as the dynamic cache, sliding-window layers included."""
    base, tok = tiny_llama(layers=2)
    if arch == "gemma3":
        base = _tiny_gemma3(tok)
    model = _adapted_for_generation(base)
    prompts = _numbered_prompts(11) + ["5 " * 30]  # one prompt past the sliding window
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dyn = greedy_generate(model, tok, prompts, max_new_tokens=12, batch_size=4, stop=("\n\n",))
        cache = static_cache(model, 64)
        k, v = torch.randn(4, 1, 3, 16), torch.randn(4, 1, 3, 16).bfloat16()
        keys, values = cache.layers[1].update(k, v)
        assert keys.dtype == values.dtype == torch.bfloat16 and torch.equal(keys[:, :, :3], k.bfloat16())
        static = greedy_generate(model, tok, prompts, max_new_tokens=12, batch_size=4, stop=("\n\n",),
                                 cache="static")
    assert static == dyn and len(set(dyn)) > 1


@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None,
                    reason="torch.compile's inductor backend needs a C compiler on CPU")
def test_compiled_static_decoding_matches_dynamic_with_bounded_graphs():
    """What a GPU run does (``compile_on_cpu`` stands in for CUDA): the decoding step compiled for the process,
    the same texts as dynamic decoding. Another prompt width (another split) compiles once more, with the width
    dynamic; a third width and a fresh adapted model (a worker's next run) reuse those graphs. The runner's hooks
    (progress here, the deadline alike) run eagerly, never traced, and leave the forward's arguments alone."""
    from torch._dynamo.utils import counters

    from benchmarks.runner.compiled import forget_compiled
    from benchmarks.runner.progress import eval_progress

    forget_compiled()
    width_64, width_128, width_192 = ["1 2 3", "4"], ["7 " * 40], ["8 " * 70, "9"]  # tokens, rounded up to 64
    graphs = []
    for run, sets in enumerate(([width_64, width_128], [width_192, width_64])):
        base, tok = tiny_llama(layers=2)
        model = _adapted_for_generation(base, seed=run)
        with eval_progress(model, "eval", enabled=True) as bar:
            for prompts in sets:
                dyn = greedy_generate(model, tok, prompts, max_new_tokens=10, batch_size=4, stop=("\n\n",))
                assert greedy_generate(model, tok, prompts, max_new_tokens=10, batch_size=4, stop=("\n\n",),
                                       cache="static", compile_on_cpu=True) == dyn
                graphs.append(counters["stats"]["unique_graphs"])
        assert bar.n > 0  # the progress hook still counted the forwards
    assert graphs == [1, 2, 2, 2] and not counters["graph_break"], (graphs, dict(counters["graph_break"]))
    forget_compiled()


def _adapted_for_generation(base, seed: int = 0):
    """``base`` with NA-LoRA on gate, up and down, its B matrices random (a fresh adapter would change nothing)."""
    from nalora import inject

    model = inject(base, "nalora", targets=("gate", "up", "down")).model
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.data = torch.randn(p.shape, generator=gen) * 0.05
    return model.eval()


def _numbered_prompts(n: int) -> list[str]:
    rng = random.Random(0)
    return [f"Question: {' '.join(str(rng.randint(0, 999)) for _ in range(rng.randint(2, 20)))}\nAnswer:"
            for _ in range(n)]


def test_train_batches_are_seeded_and_reshuffled(tiny):
    task = get_task("sarcasm", data_dir=FIXTURES / "sarcasm")
    setup = task.setup_from(*tiny)
    a = task.train_batches(setup, 2, seed=0)
    b = task.train_batches(setup, 2, seed=0)
    c = task.train_batches(setup, 2, seed=1)
    first = [next(a)["input_ids"] for _ in range(8)]  # two epochs of 4 batches
    assert all(torch.equal(x, next(b)["input_ids"]) for x in first)
    assert not all(torch.equal(x, next(c)["input_ids"]) for x in first)
    assert not all(torch.equal(x, y) for x, y in zip(first[:4], first[4:]))  # epochs differ


def test_hub_task_offline_fails_with_one_clear_line(monkeypatch):
    import datasets
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    task = get_task("winogrande")
    with pytest.raises(RuntimeError, match="requires network access or a data_dir"):
        task.load_splits()


def test_evaluate_restores_training_mode(tiny):
    task = get_task("quartz", data_dir=FIXTURES / "quartz")
    setup = task.setup_from(*tiny)
    setup.model.train()
    task.evaluate(setup, setup.model, "validation", limit=2)
    assert setup.model.training
    setup.model.eval()


# -- every built-in task end to end on its fixture ------------------------------------------------


@pytest.mark.parametrize("name", _llm_tasks())
def test_builtin_task_end_to_end_on_tiny_llama(name):
    task = get_task(name, data_dir=FIXTURES / name)
    splits = task.load_splits()
    assert set(splits) == {"train", "validation", "test"} and all(len(splits[s]) for s in splits)
    setup = task.setup("tiny-llama")
    opt = torch.optim.AdamW(setup.model.parameters(), lr=1e-2)
    batch = next(task.train_batches(setup, batch_size=4, seed=0))
    assert task.units(batch) == int(batch["attention_mask"].sum()) > 0
    losses = []
    for _ in range(3):  # same batch: the answer loss must go down, proving gradients reach it
        loss = task.loss(setup, setup.model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and max(losses) < 100 and losses[-1] < losses[0]
    metrics = task.evaluate(setup, setup.model, "test", limit=4, batch_size=4)
    assert set(metrics) == set(task.metrics)
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    chance = task.chance()
    assert set(chance) == set(task.metrics)
    if task.answer_format != "free_text":
        assert all(0.0 < v < 1.0 for v in chance.values())
    assert task.protocol and task.describe()["protocol"] == task.protocol


# -- the real model --------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_socialiqa_trains_and_scores():
    require_assets("smollm2-135m", "socialiqa")
    task = get_task("socialiqa")
    setup = task.setup("smollm2-135m")
    opt = torch.optim.AdamW([p for p in setup.model.parameters() if p.requires_grad], lr=1e-5)
    batches = task.train_batches(setup, batch_size=2, seed=0)
    for _ in range(2):
        loss = task.loss(setup, setup.model, next(batches))
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert 0.0 < loss.item() < 10.0  # answer tokens of a real LM: far below ln(49152) = 10.8
    metrics = task.evaluate(setup, setup.model, "test", limit=12, batch_size=6)
    assert set(metrics) == {"acc", "acc_norm"}


def test_zeroshot_table_row_and_markdown(tiny):
    from tasks.cli import render_table, zeroshot_row

    task = get_task("socialiqa", data_dir=FIXTURES / "socialiqa")
    row = zeroshot_row(task, task.setup_from(*tiny), limit=6, batch_size=6)
    assert row["n_eval"] == 6 and row["sizes"] == {"train": 8, "validation": 8, "test": 8}
    assert row["chance"] == {"acc": pytest.approx(1 / 3), "acc_norm": pytest.approx(1 / 3)}
    assert 1 / 3 <= row["majority"] <= 1.0 and 1 / 3 <= row["top_answer_share"] <= 1.0
    assert row["metrics"] == task.evaluate(task.setup_from(*tiny), tiny[0], "test", limit=6)
    text = render_table([row, {"task": "broken", "error": "ValueError: x"}], "tiny-llama", 6)
    assert "| socialiqa | 8 / 8 / 8 | 6 | acc |" in text and "| broken |" in text and "random-weight" in text
    assert "Test splits under 1,000 examples" in text and "socialiqa (8)" in text


# -- per-example evaluation, chance, held-out batches (the runner's interface) ---------------------


@pytest.mark.parametrize("name", _llm_tasks())
def test_evaluate_examples_agrees_with_evaluate(name, tiny):
    task = get_task(name, data_dir=FIXTURES / name)
    setup = task.setup_from(*tiny)
    metrics, per = task.evaluate_examples(setup, setup.model, "test", limit=3, batch_size=3)
    assert metrics == task.evaluate(setup, setup.model, "test", limit=3, batch_size=3)
    # Choice tasks add the collapse rule's answer-level loss; free-text tasks have no choices.
    choice_keys = {"answer_nll", "n_choices"} if task.answer_format != "free_text" else set()
    assert set(per) == {"id", "pred", "correct"} | choice_keys
    assert len(per["id"]) == len(per["pred"]) == len(per["correct"]) == 3
    if choice_keys:
        assert per["n_choices"] == [len(task.doc_to_choices(ex)) for ex in task.examples("test", limit=3)]
        assert all(math.isfinite(v) and v >= 0 for v in per["answer_nll"])
    assert len(set(per["id"])) == 3 and all(isinstance(i, str) for i in per["id"])
    assert sum(per["correct"]) / 3 == pytest.approx(metrics[task.report_metric])
    # The ids name the evaluated rows: the same examples come back from examples().
    rows = task.examples("test", limit=3)
    assert [task.load_splits()["test"][int(i)] for i in per["id"]] == list(rows)
    assert "chance" in task.describe() and task.describe()["chance"] == task.chance()


def test_evaluate_examples_predictions_follow_the_scores(monkeypatch, tiny):
    """pred is the argmax choice: scores favouring choice 0 everywhere give pred 0 and correct = (gold == 0)."""
    task = get_task("arc_easy", data_dir=FIXTURES / "arc_easy")
    setup = task.setup_from(*tiny)
    firsts = {task.requests(ex)[0] for ex in task.examples("test")}
    monkeypatch.setattr("tasks.llm.lm.loglikelihoods",
                        lambda model, tok, reqs, **kw: [0.0 if r in firsts else -5.0 for r in reqs])
    metrics, per = task.evaluate_examples(setup, setup.model, "test")
    golds = [task.doc_to_label(ex) for ex in task.examples("test")]
    assert per["pred"] == [0] * len(golds) and per["correct"] == [g == 0 for g in golds]
    # answer NLL = -log softmax over the choice scores of the gold choice
    ks = [len(task.doc_to_choices(ex)) for ex in task.examples("test")]
    assert per["answer_nll"] == pytest.approx([(0.0 if g == 0 else 5.0) + math.log(1 + (k - 1) * math.exp(-5.0))
                                               for g, k in zip(golds, ks)])
    assert metrics["acc"] == pytest.approx(sum(g == 0 for g in golds) / len(golds))


def test_generation_per_example_answers(monkeypatch, tiny):
    task = get_task("gsm8k", data_dir=FIXTURES / "gsm8k")
    setup = task.setup_from(*tiny)
    golds = [ex["answer"] for ex in task.examples("test", limit=4)]
    outs = [f"#### {g}" if i % 2 == 0 else "no idea" for i, g in enumerate(golds)]
    monkeypatch.setattr("tasks.llm.lm.greedy_generate", lambda model, tok, prompts, **kw: outs)
    metrics, per = task.evaluate_examples(setup, setup.model, "test", limit=4)
    assert per["pred"] == [final_number(g) if i % 2 == 0 else "" for i, g in enumerate(golds)]
    assert per["correct"] == [True, False, True, False] and metrics == {"exact_match": 0.5}


def test_limited_subset_is_the_seed0_shuffle():
    """The evaluated subset is unchanged from earlier versions (Dataset.shuffle(seed=0) then the first n)."""
    task = get_task("sarcasm", data_dir=FIXTURES / "sarcasm")
    data = task.load_splits()["test"]
    assert list(task.examples("test", limit=5)) == list(data.shuffle(seed=0, keep_in_memory=True).select(range(5)))


def test_old_style_plugins_still_evaluate(tiny):
    """A plugin overriding evaluate() (older contract) keeps its own metrics and gives no per-example results."""
    from tasks.base import Task
    from tasks.llm.lm import ChoiceTask

    class Custom(ChoiceTask):
        def evaluate(self, setup, model, split, limit=None, batch_size=16):
            return {"acc": 0.123}

    task = Custom(data_dir=FIXTURES / "sarcasm")
    assert task.evaluate_examples(None, None, "test") == ({"acc": 0.123}, None)

    class Bare(Task):
        load_splits = setup = train_batches = loss = None

        def evaluate(self, setup, model, split, limit=None, batch_size=16):
            return {"acc": 0.5, "split": split}

    assert Bare().evaluate_examples(None, None, "validation", limit=2) == ({"acc": 0.5, "split": "validation"}, None)
    assert Bare().describe()["chance"] == {}


def test_chance_with_varying_choice_counts():
    task = get_task("arc_easy", data_dir=FIXTURES / "arc_easy")
    want = sum(1 / len(task.doc_to_choices(ex)) for ex in task.load_splits()["test"]) / len(task.load_splits()["test"])
    assert len({len(task.doc_to_choices(ex)) for ex in task.load_splits()["test"]}) > 1  # the fixture varies
    assert task.chance() == {"acc": pytest.approx(want), "acc_norm": pytest.approx(want)}
    assert get_task("sarcasm").chance() == {"acc": 0.5}  # fixed labels: no data needed


@pytest.mark.parametrize("name", ["sarcasm", "arc_easy", "gsm8k"])
def test_heldout_batches_come_from_validation(name, tiny):
    task = get_task(name, data_dir=FIXTURES / name)
    setup = task.setup_from(*tiny)
    tok = setup.extras["tokenizer"]
    train_batch = next(task.train_batches(setup, 2, seed=0))
    batches = task.heldout_batches(setup, n=2, batch_size=2)
    assert batches == [] or set(batches[0]) == set(train_batch)
    again = task.heldout_batches(setup, n=2, batch_size=2)
    assert len(batches) == min(2, -(-len(task.load_splits()["validation"]) // 2))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))  # deterministic
    val_texts = {tok.decode(task.collate(setup, [ex])["input_ids"][0]) for ex in task.load_splits()["validation"]}
    train_texts = {tok.decode(task.collate(setup, [ex])["input_ids"][0]) for ex in task.load_splits()["train"]}
    for batch in batches:
        for row, mask in zip(batch["input_ids"], batch["attention_mask"]):
            text = tok.decode(row[mask.bool()])
            assert text in val_texts and (text not in train_texts or name == "gsm8k")  # gsm8k's fixture repeats
