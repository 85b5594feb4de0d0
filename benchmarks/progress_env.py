"""One switch for every progress bar: ``--no-progress`` sets it, every layer reads it.

The flag lives in the environment (``NALORA_BENCH_NO_PROGRESS``) so that worker processes inherit it and
code far below the runner (connector alignment, asset loading) can honour it without an argument threaded
through every call. Stdlib only at import, so every layer may use it.
"""

from __future__ import annotations

import os

ENV = "NALORA_BENCH_NO_PROGRESS"


def progress_enabled() -> bool:
    """False once ``quiet_progress()`` ran in this process or an ancestor (``--no-progress``)."""
    return os.environ.get(ENV) != "1"


def quiet_progress() -> None:
    """Silence our bars and those of the Hugging Face libraries (weight loading, downloads, datasets maps),
    in this process and in the workers it spawns (they inherit the environment)."""
    os.environ[ENV] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read by huggingface_hub and transformers at import
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # transformers may already be imported: its flag is read at import
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass
