"""The composed VLM, its batch builder and scoring, connector alignment + cache, tower discovery."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.vlm import AlignConfig, ComposedVLM, build_vlm, sequence_logprobs
from benchmarks.vlm.build import split_spec
from benchmarks.vlm.encoders import ImageTransform, patch_tokens, pool_grid
from benchmarks.vlm.io import ComposedIO, text_batch
from benchmarks.vlm.tiny import ByteTokenizer, tiny_byte_llama, tiny_dinov2, tiny_eva02


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((28, 28)) * 255).astype("uint8")) for _ in range(n)]


@pytest.fixture(scope="module")
def vlm() -> ComposedVLM:
    torch.manual_seed(0)
    return ComposedVLM(tiny_dinov2(), tiny_byte_llama(), grid=2).eval()


@pytest.fixture(scope="module")
def io() -> ComposedIO:
    return ComposedIO(ByteTokenizer(), ImageTransform(28), num_image_tokens=4)


def test_submodule_names_and_shapes(vlm, io):
    names = {n for n, _ in vlm.named_children()}
    assert {"vision_tower", "connector", "language_model"} <= names
    batch = io.batch(_images(3), ["Q: what? A:"] * 3, [" a", " bag", " t-shirt"])
    out = vlm(**batch)
    # Logits cover the text only; image tokens are prepended inside.
    assert out.logits.shape == (3, batch["input_ids"].shape[1], ByteTokenizer.vocab_size)
    assert vlm.encode_images(batch["pixel_values"]).shape == (3, 4, 32)
    assert torch.isfinite(out.loss)


def test_labels_mark_answer_only():
    tb = text_batch(ByteTokenizer(), ["ab", "abcd"], [" x", " yz"])
    # prompt = BOS + bytes; answer bytes are the only labelled tokens, padding is masked.
    assert (tb["labels"] != -100).sum(1).tolist() == [2, 3]
    assert tb["attention_mask"].sum(1).tolist() == [5, 8]
    assert tb["labels"][0, 3:5].tolist() == [ord(" ") + 3, ord("x") + 3]


def test_loss_is_answer_only_cross_entropy(vlm, io):
    batch = io.batch(_images(2), ["Q:", "Question:"], [" coat", " bag"])
    out = vlm(**batch)
    manual = -sequence_logprobs(out.logits, batch["labels"]).sum() / (batch["labels"] != -100).sum()
    assert torch.allclose(out.loss, manual, atol=1e-5)


def test_padding_does_not_change_scores(vlm, io):
    """Right padding + the extended attention mask: a padded row scores as it does alone."""
    ims = _images(2)
    both = io.batch(ims, ["Q:", "A much longer question:"], [" coat", " ankle boot"])
    alone = io.batch(ims[:1], ["Q:"], [" coat"])
    s_both = sequence_logprobs(vlm(**both).logits, both["labels"])
    s_alone = sequence_logprobs(vlm(**alone).logits, alone["labels"])
    assert torch.allclose(s_both[0], s_alone[0], atol=1e-4)


def test_image_index_shares_images(vlm, io):
    ims = _images(2)
    shared = io.choice_batch(ims, ["Q:"] * 2, [" a", " bc", " def"])
    assert shared["pixel_values"].shape[0] == 2 and shared["input_ids"].shape[0] == 6
    repeated = io.batch([im for im in ims for _ in range(3)], ["Q:"] * 6, [" a", " bc", " def"] * 2)
    a = sequence_logprobs(vlm(**shared).logits, shared["labels"])
    b = sequence_logprobs(vlm(**repeated).logits, repeated["labels"])
    assert torch.allclose(a, b, atol=1e-4)


def test_image_changes_the_prediction(vlm, io):
    b1 = io.batch(_images(1, 0), ["Q:"], [" coat"])
    b2 = io.batch(_images(1, 1), ["Q:"], [" coat"])
    assert not torch.allclose(vlm(**b1).logits, vlm(**b2).logits)


def test_pool_grid_and_patch_tokens():
    tower = tiny_eva02()
    toks = patch_tokens(tower, torch.randn(2, 3, 28, 28))
    assert toks.shape == (2, 16, 32)  # the CLS token is dropped
    pooled = pool_grid(toks, 2)
    assert torch.allclose(pooled[:, 0], toks.view(2, 4, 4, 32)[:, :2, :2].mean((1, 2)), atol=1e-6)


def test_transform_composites_transparency_on_white():
    im = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    x = ImageTransform(14, mean=(0, 0, 0), std=(1, 1, 1))(im)
    assert x.shape == (3, 14, 14) and torch.allclose(x, torch.ones_like(x))


def test_bad_spec_is_one_clear_line():
    with pytest.raises(ValueError, match="ENCODER\\+LM"):
        split_spec("dinov2-s")


def _pairs(n: int, seed: int) -> list[tuple[Image.Image, str]]:
    # Two visually distinct kinds of image with their own caption: alignment must learn the link.
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        dark = i % 2 == 0
        arr = (rng.random((28, 28)) * 40 + (0 if dark else 200)).astype("uint8")
        out.append((Image.fromarray(arr), "a picture of a " + ("cat" if dark else "dog")))
    return out


def test_alignment_learns_and_is_cached(tmp_path):
    cfg = AlignConfig(steps=60, batch_size=8, lr=3e-2)
    pairs = (_pairs(32, 0), _pairs(16, 1))
    first = build_vlm("tiny-dinov2+tiny-byte-llama", align_config=cfg, cache_root=tmp_path, align_pairs=pairs)
    rec = first.alignment
    assert rec["cached"] is False
    # A random tiny LM is near-uniform (log 259 = 5.56), so the gain is small but must be there.
    assert rec["eval_loss_after"] < rec["eval_loss_before"] - 0.01
    assert rec["train_loss_last10"] < rec["train_loss_first10"]
    folder = next((tmp_path / "vlm-connectors").iterdir())
    assert sorted(p.name for p in folder.iterdir()) == ["alignment.json", "connector.safetensors"]
    assert json.loads((folder / "alignment.json").read_text())["train_pairs"] == 32
    # The towers stay frozen and untouched; only the connector was trained.
    fresh = ComposedVLM(tiny_dinov2(), tiny_byte_llama())
    for name, p in first.model.language_model.state_dict().items():
        assert torch.equal(p, fresh.language_model.state_dict()[name])
    assert not any(p.requires_grad for p in first.model.language_model.parameters())
    second = build_vlm("tiny-dinov2+tiny-byte-llama", align_config=cfg, cache_root=tmp_path, align_pairs=pairs)
    assert second.alignment["cached"] is True
    for k, v in first.model.connector.state_dict().items():
        assert torch.equal(v, second.model.connector.state_dict()[k])
    # Another alignment config is another cache entry.
    build_vlm("tiny-dinov2+tiny-byte-llama", align_config=AlignConfig(steps=2, batch_size=8), cache_root=tmp_path,
              align_pairs=pairs)
    assert len(list((tmp_path / "vlm-connectors").iterdir())) == 2


def test_unaligned_connector_is_seeded():
    a = build_vlm("tiny-dinov2+tiny-byte-llama", align=False).model.connector.proj_in.weight
    b = build_vlm("tiny-dinov2+tiny-byte-llama", align=False).model.connector.proj_in.weight
    assert torch.equal(a, b)


@pytest.mark.parametrize("encoder,vision_gated", [("tiny-dinov2", False), ("tiny-eva02", True)])
def test_discovery_keeps_towers_apart(encoder, vision_gated):
    from nalora import discovery
    model = build_vlm(f"{encoder}+tiny-byte-llama", align=False).model
    gated = discovery.find_gated_ffns(model)
    plain = discovery.find_mlps(model)
    lang = [f for f in gated if f.tower == "language"]
    assert sorted(f.name for f in lang) == ["language_model.model.layers.0.mlp", "language_model.model.layers.1.mlp"]
    assert all(f.activation == "silu" and f.layout == "separate" for f in lang)
    vis_gated = [f for f in gated if f.tower == "vision"]
    vis_plain = [m for m in plain if m.tower == "vision"]
    assert all(f.name.startswith("vision_tower.") for f in vis_gated + vis_plain)
    assert not any(m.name.startswith(("connector", "language_model")) and m.tower == "vision" for m in plain)
    if vision_gated:  # timm EVA02: SwiGLU with gate and up packed in fc1
        assert len(vis_gated) == 2 and not vis_plain
        assert all(f.layout == "packed" and f.activation == "silu" for f in vis_gated)
    else:  # DINOv2: plain GELU MLPs -> plain LoRA only
        assert not vis_gated and len(vis_plain) == 2
    assert not any(m.name.startswith("connector") for m in plain + gated)


def test_inject_trains_connector_and_adapters():
    from nalora import injection
    model = build_vlm("tiny-eva02+tiny-byte-llama", align=False).model
    adapted = injection.inject(model, "nalora", targets=("gate",), rank=2, trainable=["connector"])
    rows = adapted.report
    assert {r["tower"] for r in rows} == {"vision", "language"}
    names = [n for n, p in adapted.model.named_parameters() if p.requires_grad]
    assert any("connector" in n for n in names)
    assert any("vision_tower" in n and "lora" in n for n in names)
    assert any("language_model" in n and "lora" in n for n in names)


def _tiny_qwen25vl():
    """A random 2-layer Qwen2.5-VL and a processor built by hand (byte-level tokenizer, no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        AutoModelForImageTextToText,
        PreTrainedTokenizerFast,
        Qwen2_5_VLConfig,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
    )
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    specials = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    fast.add_special_tokens({"additional_special_tokens": specials})
    ids = dict(zip(specials, fast.convert_tokens_to_ids(specials)))
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=56 * 56),
                                    tokenizer=fast, video_processor=Qwen2VLVideoProcessor())
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                           fullatt_block_indexes=[1], window_size=56, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_config(cfg).eval(), processor


def test_hub_adapter_on_tiny_qwen25vl():
    from benchmarks.vlm.hub import HubIO
    from tasks.base import TaskSetup
    from tasks.registry import get_task

    model, processor = _tiny_qwen25vl()
    io = HubIO(processor)
    ims = [im.convert("RGB") for im in _images(2)]
    batch = io.batch(ims, ["Q: what?", "Q:"], [" bag", " ankle boot"])
    # The answer bytes are exactly the labelled tokens, whatever the image expansion did.
    assert (batch["labels"] != -100).sum(1).tolist() == [4, 11]
    assert processor.tokenizer.decode(batch["labels"][1][batch["labels"][1] != -100]) == " ankle boot"
    out = model(**batch)
    manual = -sequence_logprobs(out.logits, batch["labels"]).sum() / (batch["labels"] != -100).sum()
    assert torch.allclose(out.loss, manual, atol=1e-4)
    # Both towers of Qwen2.5-VL have gated FFNs; discovery must keep them apart.
    from nalora import discovery
    towers = {(f.tower, f.activation) for f in discovery.find_gated_ffns(model)}
    assert towers == {("vision", "silu"), ("language", "silu")}
    # The QA task runs unchanged on it.
    names = ["T-shirt/top", "Trouser", "Bag"]
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
    from datasets import Image as DImage

    ds = Dataset.from_dict({"image": ims * 2, "label": [0, 1, 2, 0], "id": list("abcd")},
                           features=Features({"image": DImage(), "label": ClassLabel(names=names),
                                              "id": Value("string")}))
    task = get_task("fashion-mnist", splits=DatasetDict(train=ds, validation=ds, test=ds))
    setup = TaskSetup(model=model, trainable=list(io.trainable), extras={"io": io, "classes": task.classes()})
    assert torch.isfinite(task.loss(setup, model, next(task.train_batches(setup, 2, 0))))
    metrics = task.evaluate(setup, model, "test", batch_size=2)
    assert metrics["n"] == 4 and 0 <= metrics["acc"] <= 1


@pytest.mark.parametrize("encoder", ["tiny-dinov2", "tiny-eva02"])
def test_score_choices_matches_full_forward(encoder, io):
    """The KV-cache-sharing fast path scores exactly what the plain forward scores."""
    model = build_vlm(f"{encoder}+tiny-byte-llama", align=False).model
    choices = [" t-shirt/top", " bag", " x", " ankle boot"]
    ims = _images(3)
    batch = io.choice_batch(ims, ["Question: what? Answer:"] * 3, choices)
    slow = sequence_logprobs(model(**batch).logits, batch["labels"]).view(3, 4)
    tok = ByteTokenizer()
    fast = model.score_choices(batch["pixel_values"], tok.encode("Question: what? Answer:"),
                               [tok.encode(c, add_special_tokens=False) for c in choices])
    assert torch.allclose(fast, slow, atol=1e-4)


def test_score_choices_sees_the_adapters(io):
    from nalora import injection
    model = build_vlm("tiny-eva02+tiny-byte-llama", align=False).model
    adapted = injection.inject(model, "lora", targets=("gate", "up"), rank=2, trainable=["connector"])
    with torch.no_grad():
        for name, p in adapted.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # B = 0 at init would make the adapter a no-op
    choices = [" bag", " coat"]
    batch = io.choice_batch(_images(2), ["Q:"] * 2, choices)
    through_peft = sequence_logprobs(adapted.model(**batch).logits, batch["labels"]).view(2, 2)
    tok = ByteTokenizer()
    fast = adapted.model.get_base_model().score_choices(
        batch["pixel_values"], tok.encode("Q:"), [tok.encode(c, add_special_tokens=False) for c in choices])
    assert torch.allclose(fast, through_peft, atol=1e-4)
    with adapted.model.disable_adapter():
        plain = sequence_logprobs(adapted.model(**batch).logits, batch["labels"]).view(2, 2)
    assert not torch.allclose(plain, through_peft, atol=1e-3)
