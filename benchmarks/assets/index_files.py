"""Download one package file straight from a Python package index, checked against its published sha256.

The fallback for sdists that ``pip download`` refuses although nothing needs installing: pip prepares an
sdist's metadata even with ``--no-deps`` (no pip option skips that), and refuses e.g. ``bigbench==1.0.0``
because its metadata names a dependency by URL. The file itself is fine, so it is taken from the index's JSON
listing (PEP 691, the Simple API pip itself reads; PyPI's per-version ``/pypi/<name>/<version>/json`` is not
reachable everywhere the Simple API is), streamed, and checked against the listing's sha256.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin

from packaging.utils import InvalidSdistFilename, canonicalize_name, parse_sdist_filename
from packaging.version import Version

from .cache import AssetError

DEFAULT_INDEX = "https://pypi.org/simple"
SIMPLE_JSON = "application/vnd.pypi.simple.v1+json"
TIMEOUT_S = 60  # per socket operation, not for the whole download


@dataclass(frozen=True)
class IndexFile:
    """One file of a project's index listing."""

    filename: str
    url: str
    sha256: str
    size: int | None


def index_url() -> str:
    """The index pip is told to use through ``$PIP_INDEX_URL`` when that is http(s), else PyPI's."""
    env = os.environ.get("PIP_INDEX_URL", "")
    return env.rstrip("/") if env.startswith(("http://", "https://")) else DEFAULT_INDEX


def find_sdist(package: str, version: str, index: str | None = None) -> IndexFile:
    """The sdist of ``package==version`` in the index's JSON listing; one-line ``RuntimeError`` when absent."""
    page = f"{(index or index_url()).rstrip('/')}/{canonicalize_name(package)}/"
    req = urllib.request.Request(page, headers={"Accept": SIMPLE_JSON})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
            kind = resp.headers.get_content_type()
            body = resp.read()
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        raise RuntimeError(f"index listing {page} unreachable: {err}") from None
    if kind != SIMPLE_JSON:
        raise RuntimeError(f"index {page} answered {kind}, not the JSON Simple API (PEP 691)")
    want = (canonicalize_name(package), Version(version))
    try:
        files = json.loads(body).get("files", [])
    except (ValueError, AttributeError) as err:
        raise RuntimeError(f"index {page} answered a listing that is not JSON of the Simple API: {err}") from None
    for f in files:
        try:
            name, ver = parse_sdist_filename(f["filename"])
        except InvalidSdistFilename:
            continue  # a wheel or another archive kind
        if (name, ver) != want:
            continue
        sha = (f.get("hashes") or {}).get("sha256")
        if not sha:
            raise RuntimeError(f"index {page} publishes no sha256 for {f['filename']}: it cannot be verified")
        return IndexFile(f["filename"], urljoin(page, f["url"]), sha, f.get("size"))
    raise RuntimeError(f"index {page} lists no sdist of {package}=={version}")


def download(file: IndexFile, dest: Path, progress: bool = False, chunk: int = 1 << 20) -> Path:
    """Stream ``file`` into ``dest`` (a directory), hashing as it goes; keep it only if its sha256 is the
    published one (else ``AssetError``, nothing left behind). ``progress``: a byte progress bar on stderr."""
    from tqdm.auto import tqdm

    dest.mkdir(parents=True, exist_ok=True)
    out, part = dest / file.filename, dest / f"{file.filename}.part"
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(file.url, timeout=TIMEOUT_S) as resp, open(part, "wb") as fh, \
                tqdm(total=file.size or resp.length, unit="B", unit_scale=True, desc=file.filename,
                     disable=not progress, leave=False) as bar:
            while block := resp.read(chunk):
                fh.write(block)
                h.update(block)
                bar.update(len(block))
        if h.hexdigest() != file.sha256:
            raise AssetError(f"checksum mismatch for {file.filename} from {file.url}: got sha256 {h.hexdigest()}, "
                             f"the index publishes {file.sha256}; the download is corrupted")
        os.replace(part, out)
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:  # IncompleteRead: a cut stream
        raise RuntimeError(f"download of {file.url} failed: {err}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
    return out
