"""``vit-s-swiglu``: a gated (SwiGLU) ViT-S/14 distilled from ``dinov2-s`` (issue 13).

No pretrained gated vision tower installs offline, so we make one as DINOv2 made its small models:
a timm ViT with a SwiGLU MLP, initialised from the teacher wherever shapes match (patch embedding,
CLS token, position embedding resampled, attention, norms, layer scale; the FFNs are new) and trained
to reproduce the teacher's final CLS and patch tokens (cosine + smooth-L1) on augmented images of the
TRAIN splits of the cached image datasets. The validation splits are only used for the quality record
(cosine to the teacher, k-NN accuracy beside the teacher's). Deterministic given the seed (CPU;
on a GPU with deterministic algorithms requested).

CLI: ``python -m benchmarks.vlm.distill --steps N --out DIR`` (``--publish``: into the asset cache
as ``vit-s-swiglu``, the same as ``nalora-bench fetch vit-s-swiglu``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.vlm.encoders import IMAGENET_MEAN, IMAGENET_STD, ImageTransform, all_tokens

ASSET_NAME = "vit-s-swiglu"
TEACHER = "dinov2-s"
DEFAULT_SOURCES = ("fashion-mnist", "emoji", "cifar10")  # cifar10 only when cached (heavy)
ENV_CONFIG = "NALORA_DISTILL_CONFIG"  # JSON overrides of DistillConfig for the asset-cache converter
# What a build costs (the bound; the committed build's own time is in its quality record).
BUILD_ESTIMATE = "about 10 minutes on an H200"
# Where the asset is neither cached nor buildable (no GPU), a grid runs this random 2-layer tower of the same
# layout instead (benchmarks/vlm/tiny.py), and says so (benchmarks/runner/built_models.py).
STAND_INS = {ASSET_NAME: "tiny-vit-swiglu"}
WEIGHTS, STUDENT_JSON, QUALITY_JSON, PROVENANCE_JSON = "model.safetensors", "student.json", "quality.json", "provenance.json"


@dataclass
class StudentConfig:
    """Shape of the student ViT. The default matches DINOv2-S except the FFN: SwiGLU with 1,024 hidden
    channels (3 x 384 x 1024 weights = DINOv2-S's 2 x 384 x 1536), DINOv2's own SwiGLU sizing."""

    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    patch_size: int = 14
    mlp_hidden: int = 1024
    init_values: float = 1.0  # layer scale on (DINOv2 has it)


@dataclass
class DistillConfig:
    """Everything that decides the student's weights (recorded in the provenance)."""

    steps: int = 3000
    batch_size: int = 256
    seed: int = 0
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_ratio: float = 0.05
    image_size: int = 112  # the VLM tasks' default input size (8 x 8 patches)
    crop_scale: tuple[float, float] = (0.35, 1.0)
    sources: tuple[str, ...] = DEFAULT_SOURCES
    eval_per_source: int = 1000  # validation images per source for the quality record
    knn_bank_per_source: int = 5000  # train images per source as the k-NN reference bank
    knn_k: int = 20
    max_minutes: float | None = None  # safety stop of the training loop (the provenance records the steps done)
    student: StudentConfig = field(default_factory=StudentConfig)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DistillConfig:
        known = {f.name for f in fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise ValueError(f"{ENV_CONFIG}: unknown distillation option {bad[0]!r}; known: {sorted(known)}")
        d = dict(d)
        if "student" in d:
            d["student"] = StudentConfig(**d["student"])
        for k in ("crop_scale", "sources"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


# --- the student ---------------------------------------------------------------------------------
def _swiglu_layer(hidden: int):
    """timm's ``mlp_layer`` hook with an exact hidden width (``int(dim * ratio)`` can round 1024 to 1023)."""
    from timm.layers import SwiGLU

    def make(in_features: int, hidden_features: int | None = None, **kw: Any) -> nn.Module:
        return SwiGLU(in_features, hidden, **kw)

    return make


def make_student(cfg: StudentConfig, image_size: int) -> nn.Module:
    """A random-init timm ViT with SwiGLU FFNs (``fc1_g`` gate, ``fc1_x`` up, ``fc2`` down, SiLU)."""
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(img_size=image_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
                              num_heads=cfg.num_heads, mlp_layer=_swiglu_layer(cfg.mlp_hidden), act_layer=nn.SiLU,
                              init_values=cfg.init_values, num_classes=0)
    # timm sets this in create_model; discovery reads it to know a bare tower is an image model.
    model.pretrained_cfg = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "input_size": (3, image_size, image_size)}
    return model


def _resample_pos(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """``(1, 1 + g*g, D)`` -> ``(1, 1 + grid*grid, D)`` (bicubic on the patch part; CLS kept)."""
    from timm.layers import resample_abs_pos_embed

    old = math.isqrt(pos.shape[1] - 1)
    if old == grid:
        return pos
    return resample_abs_pos_embed(pos, new_size=[grid, grid], old_size=[old, old], num_prefix_tokens=1)


def teacher_to_student_state(teacher: nn.Module, student: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map a transformers ``Dinov2Model`` state onto the timm student where shapes match.

    Returns (state to load, student keys left at their init): the FFNs (DINOv2-S's MLP is not gated)."""
    t = teacher.state_dict()
    grid = student.patch_embed.grid_size[0]
    s: dict[str, torch.Tensor] = {
        "cls_token": t["embeddings.cls_token"],
        "pos_embed": _resample_pos(t["embeddings.position_embeddings"], grid),
        "patch_embed.proj.weight": t["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": t["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": t["layernorm.weight"], "norm.bias": t["layernorm.bias"],
    }
    for i in range(len(student.blocks)):
        a, b = f"encoder.layer.{i}.", f"blocks.{i}."
        att = a + "attention.attention."
        for p in ("weight", "bias"):
            s[b + f"attn.qkv.{p}"] = torch.cat([t[att + f"{n}.{p}"] for n in ("query", "key", "value")])
            s[b + f"attn.proj.{p}"] = t[a + f"attention.output.dense.{p}"]
            s[b + f"norm1.{p}"] = t[a + f"norm1.{p}"]
            s[b + f"norm2.{p}"] = t[a + f"norm2.{p}"]
        s[b + "ls1.gamma"] = t[a + "layer_scale1.lambda1"]
        s[b + "ls2.gamma"] = t[a + "layer_scale2.lambda1"]
    own = student.state_dict()
    for k, v in s.items():
        if k not in own or own[k].shape != v.shape:
            raise ValueError(f"teacher -> student: {k} has shape {tuple(v.shape)}, student {tuple(own[k].shape) if k in own else 'none'}")
    return s, sorted(k for k in own if k not in s)


def init_from_teacher(student: nn.Module, teacher: nn.Module) -> list[str]:
    """Copy the teacher's matching weights; zero each FFN's down projection so the fresh FFNs start as
    no-ops (the student starts as the teacher without its MLPs). Returns the keys left fresh."""
    state, fresh = teacher_to_student_state(teacher, student)
    student.load_state_dict(state, strict=False)
    with torch.no_grad():
        for blk in student.blocks:
            blk.mlp.fc2.weight.zero_()
            blk.mlp.fc2.bias.zero_()
    return fresh


def load_student(model_dir: str | Path, image_size: int | None = None) -> nn.Module:
    """A saved student (``student.json`` + ``model.safetensors``), its position embedding resampled to
    ``image_size`` when given (a multiple of the patch size)."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    meta = json.loads((model_dir / STUDENT_JSON).read_text())
    cfg = StudentConfig(**meta["student"])
    size = image_size or int(meta["image_size"])
    if size % cfg.patch_size:
        raise ValueError(f"image_size {size} is not a multiple of the student's patch size {cfg.patch_size}")
    model = make_student(cfg, size)
    state = load_file(str(model_dir / WEIGHTS))
    state["pos_embed"] = _resample_pos(state["pos_embed"], size // cfg.patch_size)
    model.load_state_dict(state)
    return model.eval()


# --- data ----------------------------------------------------------------------------------------
def _to_uint8(images: Sequence[Any], side: int) -> torch.Tensor:
    """PIL images -> ``(N, 3, side, side)`` uint8 (RGBA composited on white, as ``ImageTransform``)."""
    import numpy as np
    from PIL import Image

    out = torch.empty((len(images), 3, side, side), dtype=torch.uint8)
    for i, im in enumerate(images):
        if im.mode == "RGBA":
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, im)
        im = im.convert("RGB")
        if im.size != (side, side):
            im = im.resize((side, side), Image.BICUBIC)
        out[i] = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)
    return out


def _split(ds: Any, split: str) -> Any:
    if split not in ds:
        raise ValueError(f"image source has no {split!r} split (has {list(ds)})")
    return ds[split]


def _subset(n: int, limit: int | None, seed: int) -> list[int]:
    if limit is None or n <= limit:
        return list(range(n))
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=g)[:limit].tolist())


def _images(split_ds: Any, idx: list[int] | None = None) -> list[Any]:
    col = split_ds["image"]
    return list(col) if idx is None else [col[i] for i in idx]


def default_sources(names: Sequence[str], cache_dir: str | None = None) -> dict[str, Any]:
    """The cached datasets among ``names`` (a missing heavy one, e.g. ``cifar10``, is skipped)."""
    from benchmarks.assets import load_dataset
    from benchmarks.assets.cache import Cache
    from benchmarks.assets.registry import get_spec

    cache = Cache(cache_dir)
    out = {}
    for n in names:
        if not cache.has(n):
            if get_spec(n).heavy:
                continue
            raise ValueError(f"image source {n!r} is not in the asset cache; run `nalora-bench fetch {n}`")
        out[n] = load_dataset(n, cache_dir)
    if not out:
        raise ValueError(f"none of the image sources {list(names)} is cached")
    return out


def augment(x: torch.Tensor, size: int, scale: tuple[float, float], gen: torch.Generator) -> torch.Tensor:
    """Random resized crop (area ``scale``, aspect 3/4-4/3) + horizontal flip, batched as one affine
    ``grid_sample``: uint8 ``(B, 3, H, W)`` -> float ``(B, 3, size, size)`` in [0, 1]. Random numbers come
    from ``gen`` on the CPU, so the draws do not depend on the device."""
    b = x.shape[0]
    area = torch.empty(b).uniform_(scale[0], scale[1], generator=gen)
    log_r = torch.empty(b).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen)
    r = torch.exp(log_r)
    w = torch.sqrt(area * r).clamp(max=1.0)  # fraction of the width / height the crop covers
    h = torch.sqrt(area / r).clamp(max=1.0)
    cx = (torch.rand(b, generator=gen) * 2 - 1) * (1 - w)  # crop centre in [-1, 1] coordinates
    cy = (torch.rand(b, generator=gen) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    theta = theta.to(x.device)
    grid = nn.functional.affine_grid(theta, [b, 3, size, size], align_corners=False)
    return nn.functional.grid_sample(x.float() / 255.0, grid, mode="bilinear", padding_mode="reflection",
                                     align_corners=False)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=x.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=x.device)[:, None, None]
    return (x - mean) / std


# --- training ------------------------------------------------------------------------------------
def distill_loss(student_tokens: torch.Tensor, teacher_tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """(1 - cos) + smooth-L1, each on the CLS token and on the patch tokens (mean), fp32."""
    s, t = student_tokens.float(), teacher_tokens.float()
    parts = {}
    for name, a, b in (("cls", s[:, 0], t[:, 0]), ("patch", s[:, 1:], t[:, 1:])):
        parts[f"{name}_cos"] = 1 - nn.functional.cosine_similarity(a, b, dim=-1).mean()
        parts[f"{name}_l1"] = nn.functional.smooth_l1_loss(a, b)
    loss = sum(parts.values())
    return loss, {k: float(v.detach()) for k, v in parts.items()}


def _lr_at(step: int, cfg: DistillConfig) -> float:
    warm = max(1, int(cfg.warmup_ratio * cfg.steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    prog = (step - warm) / max(1, cfg.steps - warm)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * prog))


@contextlib.contextmanager
def _deterministic(device: torch.device) -> Iterator[None]:
    """Deterministic kernels for the build, the process's previous setting restored afterwards."""
    if device.type == "cuda":
        # cuBLAS needs this set before its first use to be deterministic.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    prev = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
        torch.backends.cudnn.benchmark = prev[2]


def _autocast(device: torch.device):
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def train_student(student: nn.Module, teacher: nn.Module, pools: dict[str, torch.Tensor], cfg: DistillConfig,
                  device: torch.device, log: Callable[[str], None] = print) -> list[dict[str, float]]:
    """Distil for ``cfg.steps`` AdamW steps; each step draws a source uniformly per image, then an image
    of that source, then its augmentation, all from one CPU generator seeded by ``cfg.seed``."""
    gen = torch.Generator().manual_seed(cfg.seed)
    names = sorted(pools)
    student.train().to(device)
    teacher.eval().to(device)
    decay = [p for n, p in student.named_parameters() if p.ndim >= 2 and n not in ("pos_embed", "cls_token")]
    other = [p for n, p in student.named_parameters() if not (p.ndim >= 2 and n not in ("pos_embed", "cls_token"))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=cfg.lr)
    history = []
    every = max(1, cfg.steps // 20)
    deadline = time.monotonic() + cfg.max_minutes * 60 if cfg.max_minutes else None
    bar = _step_bar(cfg.steps)
    for step in range(cfg.steps):
        if deadline is not None and time.monotonic() > deadline:
            # A one-command GPU visit has a hard wall-clock limit: stop and record it rather than lose the build.
            log(f"  distill: time budget of {cfg.max_minutes} min reached after {step} of {cfg.steps} steps")
            break
        src = torch.randint(len(names), (cfg.batch_size,), generator=gen)
        batch = []
        for j, n in enumerate(names):
            k = int((src == j).sum())
            if k:
                idx = torch.randint(pools[n].shape[0], (k,), generator=gen)
                batch.append(augment(pools[n][idx.to(device)], cfg.image_size, cfg.crop_scale, gen))
        x = _normalise(torch.cat(batch))
        with torch.no_grad(), _autocast(device):
            t_tok = all_tokens(teacher, x)
        with _autocast(device):
            s_tok = all_tokens(student, x)
        loss, parts = distill_loss(s_tok, t_tok)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"distillation loss is {loss.item()} at step {step}")
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        bar.update(1)
        if step % every == 0 or step == cfg.steps - 1:
            history.append({"step": step, "loss": round(float(loss.detach()), 5), **{k: round(v, 5) for k, v in parts.items()}})
            log(f"  distill step {step}/{cfg.steps}: loss {float(loss.detach()):.4f}")
    else:
        step = cfg.steps
    bar.close()
    if step > 0 and history[-1]["step"] != step - 1:
        history.append({"step": step - 1, "loss": round(float(loss.detach()), 5),
                        **{k: round(v, 5) for k, v in parts.items()}})
    return history


def _step_bar(steps: int) -> Any:
    """A tqdm bar over the distillation steps (silent under ``--no-progress``)."""
    from tqdm.auto import tqdm

    from benchmarks.progress_env import progress_enabled

    return tqdm(total=steps, desc=f"build {ASSET_NAME}", unit="step", disable=not progress_enabled(), mininterval=2.0)


# --- quality -------------------------------------------------------------------------------------
@torch.no_grad()
def _features(model: nn.Module, images: list[Any], size: int, device: torch.device, bs: int = 256):
    """(CLS feature, all tokens) per image, plain resize as the VLM tasks feed the tower."""
    tf = ImageTransform(size)
    cls, toks = [], []
    for i in range(0, len(images), bs):
        x = tf.stack(images[i : i + bs]).to(device)
        with _autocast(device):
            t = all_tokens(model, x).float()
        toks.append(t.cpu())
        cls.append(t[:, 0].cpu())  # CLS after the final norm, as pooled_feature
    return torch.cat(cls), torch.cat(toks)


def knn_accuracy(bank: torch.Tensor, bank_labels: torch.Tensor, query: torch.Tensor, query_labels: torch.Tensor,
                 k: int = 20, temperature: float = 0.07) -> float:
    """DINO's weighted k-NN: cosine neighbours in ``bank``, votes weighted by ``exp(sim / T)``."""
    bank = nn.functional.normalize(bank.float(), dim=-1)
    query = nn.functional.normalize(query.float(), dim=-1)
    sim = query @ bank.T
    k = min(k, bank.shape[0])
    top, idx = sim.topk(k, dim=1)
    n_cls = int(max(bank_labels.max(), query_labels.max())) + 1
    votes = torch.zeros(query.shape[0], n_cls)
    votes.scatter_add_(1, bank_labels[idx], torch.exp(top / temperature))
    return float((votes.argmax(1) == query_labels).float().mean())


def quality_record(student: nn.Module, teacher: nn.Module, sources: dict[str, Any], cfg: DistillConfig,
                   device: torch.device) -> dict[str, Any]:
    """Per source: cosine student-teacher on validation images (CLS and patch tokens) and k-NN accuracy
    (bank: train split, queries: the same validation images) of student and teacher."""
    student.eval().to(device)
    teacher.eval().to(device)
    per: dict[str, Any] = {}
    for name in sorted(sources):
        val, train = _split(sources[name], "validation"), _split(sources[name], "train")
        qi = _subset(len(val), cfg.eval_per_source, cfg.seed)
        bi = _subset(len(train), cfg.knn_bank_per_source, cfg.seed + 1)
        q_img, b_img = _images(val, qi), _images(train, bi)
        q_lab = torch.tensor([val["label"][i] for i in qi])
        b_lab = torch.tensor([train["label"][i] for i in bi])
        s_cls, s_tok = _features(student, q_img, cfg.image_size, device)
        t_cls, t_tok = _features(teacher, q_img, cfg.image_size, device)
        sb_cls, _ = _features(student, b_img, cfg.image_size, device)
        tb_cls, _ = _features(teacher, b_img, cfg.image_size, device)
        per[name] = {
            "n_validation": len(qi), "n_bank": len(bi),
            "cos_cls": round(float(nn.functional.cosine_similarity(s_cls, t_cls, dim=-1).mean()), 4),
            "cos_patch": round(float(nn.functional.cosine_similarity(s_tok[:, 1:], t_tok[:, 1:], dim=-1).mean()), 4),
            "knn_acc_student": round(knn_accuracy(sb_cls, b_lab, s_cls, q_lab, cfg.knn_k), 4),
            "knn_acc_teacher": round(knn_accuracy(tb_cls, b_lab, t_cls, q_lab, cfg.knn_k), 4),
        }
    return {
        "held_out_split": "validation", "knn": {"k": cfg.knn_k, "temperature": 0.07, "feature": "CLS (final norm)",
                                                "bank_split": "train", "query_split": "validation"},
        "image_size": cfg.image_size, "transform": "plain resize, ImageNet mean/std (as the VLM tasks)",
        "per_source": per,
        "mean": {k: round(sum(p[k] for p in per.values()) / len(per), 4)
                 for k in ("cos_cls", "cos_patch", "knn_acc_student", "knn_acc_teacher")},
    }


# --- the build -----------------------------------------------------------------------------------
def code_version() -> dict[str, Any]:
    """Git commit (and whether the tree was dirty) plus this file's sha256."""
    here = Path(__file__).resolve()
    out: dict[str, Any] = {"distill_py_sha256": hashlib.sha256(here.read_bytes()).hexdigest()}
    try:
        root = here.parents[2]
        out["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                           check=True, timeout=10).stdout.strip()
        out["git_dirty"] = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                               capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None  # e.g. a copy without .git
    return out


def _default_teacher() -> tuple[nn.Module, dict[str, Any]]:
    from benchmarks.assets import load_model

    bundle = load_model(TEACHER)
    return bundle.model, {"name": TEACHER, **dict(bundle.provenance or {})}


def _save_state(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def build_vit_s_swiglu(out_dir: str | Path, *, steps: int | None = None, batch_size: int | None = None,
                       seed: int | None = None, device: str | torch.device | None = None,
                       sources: Sequence[str] | Mapping[str, Any] | None = None, config: DistillConfig | None = None,
                       teacher: Callable[[], tuple[nn.Module, dict[str, Any]]] | None = None,
                       log: Callable[[str], None] = print) -> dict[str, Any]:
    """Distil the gated student into ``out_dir`` (``model.safetensors``, ``student.json``,
    ``quality.json``, ``provenance.json``; the provenance is written last). Returns the provenance.

    ``sources``: dataset names (loaded from the asset cache) or ``{name: {split: {"image": [...],
    "label": [...]}}}`` (tests); ``teacher``: a callable returning (model, provenance), default the
    cached ``dinov2-s``. Only ``train`` splits are trained on."""
    cfg = config or DistillConfig()
    over = {k: v for k, v in {"steps": steps, "batch_size": batch_size, "seed": seed}.items() if v is not None}
    if isinstance(sources, (list, tuple)):
        over["sources"] = tuple(sources)
    cfg = DistillConfig.from_dict({**asdict(cfg), **over, "student": asdict(cfg.student)})
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {cfg.steps} and {cfg.batch_size}")
    if cfg.image_size % cfg.student.patch_size:
        raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch size {cfg.student.patch_size}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with _deterministic(dev):
        return _build(Path(out_dir), cfg, dev, sources, teacher, log)


def _build(out: Path, cfg: DistillConfig, dev: torch.device, sources: Any, teacher: Any,
           log: Callable[[str], None]) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    data = dict(sources) if isinstance(sources, Mapping) else default_sources(cfg.sources)
    t_model, t_prov = (teacher or _default_teacher)()
    for p in t_model.parameters():
        p.requires_grad_(False)
    # Source images once as uint8 at their native size (capped at the training size), on the device: the
    # augmentation crops and resizes them on the fly (Fashion-MNIST's 54k images take 127 MB at 28 px).
    pools = {}
    for n, ds in data.items():
        imgs = _images(_split(ds, "train"))
        pools[n] = _to_uint8(imgs, min(max(imgs[0].size), cfg.image_size)).to(dev)
    log(f"  distill: {', '.join(f'{n} {v.shape[0]}' for n, v in pools.items())} train images")
    torch.manual_seed(cfg.seed)
    student = make_student(cfg.student, cfg.image_size)
    fresh = init_from_teacher(student, t_model)
    t_data = time.monotonic() - t0
    history = train_student(student, t_model, pools, cfg, dev, log)
    t_train = time.monotonic() - t0 - t_data
    quality = quality_record(student, t_model, data, cfg, dev)
    _save_state(student, out / WEIGHTS)
    _write_json(out / STUDENT_JSON, {"student": asdict(cfg.student), "image_size": cfg.image_size,
                                     "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "timm_class": "VisionTransformer",
                                     "mlp_layer": "timm.layers.SwiGLU (fc1_g gate, fc1_x up, fc2 down, SiLU)"})
    _write_json(out / QUALITY_JSON, quality)
    import timm

    main_file = t_prov.get("main_file") or {}
    prov = {
        "asset": ASSET_NAME,
        "teacher": {"name": t_prov.get("name", TEACHER), "sha256": main_file.get("sha256"), "provenance": t_prov},
        "data": {n: {"split": "train", "n_images": int(pools[n].shape[0])} for n in sorted(pools)},
        "held_out": {n: "validation" for n in sorted(pools)},
        "skipped_sources": sorted(set(cfg.sources) - set(pools)) if not isinstance(sources, Mapping) else [],
        "config": asdict(cfg),
        "initialised_from_teacher": "patch embedding, CLS token, position embedding (resampled), attention, norms, "
                                    "layer scale",
        "fresh_keys": fresh,
        "params": sum(p.numel() for p in student.parameters()),
        "teacher_params": sum(p.numel() for p in t_model.parameters()),
        "weights_sha256": hashlib.sha256((out / WEIGHTS).read_bytes()).hexdigest(),
        "loss_history": history,
        "steps_done": history[-1]["step"] + 1 if history else 0,
        "code": code_version(),
        "versions": {"torch": torch.__version__, "timm": timm.__version__},
        "device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
        "seconds": {"data": round(t_data, 1), "train": round(t_train, 1), "total": round(time.monotonic() - t0, 1)},
        "quality": quality,
    }
    _write_json(out / PROVENANCE_JSON, prov)
    return prov


# --- asset cache and encoder loading -------------------------------------------------------------
def convert_vit_s_swiglu(files: dict[str, Path], out: Path, work: Path) -> dict:
    """The asset cache's converter for ``vit-s-swiglu`` (no download: built from the cached ``dinov2-s``)."""
    return convert_asset(out)


def convert_asset(out: Path) -> dict[str, Any]:
    """The asset-cache converter of ``vit-s-swiglu`` (``nalora-bench fetch vit-s-swiglu``): builds with
    ``DistillConfig()`` updated from the JSON in env ``NALORA_DISTILL_CONFIG``; needs a GPU unless that
    JSON sets ``"device": "cpu"`` (a CPU build of the default size takes hours)."""
    over = json.loads(os.environ.get(ENV_CONFIG) or "{}")
    device = over.pop("device", None)
    if device is None and not torch.cuda.is_available():
        raise RuntimeError(f"building {ASSET_NAME} needs a GPU ({BUILD_ESTIMATE}); "
                           f"set {ENV_CONFIG}='{{\"device\": \"cpu\", \"steps\": 20}}' to force a toy CPU build")
    cfg = DistillConfig.from_dict(over) if over else DistillConfig()
    print(f"building {ASSET_NAME} (distilling {TEACHER}, {cfg.steps} steps of {cfg.batch_size} images): "
          f"{BUILD_ESTIMATE}, once; later runs use the cached entry", flush=True)
    return build_vit_s_swiglu(out, config=cfg, device=device)


def build_inputs() -> list[str]:
    """The cached assets a build reads: the teacher and the image sets that are not heavy (``cifar10`` is
    used only when it is already cached)."""
    from benchmarks.assets.registry import get_spec

    return [TEACHER, *(n for n in DEFAULT_SOURCES if not get_spec(n).heavy)]


def load_distilled(name: str, image_size: int, cache_dir: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The cached student ``name`` at ``image_size``, with its asset provenance and quality record."""
    from benchmarks.assets.cache import Cache
    from benchmarks.assets.provenance import provenance

    path, _ = Cache(cache_dir).require(name)
    model_dir = path / "model"
    prov = dict(provenance(name, cache_dir))
    prov["quality"] = json.loads((model_dir / QUALITY_JSON).read_text()).get("mean")
    return load_student(model_dir, image_size), prov


DISTILLED_ENCODERS = (ASSET_NAME,)


def quality_markdown(record: Mapping[str, Any]) -> str:
    """The quality record of a built ``vit-s-swiglu`` (its manifest record) as a markdown page: per source,
    cosine to the teacher and k-NN accuracy of student and teacher on the same held-out images."""
    info = record["info"]
    q, cfg = info["quality"], info["config"]
    data = ", ".join(f"{n} ({d['n_images']} images)" for n, d in sorted(info["data"].items()))
    lines = [f"# {info['asset']}: quality record", "",
             f"Generated by `python -m benchmarks.vlm.distill --summarize` from the asset's manifest record. Built on "
             f"{info['device']} in {info['seconds']['total']} s ({info.get('steps_done', cfg['steps'])} of "
             f"{cfg['steps']} steps, batch {cfg['batch_size']}, seed {cfg['seed']}, image size {cfg['image_size']}); "
             f"distilled from `{info['teacher']['name']}` on the train splits of "
             f"{data}"
             + (f"; not cached, so not used: {', '.join(info['skipped_sources'])}" if info.get("skipped_sources") else "")
             + ".", "",
             f"Held-out split: `{q['held_out_split']}`; k-NN: k = {q['knn']['k']}, {q['knn']['feature']}, bank = "
             f"`{q['knn']['bank_split']}` split, queries = `{q['knn']['query_split']}` split; {q.get('transform', '')}.", "",
             "| source | held-out images | bank | cos CLS | cos patch | k-NN student | k-NN teacher |",
             "|---|---|---|---|---|---|---|"]
    for name, r in sorted(q["per_source"].items()):
        lines.append(f"| {name} | {r['n_validation']} | {r['n_bank']} | {r['cos_cls']:.4f} | {r['cos_patch']:.4f} | "
                     f"{r['knn_acc_student']:.4f} | {r['knn_acc_teacher']:.4f} |")
    m = q["mean"]
    lines.append(f"| mean | | | {m['cos_cls']:.4f} | {m['cos_patch']:.4f} | {m['knn_acc_student']:.4f} | "
                 f"{m['knn_acc_teacher']:.4f} |")
    return "\n".join(lines) + "\n"


def import_entry(tar_path: str | Path, record_path: str | Path, cache_dir: str | None = None) -> Path:
    """Publish an entry built elsewhere (a GPU machine): ``tar_path`` holds ``entries/<name>/...``,
    ``record_path`` its manifest record. Every file is checked against the record before publishing."""
    import tarfile

    from benchmarks.assets.cache import Cache, file_table

    rec = json.loads(Path(record_path).read_text())
    name = rec["name"]
    cache = Cache(cache_dir)
    with cache.build(name) as work:
        with tarfile.open(tar_path) as tf:
            tf.extractall(work, filter="data")
        entry = work / "entries" / name
        got = file_table(entry)
        if got != rec["files"]:
            bad = sorted(k for k in set(got) | set(rec["files"]) if got.get(k) != rec["files"].get(k))
            raise ValueError(f"{tar_path}: {bad[0]} does not match its record in {record_path}")
        dest = cache.publish(name, entry, rec)
    shutil.rmtree(work, ignore_errors=True)
    return dest


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.vlm.distill", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="output directory (omit with --publish)")
    ap.add_argument("--publish", action="store_true", help=f"build into the asset cache as {ASSET_NAME!r}")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--image-size", type=int)
    ap.add_argument("--sources", nargs="+")
    ap.add_argument("--eval-per-source", type=int, help="validation images per source in quality.json")
    ap.add_argument("--knn-bank-per-source", type=int, help="train images per source in the k-NN bank")
    ap.add_argument("--device")
    ap.add_argument("--max-minutes", type=float, help="stop training after this many minutes (steps done are recorded)")
    ap.add_argument("--summarize", nargs=2, metavar=("RECORD", "OUT_MD"),
                    help="write the quality record of a built entry's manifest record as markdown")
    ap.add_argument("--import", dest="import_", nargs=2, metavar=("TAR", "RECORD"),
                    help="publish an entry built on another machine into this asset cache")
    args = ap.parse_args(argv)
    if args.summarize:
        from benchmarks.fileio import atomic_write_text

        atomic_write_text(Path(args.summarize[1]), quality_markdown(json.loads(Path(args.summarize[0]).read_text())))
        return 0
    if args.import_:
        print(import_entry(*args.import_))
        return 0
    over = {k: v for k, v in {"steps": args.steps, "batch_size": args.batch_size, "seed": args.seed, "lr": args.lr,
                              "image_size": args.image_size, "sources": args.sources,
                              "eval_per_source": args.eval_per_source,
                              "knn_bank_per_source": args.knn_bank_per_source,
                              "max_minutes": args.max_minutes}.items() if v is not None}
    if args.publish:
        from benchmarks.assets.fetch import fetch

        os.environ[ENV_CONFIG] = json.dumps({**over, **({"device": args.device} if args.device else {})})
        print(fetch([ASSET_NAME], force=True))
        return 0
    if not args.out:
        ap.error("--out DIR or --publish is required")
    cfg = DistillConfig.from_dict(over)
    prov = build_vit_s_swiglu(args.out, config=cfg, device=args.device)
    print(json.dumps({"out": args.out, "quality": prov["quality"]["mean"], "seconds": prov["seconds"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
