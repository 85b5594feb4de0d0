"""Build a causal LM from a Hugging Face config with random fp32 weights and save it, with a tokenizer,
as a local model directory that ``load_model`` / suites accept as a model name.

For throughput measurements on a machine without the asset cache: run time does not depend on the
weights' values. ``python3 -m benchmarks.perf.random_model CONFIG.json TOKENIZER_DIR OUT_DIR``.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


def build(config: str | Path, tokenizer_dir: str | Path, out: str | Path, seed: int = 0) -> Path:
    """Save a random-weight model of ``config`` and the tokenizer files of ``tokenizer_dir`` into ``out``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = json.loads(Path(config).read_text())
    raw.pop("_model_name_or_path", None)
    tok = [Path(tokenizer_dir) / f for f in TOKENIZER_FILES if (Path(tokenizer_dir) / f).is_file()]
    if not any(p.name == "tokenizer.json" for p in tok):
        raise ValueError(f"{tokenizer_dir}: no tokenizer.json")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**raw), dtype=torch.float32)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for p in tok:
        shutil.copy(p, out / p.name)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: python3 -m benchmarks.perf.random_model CONFIG.json TOKENIZER_DIR OUT_DIR")
    print(build(*sys.argv[1:]))
