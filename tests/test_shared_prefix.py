"""Cheaper evaluation: an example's choices share one forward of its context, batches are length-sorted.

The fast path must give today's numbers: the per-choice scores (one sequence per choice, lm-eval's
``_encode_pair`` split), with and without adapters injected, on the tiny model and on the real one.
"""

from __future__ import annotations

import pytest
import torch
from conftest import require_assets

from benchmarks.shared_prefix import score_continuations
from tasks.common import encode_pair, length_sorted_batches, loglikelihoods, tiny_llama

# Several examples x choices: contexts of different lengths, continuations of 1 to many tokens, a context
# with a trailing space (moved to the continuation by encode_pair), and one request whose context is alone.
REQUESTS = [
    ("Q: is the sky blue?\nA:", " yes"), ("Q: is the sky blue?\nA:", " no"), ("Q: is the sky blue?\nA:", " maybe so"),
    ("Tell me", " a"), ("Tell me", " story about dragons"),
    ("Question: which is heavier, a feather or a brick?\nAnswer: ", "brick"),
    ("Question: which is heavier, a feather or a brick?\nAnswer: ", "feather"),
    ("Alone here", " nothing shared"),
]
# float32 on CPU: the two paths differ only in summation order (~1e-7 relative on sums of ~100 nats).
TOL = {"abs": 1e-5, "rel": 1e-6}


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama()


def _tokens_seen(model: torch.nn.Module, fn) -> tuple[object, int]:
    """``fn()`` and the number of token positions the model embedded while it ran."""
    seen = [0]
    handle = model.get_input_embeddings().register_forward_hook(lambda m, a, o: seen.__setitem__(0, seen[0] + a[0].numel()))
    try:
        return fn(), seen[0]
    finally:
        handle.remove()


def _brute(model, tok, context: str, continuation: str) -> float:
    ctx, cont = encode_pair(tok, context, continuation)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ctx + cont])).logits[0, :-1].float(), -1)
    return float(sum(logp[len(ctx) - 1 + j, t] for j, t in enumerate(cont)))


def test_shared_context_gives_the_per_choice_scores_with_less_work(tiny):
    model, tok = tiny
    shared, n_shared = _tokens_seen(model, lambda: loglikelihoods(model, tok, REQUESTS, batch_size=2))
    single, n_single = _tokens_seen(model, lambda: loglikelihoods(model, tok, REQUESTS, batch_size=2, share_context=False))
    assert shared == pytest.approx(single, **TOL)
    assert shared == pytest.approx([_brute(model, tok, c, x) for c, x in REQUESTS], **TOL)
    assert n_shared < n_single  # the contexts ran once, not once per choice (padding included)


def test_truncated_contexts_are_scored_one_sequence_each(tiny):
    model, tok = tiny
    # max_length 26: the long requests lose context tokens from the left, differently per continuation length,
    # while the short choices of the same context still share it.
    shared = loglikelihoods(model, tok, REQUESTS, batch_size=3, max_length=26)
    single = loglikelihoods(model, tok, REQUESTS, batch_size=3, max_length=26, share_context=False)
    assert shared == pytest.approx(single, **TOL)


@pytest.mark.parametrize("method", ["lora", "nalora"])
def test_shared_context_sees_injected_adapters(method):
    from nalora import inject

    model, tok = tiny_llama()
    adapted = inject(model, method, targets=("gate", "up", "down"), rank=2)
    with torch.no_grad():
        for name, p in adapted.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # B = 0 at init would make the adapter a no-op
    adapted.model.eval()
    shared = loglikelihoods(adapted.model, tok, REQUESTS, batch_size=4)
    single = loglikelihoods(adapted.model, tok, REQUESTS, batch_size=4, share_context=False)
    assert shared == pytest.approx(single, **TOL)
    with adapted.model.disable_adapter():
        plain = loglikelihoods(adapted.model, tok, REQUESTS, batch_size=4)
    assert max(abs(a - b) for a, b in zip(shared, plain)) > 1e-2  # the adapters were in the forward


@pytest.mark.parametrize("lengths,bs", [([3, 9, 1, 9, 4, 7, 2], 3), ([5], 4), ([], 2), ([2, 2, 2], 1)])
def test_length_sorted_batches_cover_every_index_longest_first(lengths, bs):
    batches = length_sorted_batches(lengths, bs)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert all(1 <= len(b) <= bs for b in batches)
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)
    with pytest.raises(ValueError, match="batch_size"):
        length_sorted_batches(lengths, 0)


def test_scores_come_back_in_request_order(tiny):
    model, tok = tiny
    base = loglikelihoods(model, tok, REQUESTS, batch_size=2)
    perm = [5, 0, 7, 3, 1, 6, 4, 2]
    permuted = loglikelihoods(model, tok, [REQUESTS[i] for i in perm], batch_size=2)
    assert permuted == pytest.approx([base[i] for i in perm], **TOL)


def _max_rows_seen(model: torch.nn.Module, fn) -> tuple[object, int]:
    """``fn()`` and the most rows any forward of ``model`` embedded while it ran."""
    most = [0]
    handle = model.get_input_embeddings().register_forward_pre_hook(lambda m, a: most.__setitem__(0, max(most[0], a[0].shape[0])))
    try:
        return fn(), most[0]
    finally:
        handle.remove()


def test_many_choices_run_in_forwards_of_at_most_batch_size_rows(tiny):
    """7 choices of one context with batch_size 2: the continuation forwards are chunked (the cache copied per
    chunk), the scores are those of one forward over all 7 rows and of scoring each sequence alone."""
    model, tok = tiny
    context = "Q: which word comes next?\nA:"
    conts = [" a", " bb cc", " the end of it", " dd", " ee ff gg", " hh", " ii jj"]
    scores, most = _max_rows_seen(model, lambda: loglikelihoods(model, tok, [(context, c) for c in conts], batch_size=2))
    assert most == 2
    ctx, _ = encode_pair(tok, context, conts[0])
    prefix = {"input_ids": torch.tensor([ctx]), "attention_mask": torch.ones(1, len(ctx), dtype=torch.long)}
    cont_ids = [[encode_pair(tok, context, c)[1] for c in conts]]
    one, most_one = _max_rows_seen(model, lambda: score_continuations(model, prefix, cont_ids, max_rows=len(conts)))
    assert most_one == len(conts)  # the reference really is one forward over every choice row
    assert scores == pytest.approx(one.tolist(), **TOL)
    assert scores == pytest.approx([_brute(model, tok, context, c) for c in conts], **TOL)
    with pytest.raises(ValueError, match="max_rows must be >= 1"):
        score_continuations(model, prefix, cont_ids, max_rows=0)


def test_score_continuations_refuses_bad_prefixes(tiny):
    model, _ = tiny
    ids = torch.tensor([[5, 6, 0]])
    with pytest.raises(ValueError, match="left-padded"):
        score_continuations(model, {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 0]])}, [[[1]]])
    with pytest.raises(ValueError, match="2 continuation lists for 1 prefix rows"):
        score_continuations(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, [[[1]], [[2]]])
    with pytest.raises(ValueError, match="non-empty"):
        score_continuations(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, [[[]]])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["quartz", "sarcasm"])
def test_real_model_scores_and_metrics_unchanged(name):
    """smollm2-135m (real BPE merges at the context/continuation boundary): same scores, same acc and acc_norm."""
    require_assets("smollm2-135m", name)
    from tasks.registry import get_task, load_tasks

    load_tasks()
    task = get_task(name)
    setup = task.setup("smollm2-135m")
    fast, choices, labels = task.score(setup, setup.model, "validation", limit=24, batch_size=8)
    slow, _, _ = task.score(setup, setup.model, "validation", limit=24, batch_size=8, share_context=False)
    assert [x for row in fast for x in row] == pytest.approx([x for row in slow for x in row], abs=1e-3)
    assert task.metrics_from(fast, choices, labels) == task.metrics_from(slow, choices, labels)


def test_eval_time_script_compares_the_two_scorings(tiny):
    """benchmarks/perf/eval_time.py's scoring measurement on a fixture task: both modes timed, same numbers."""
    from pathlib import Path

    from benchmarks.perf.eval_time import measure_scoring
    from tasks.registry import get_task, load_tasks

    load_tasks()
    task = get_task("hellaswag", data_dir=Path(__file__).parent / "fixtures" / "tasks" / "hellaswag")
    rec = measure_scoring(task, task.setup_from(*tiny), limit=4, batch_size=2, rounds=2)
    assert set(rec["s_per_example"]) == {"per_choice", "shared"} and rec["speedup"]["n"] == 2
    assert rec["max_abs_ll_diff"] < 1e-3 and rec["metrics"]["per_choice"] == rec["metrics"]["shared"]
