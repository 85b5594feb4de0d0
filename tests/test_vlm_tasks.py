"""The built-in vision tasks end to end on tiny random models; real-asset checks marked slow."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import require_assets
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from datasets import Image as DImage
from PIL import Image

from tasks.registry import get_task, list_tasks, load_tasks
from tasks.vlm.data import cap_train, eval_order

NAMES = ["T-shirt/top", "Trouser", "Bag"]
QA_TASKS = ["fashion-mnist", "emoji", "cifar10"]
PROBE_TASKS = ["fashion-mnist-probe", "emoji-probe", "cifar10-probe"]


def _split(n: int, seed: int, rgba: bool = False) -> Dataset:
    # Class k has mean brightness ~ 40 + 80 k: learnable from pixels alone.
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    ims = []
    for y in labels:
        arr = (rng.random((28, 28)) * 40 + 40 + 80 * y).astype("uint8")
        im = Image.fromarray(arr)
        ims.append(im.convert("RGBA") if rgba else im)
    return Dataset.from_dict(
        {"image": ims, "label": labels.tolist(), "id": [f"{seed}-{i}" for i in range(n)]},
        features=Features({"image": DImage(), "label": ClassLabel(names=NAMES), "id": Value("string")}),
    )


@pytest.fixture(scope="module")
def splits() -> DatasetDict:
    return DatasetDict(train=_split(48, 0), validation=_split(12, 1), test=_split(12, 2))


def _splits_copy(splits: DatasetDict) -> DatasetDict:
    return DatasetDict({k: v for k, v in splits.items()})


def test_registered_with_family_vlm():
    load_tasks()
    assert set(QA_TASKS + PROBE_TASKS) <= set(list_tasks("vlm"))
    t = get_task("emoji-probe")
    assert t.family == "vlm" and t.metrics == {"acc": True}
    assert get_task("fashion-mnist").metrics == {"acc": True, "acc_norm": True}


@pytest.mark.parametrize("name", QA_TASKS)
@pytest.mark.parametrize("spec", ["tiny-dinov2+tiny-byte-llama", "tiny-eva02+tiny-byte-llama"])
def test_qa_task_end_to_end(name, spec, splits):
    task = get_task(name, splits=_splits_copy(splits), align=False, max_train=20)
    assert len(task.load_splits()["train"]) == 20
    assert task.chance() == {"acc": pytest.approx(1 / 3), "acc_norm": pytest.approx(1 / 3)}
    setup = task.setup(spec)
    assert setup.trainable == ["connector"] and setup.extras["classes"] == ["t-shirt/top", "trouser", "bag"]
    params = [p for n, p in setup.model.named_parameters() if n.startswith("connector.")]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-2)
    batches = task.train_batches(setup, batch_size=4, seed=0)
    first = next(batches)
    assert first["pixel_values"].shape == (4, 3, 28, 28)
    assert task.units(first) == int(first["attention_mask"].sum())
    losses = []
    for _ in range(3):
        loss = task.loss(setup, setup.model, first)  # one fixed batch: its loss must go down
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    metrics = task.evaluate(setup, setup.model, "validation", limit=5, batch_size=2)
    assert set(metrics) == {"acc", "acc_norm", "n"} and metrics["n"] == 5
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("acc", "acc_norm"))


def test_qa_scoring_picks_the_likeliest_answer(splits):
    """With the LM forced to prefer the bytes of " bag", acc equals that class's share of the split."""
    task = get_task("fashion-mnist", splits=_splits_copy(splits), align=False)
    setup = task.setup("tiny-dinov2+tiny-byte-llama")
    bag = ord("b") + 3

    class Forced(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **batch):
            out = self.inner(**batch)
            out.logits = torch.zeros_like(out.logits)
            out.logits[..., bag] = 10.0
            return out

    metrics = task.evaluate(setup, Forced(setup.model), "test")
    labels = np.array(task.load_splits()["test"]["label"])
    assert metrics["acc"] == pytest.approx(float((labels == 2).mean()))


@pytest.mark.parametrize("name", PROBE_TASKS)
@pytest.mark.parametrize("encoder", ["tiny-dinov2", "tiny-eva02"])
def test_probe_task_end_to_end(name, encoder, splits):
    task = get_task(name, splits=_splits_copy(splits))
    setup = task.setup(encoder)
    assert setup.trainable == ["head"]
    assert not any(p.requires_grad for p in setup.model.vision_tower.parameters())
    batch = next(task.train_batches(setup, batch_size=8, seed=1))
    assert task.units(batch) == 8
    assert torch.isfinite(task.loss(setup, setup.model, batch))
    metrics = task.evaluate(setup, setup.model, "test", limit=7, batch_size=3)
    assert metrics["n"] == 7 and 0.0 <= metrics["acc"] <= 1.0
    assert task.chance() == {"acc": pytest.approx(1 / 3)}


def test_probe_head_learns(splits):
    task = get_task("fashion-mnist-probe", splits=_splits_copy(splits))
    setup = task.setup("tiny-eva02")
    opt = torch.optim.AdamW(setup.model.head.parameters(), lr=0.05)
    batches = task.train_batches(setup, batch_size=16, seed=0)
    for _ in range(60):
        task.loss(setup, setup.model, next(batches)).backward()
        opt.step()
        opt.zero_grad()
    # Classes differ in brightness: a trained head beats chance (1/3) clearly on the training data.
    train_acc = task.evaluate(setup, setup.model, "train")["acc"]
    assert train_acc > 0.6


def test_train_batches_reshuffle_and_cover(splits):
    task = get_task("emoji-probe", splits=_splits_copy(splits), max_train=10)
    setup = task.setup("tiny-dinov2")
    it = task.train_batches(setup, batch_size=4, seed=3)
    epoch1 = [next(it)["labels"] for _ in range(3)]  # 4 + 4 + 2
    assert sum(len(b) for b in epoch1) == 10
    again = task.train_batches(setup, batch_size=4, seed=3)
    assert torch.equal(next(again)["labels"], epoch1[0])


def test_cap_and_eval_order_are_deterministic(splits):
    a = cap_train(_splits_copy(splits), 10)["train"]["id"]
    b = cap_train(_splits_copy(splits), 10)["train"]["id"]
    assert a == b and len(a) == 10
    assert eval_order(100, 5) == eval_order(100, 5) and sorted(eval_order(10, None)) == list(range(10))
    with pytest.raises(ValueError, match="max_train"):
        cap_train(_splits_copy(splits), 0)
    with pytest.raises(ValueError, match="no 'test' split"):
        cap_train(DatasetDict(train=splits["train"], validation=splits["validation"]), None)


def test_probe_rejects_vlm_spec(splits):
    with pytest.raises(ValueError, match="image encoder"):
        get_task("fashion-mnist-probe", splits=_splits_copy(splits)).setup("dinov2-s+smollm2-135m")


@pytest.mark.slow
def test_real_composed_qa_fashion_mnist():
    require_assets("dinov2-s", "smollm2-135m", "fashion-mnist")
    task = get_task("fashion-mnist", max_train=64, align=False)  # alignment itself: docs/vlm.md script
    setup = task.setup("dinov2-s+smollm2-135m")
    batch = next(task.train_batches(setup, batch_size=2, seed=0))
    loss = task.loss(setup, setup.model, batch)
    assert torch.isfinite(loss) and float(loss) < 20
    metrics = task.evaluate(setup, setup.model, "validation", limit=10, batch_size=10)
    assert metrics["n"] == 10 and 0 <= metrics["acc"] <= 1


@pytest.mark.slow
def test_real_dinov2_probe_fashion_mnist():
    require_assets("dinov2-s", "fashion-mnist")
    task = get_task("fashion-mnist-probe", max_train=64)
    setup = task.setup("dinov2-s")
    opt = torch.optim.AdamW(setup.model.head.parameters(), lr=1e-2)
    batches = task.train_batches(setup, batch_size=16, seed=0)
    for _ in range(4):
        task.loss(setup, setup.model, next(batches)).backward()
        opt.step()
        opt.zero_grad()
    metrics = task.evaluate(setup, setup.model, "validation", limit=32)
    assert metrics["n"] == 32 and 0 <= metrics["acc"] <= 1


@pytest.mark.parametrize("task_name,spec,method", [
    ("emoji", "tiny-dinov2+tiny-byte-llama", "lora"),
    ("fashion-mnist", "tiny-eva02+tiny-byte-llama", "nalora"),
    ("emoji-probe", "tiny-eva02", "nalora"),
    ("fashion-mnist-probe", "tiny-dinov2", "lora"),
])
def test_tasks_through_the_injector(task_name, spec, method, splits):
    """What the runner does: inject on setup.model with setup.trainable, then loss / evaluate."""
    from nalora import injection
    task = get_task(task_name, splits=_splits_copy(splits), **({} if "probe" in task_name else {"align": False}))
    setup = task.setup(spec)
    torch.manual_seed(0)
    adapted = injection.inject(setup.model, method, targets=("gate", "up"), rank=2, trainable=setup.trainable)
    trained = [n for n, p in adapted.model.named_parameters() if p.requires_grad]
    assert any(setup.trainable[0] in n for n in trained) and any("lora" in n for n in trained)
    opt = adapted.make_optimizer(1e-2, total_steps=2)
    batches = task.train_batches(setup, batch_size=4, seed=0)
    for _ in range(2):
        loss = task.loss(setup, adapted.model, next(batches))
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert torch.isfinite(loss)
    metrics = task.evaluate(setup, adapted.model, "test", limit=4, batch_size=2)
    assert metrics["n"] == 4


def test_zero_shot_row_says_which_answer_the_model_gives(splits):
    from tasks.vlm.zeroshot import _row, markdown

    task = get_task("fashion-mnist", splits=_splits_copy(splits), align=False, max_train=20)
    setup = task.setup("tiny-dinov2+tiny-byte-llama")
    row = _row(task, setup, limit=12)
    row["model"] = "tiny"
    assert row["zero_shot"]["n"] == 12 and row["top_answer"] in task.classes()
    assert 1 / len(task.classes()) <= row["top_answer_share"] <= 1.0
    if row["top_answer_share"] == 1.0:  # a constant answer scores exactly its class's share of the sample
        assert row["zero_shot"]["acc"] == pytest.approx(row["top_answer_class_share_of_sample"])
    assert f"{row['top_answer']} ({row['top_answer_share']:.2f})" in markdown([row])


# -- per-example evaluation, held-out batches, one scoring path with the language tasks -----------


@pytest.mark.parametrize("name,spec", [("emoji", "tiny-dinov2+tiny-byte-llama"), ("emoji-probe", "tiny-eva02")])
def test_evaluate_examples_agrees_with_evaluate(name, spec, splits):
    task = get_task(name, splits=_splits_copy(splits), **({} if "probe" in name else {"align": False}))
    setup = task.setup(spec)
    metrics, per = task.evaluate_examples(setup, setup.model, "test", limit=7, batch_size=3)
    assert metrics == task.evaluate(setup, setup.model, "test", limit=7, batch_size=3)
    assert len(per["id"]) == len(per["pred"]) == len(per["correct"]) == 7 == metrics["n"]
    assert per["id"] == [str(i) for i in eval_order(len(task.load_splits()["test"]), 7)]
    assert sum(per["correct"]) / 7 == pytest.approx(metrics["acc"])
    labels = task.load_splits()["test"]["label"]
    assert per["correct"] == [p == labels[int(i)] for p, i in zip(per["pred"], per["id"])]
    # The answer-level loss of the collapse rule, one scoring path for QA and probe: -log p(gold) over the classes.
    assert per["n_choices"] == [3] * 7 and all(math.isfinite(v) and v >= 0 for v in per["answer_nll"])
    assert task.describe()["chance"] == {"acc": pytest.approx(1 / 3), **({} if "probe" in name else {"acc_norm": pytest.approx(1 / 3)})}


@pytest.mark.parametrize("name,spec", [("fashion-mnist", "tiny-dinov2+tiny-byte-llama"), ("fashion-mnist-probe", "tiny-dinov2")])
def test_heldout_batches_come_from_validation(name, spec, splits):
    task = get_task(name, splits=_splits_copy(splits), **({} if "probe" in name else {"align": False}))
    setup = task.setup(spec)
    train_batch = next(task.train_batches(setup, batch_size=4, seed=0))
    batches = task.heldout_batches(setup, n=2, batch_size=4)
    assert len(batches) == 2 and all(set(b) == set(train_batch) for b in batches)
    val = task.load_splits()["validation"]
    transform = setup.extras["transform"] if "probe" in name else setup.extras["io"].transform
    want = transform.stack(val.select(eval_order(len(val), 8)[:4])["image"])
    assert torch.equal(batches[0]["pixel_values"], want)  # validation images, fixed order
    assert torch.equal(task.heldout_batches(setup, n=2, batch_size=4)[1]["pixel_values"], batches[1]["pixel_values"])


def test_vision_and_language_choice_tasks_score_alike(monkeypatch, splits):
    """Same log-likelihoods, same choices, same gold: the VLM QA task and a language choice task give the same
    acc and acc_norm, and acc_norm is lm-eval's (divide by len(choice) characters, without the leading space)."""
    import datasets

    from tasks.llm.lm import ChoiceTask

    classes = ["t-shirt/top", "trouser", "bag"]
    # Per character trouser wins (-2.2/7 > -1/3); per byte of " " + name bag would (-1/4 > -2.2/8).
    row = [-9.0, -2.2, -1.0]
    # Unbalanced gold labels (4 x t-shirt, 4 x trouser, 1 x bag): acc and the two acc_norm variants all differ.
    full = list(splits["test"]["label"])
    test = splits["test"].select([i for i, y in enumerate(full) if y != 2] + [full.index(2)])
    n = len(test)
    both = _splits_copy(splits)
    both["test"] = test

    vqa = get_task("fashion-mnist", splits=both, align=False)
    setup = vqa.setup("tiny-dinov2+tiny-byte-llama")
    monkeypatch.setattr(type(vqa), "_scores",
                        staticmethod(lambda model, io, images, choices, device: torch.tensor([row] * len(images))))
    vision = vqa.evaluate(setup, setup.model, "test")

    class Text(ChoiceTask):
        name = "text-twin"

        def load_splits(self):
            return datasets.DatasetDict({s: datasets.Dataset.from_dict({"label": list(test["label"])})
                                         for s in ("train", "validation", "test")})

        def doc_to_text(self, ex):
            return "What is shown?"

        def doc_to_choices(self, ex):
            return classes

        def doc_to_label(self, ex):
            return int(ex["label"])

    text = Text()
    scores = {" " + c: v for c, v in zip(classes, row)}
    monkeypatch.setattr("tasks.llm.lm.loglikelihoods", lambda model, tok, reqs, **kw: [scores[c] for _, c in reqs])
    from tasks.base import TaskSetup

    language = text.evaluate(TaskSetup(model=torch.nn.Linear(1, 1), extras={"tokenizer": None}), torch.nn.Linear(1, 1), "test")

    labels = list(test["label"])
    assert labels.count(1) != labels.count(2)  # so per-byte-with-space scoring would give another acc_norm
    want = {"acc": labels.count(2) / n, "acc_norm": labels.count(1) / n}
    assert language == pytest.approx(want)
    assert {k: vision[k] for k in ("acc", "acc_norm")} == pytest.approx(want)


@pytest.mark.parametrize("method,expect_fixed", [("lora", True), ("nalora", True), ("head", False)])
def test_connector_trains_at_its_fixed_lr_for_adapter_methods(method, expect_fixed, splits):
    """The shared connector gets the task's fixed lr under adapter methods (not the run's lr: at adapter lrs it
    is rewritten and runs collapse), and the run's lr under `head`, where it is the method's own parameter."""
    from benchmarks.runner.train import shared_lr_group
    from nalora import injection
    task = get_task("fashion-mnist", splits=_splits_copy(splits), align=False, connector_lr=2e-4)
    setup = task.setup("tiny-eva02+tiny-byte-llama")
    assert setup.trainable_lr == 2e-4 and task.describe()["options"]["connector_lr"] == 2e-4
    torch.manual_seed(0)
    adapted = injection.inject(setup.model, method, targets=("gate", "up"), rank=2, trainable=setup.trainable)
    opt = adapted.make_optimizer(3e-3, total_steps=4)
    conn = {id(p) for n, p in adapted.model.named_parameters() if p.requires_grad and "connector" in n}
    if expect_fixed:
        assert shared_lr_group(opt, adapted.model, setup.trainable, setup.trainable_lr) == len(conn) > 0
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert {lr_of[i] for i in conn} == ({2e-4} if expect_fixed else {3e-3})
    assert {lr for i, lr in lr_of.items() if i not in conn} == ({3e-3} if expect_fixed else set())
    assert sum(len(g["params"]) for g in opt.param_groups) == len(lr_of)  # nothing lost or duplicated
    before = {n: p.detach().clone() for n, p in adapted.model.named_parameters() if p.requires_grad}
    batches = task.train_batches(setup, batch_size=4, seed=0)
    task.loss(setup, adapted.model, next(batches)).backward()
    opt.step()
    moved = [n for n, p in adapted.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any("connector" in n for n in moved)


def test_connector_lr_is_validated():
    with pytest.raises(ValueError, match="connector_lr"):
        get_task("fashion-mnist", connector_lr=-1)


def test_runner_trains_each_tower_at_its_multiplied_lr(tmp_path, splits):
    """Through the runner (suite -> run config -> train_run): adapter.tower_lr_scale is hashed into the run config,
    recorded, and really applied: after one Adam step from B = 0, |B| is the lr each tower trained at."""
    from benchmarks.runner.grid import TaskFacts, expand
    from benchmarks.runner.suite import load_suite
    from benchmarks.runner.train import train_run
    from nalora import injection

    spec = "tiny-vit-swiglu+tiny-byte-llama"
    (tmp_path / "s.yaml").write_text(
        f"tasks: [{{name: fashion-mnist, model: {spec}}}]\n"
        "methods: {lora: {adapter: {tower_lr_scale: {vision: 0.1}}}}\nseeds: [0]\n"
        "lr_grid: [1.0e-2]\nlr_bounds: [1.0e-2, 1.0e-2]\n"
        "training: {steps: 1, batch_size: 4, warmup_ratio: 0, eval_every: 0, eval_limit: 4, test_limit: 4,"
        " log_every: 1, diag_batches: 0}\n")
    (run,) = expand(load_suite(tmp_path / "s.yaml"), lambda n: TaskFacts("vlm", spec))
    assert run.config["adapter"]["tower_lr_scale"] == {"vision": 0.1}
    seen = []

    def spy(model, method, **kw):
        seen.append(injection.inject(model, method, **kw))
        return seen[-1]

    task = get_task("fashion-mnist", splits=_splits_copy(splits), align=False)
    result = train_run(run.config, task, injector=spy, progress=False)
    assert result["tower_lr"]["vision"]["scale"] == 0.1 and result["tower_lr"]["vision"]["tensors"] > 0
    step: dict[str, float] = {}
    for n, p in seen[0].model.named_parameters():
        if "lora_B" in n:
            tower = "vision" if "vision_tower" in n else "language"
            step[tower] = max(step.get(tower, 0.0), p.detach().abs().max().item())
    assert step["language"] == pytest.approx(1e-2, rel=1e-3) and step["vision"] == pytest.approx(1e-3, rel=1e-3)


def test_eval_batch_size_changes_no_prediction(splits):
    """The evaluation batch is a speed knob: the composed VLM's QA scoring gives the same per-example predictions
    whether 1, 3 or all 7 test images share a forward (``eval_time --eval-batch-sizes`` measures the speed)."""
    from benchmarks.perf.eval_time import measure_eval_batches

    task = get_task("emoji", splits=_splits_copy(splits), align=False)
    setup = task.setup("tiny-dinov2+tiny-byte-llama")
    rec = measure_eval_batches(task, setup, split="test", limit=7, batch_sizes=[1, 3, 7], rounds=2)
    assert rec["examples"] == 7 and set(rec["s_per_example"]) == {"1", "3", "7"}
    assert rec["same_predictions_as_first"] == {"1": 1.0, "3": 1.0, "7": 1.0}
    accs = {m["acc"] for m in rec["metrics"].values()}
    assert len(accs) == 1 and all(v["n"] == 2 for v in rec["s_per_example"].values())


def test_an_evaluation_forward_holds_eval_batch_size_images(splits, monkeypatch):
    """The per-forward cap bounds the logits' memory only: at the default eval_batch_size (64) a forward scores 64
    images of 10 classes (with the cap of 160 choice sequences it scored 16, and the VLM tasks' evaluation, two
    thirds of their run time on an H200, could not use a larger batch)."""
    from benchmarks.runner.suite import load_suite
    from tasks.vlm.qa import MAX_SEQS_PER_FORWARD, VisionQATask

    batch = load_suite("default").tasks[0].training.eval_batch_size
    assert batch == 64 and MAX_SEQS_PER_FORWARD >= batch * 10
    task = get_task("fashion-mnist", splits=_splits_copy(splits), align=False)
    setup = task.setup("tiny-dinov2+tiny-byte-llama")
    sizes: list[int] = []
    real = VisionQATask._scores

    def spy(model, io, images, choices, device):
        sizes.append(len(images))
        return real(model, io, images, choices, device)

    monkeypatch.setattr(VisionQATask, "_scores", staticmethod(spy))
    k = len(setup.extras["classes"])
    monkeypatch.setattr("tasks.vlm.qa.MAX_SEQS_PER_FORWARD", 3 * k)  # the cap still binds where it is lower
    task.evaluate(setup, setup.model, "test", limit=7, batch_size=7)
    assert sizes == [3, 3, 1]
    sizes.clear()
    monkeypatch.setattr("tasks.vlm.qa.MAX_SEQS_PER_FORWARD", MAX_SEQS_PER_FORWARD)
    task.evaluate(setup, setup.model, "test", limit=7, batch_size=7)
    assert sizes == [7]
