"""Obtain source package files with the ordinary registry clients, or from a directory of files.

Each client downloads one package file and nothing else (no install, no dependencies):

- PyPI: ``pip download --no-deps`` -> a wheel or sdist; an sdist whose metadata pip refuses to prepare (a
  dependency named by URL, a failing build backend) is taken from the index's JSON listing instead
  (``index_files``), checked against the sha256 the index publishes
- Debian: ``apt-get download`` -> a .deb (unpacked with ``dpkg-deb -x``)
- npm: ``npm pack`` -> a .tgz

``source_dir`` mode (for machines without network): the same files, downloaded elsewhere, are taken
from a directory instead of calling the client. Either way the file's sha256 is checked by the caller.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Source:
    """One package file from one registry."""

    registry: str  # "pypi" | "debian" | "npm"
    package: str
    version: str | None  # None: whatever the registry serves (Debian); the exact version is recorded
    sha256: str | None = None  # known checksum of the downloaded file, when we have one
    pip_args: tuple[str, ...] = ()  # extra pip download args (e.g. a target python version)
    env: dict = field(default_factory=dict, hash=False)  # extra env for the client

    @property
    def key(self) -> str:
        """Stable identifier used for recorded checksums."""
        return f"{self.registry}:{self.package}=={self.version or '*'}"

    def patterns(self) -> list[str]:
        """Glob patterns the downloaded file matches (also used to pick files in ``source_dir`` mode)."""
        if self.registry == "pypi":
            norm = self.package.replace("-", "_").lower()
            v = self.version or "*"
            return [f"{norm}-{v}-*.whl", f"{norm}-{v}.tar.gz", f"{self.package}-{v}.tar.gz"]
        if self.registry == "debian":
            return [f"{self.package}_{self.version or '*'}_*.deb"]
        if self.registry == "npm":
            # scoped names (@a/b) pack to a-b-<v>.tgz
            base = self.package.lstrip("@").replace("/", "-")
            return [f"{base}-{self.version or '*'}.tgz"]
        raise ValueError(f"unknown registry {self.registry!r}")


def _match(directory: Path, src: Source) -> list[Path]:
    names = sorted(os.listdir(directory)) if directory.is_dir() else []
    hits = [directory / n for n in names if any(fnmatch.fnmatch(n.lower(), p.lower()) for p in src.patterns())]
    return hits


class ClientError(RuntimeError):
    """A registry client that exited non-zero; ``output`` holds all it printed."""

    def __init__(self, message: str, output: str):
        super().__init__(message)
        self.output = output


# What pip prints when it has downloaded an sdist but will not prepare its metadata. Only metadata fails: the
# file is what we want, so these (and nothing else) switch to the index download.
PIP_METADATA_REFUSALS = ("cannot declare direct URL dependencies", "metadata-generation-failed")


def _run(cmd: list[str], cwd: Path, env: dict | None = None) -> None:
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        output = f"{proc.stdout}\n{proc.stderr}"
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise ClientError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {' | '.join(tail)}", output)


def client_command(src: Source, dest: Path) -> list[str]:
    """The exact client command that downloads ``src`` into ``dest``."""
    if src.registry == "pypi":
        spec = f"{src.package}=={src.version}" if src.version else src.package
        return [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                "-d", str(dest), *src.pip_args, spec]
    if src.registry == "debian":
        spec = f"{src.package}={src.version}" if src.version else src.package
        return ["apt-get", "download", spec]
    if src.registry == "npm":
        spec = f"{src.package}@{src.version}" if src.version else src.package
        return ["npm", "pack", "--silent", spec]
    raise ValueError(f"unknown registry {src.registry!r}")


def obtain(src: Source, dest: Path, source_dir: Path | None = None, progress: bool = False) -> Path:
    """Put the package file of ``src`` into ``dest`` (a fresh dir) and return its path. ``progress``: a progress
    bar for a download made here (the index fallback; the clients' own output is captured)."""
    dest.mkdir(parents=True, exist_ok=True)
    if source_dir is not None:
        hits = _match(Path(source_dir), src)
        if not hits:
            raise FileNotFoundError(
                f"no file for {src.key} in --source-dir {source_dir} (expected one of {src.patterns()}); "
                f"download it on a machine with network: {' '.join(client_command(src, Path('.')))}"
            )
        # Prefer a wheel over an sdist; otherwise the last (highest) name.
        hits.sort(key=lambda p: (p.suffix == ".whl", p.name))
        out = dest / hits[-1].name
        shutil.copyfile(hits[-1], out)
        return out
    try:
        _run(client_command(src, dest), cwd=dest, env=src.env)
    except ClientError as err:
        refusal = next((r for r in PIP_METADATA_REFUSALS if r in err.output), None)
        if src.registry != "pypi" or src.version is None or refusal is None:
            raise
        return _from_index(src, dest, refusal, progress)
    hits = _match(dest, src)
    if len(hits) != 1:
        raise RuntimeError(f"{src.key}: expected one downloaded file in {dest}, found {[h.name for h in hits]}")
    return hits[0]


def _from_index(src: Source, dest: Path, refusal: str, progress: bool) -> Path:
    """The sdist pip refused (``refusal``), downloaded from the index instead; one line when that fails too."""
    from .cache import AssetError
    from .index_files import download, find_sdist

    try:
        return download(find_sdist(src.package, src.version), dest, progress)
    except AssetError:
        raise  # a checksum mismatch: its own message says it all
    except RuntimeError as err:
        raise RuntimeError(f"{src.key}: pip download refused the sdist ({refusal}) and the index fallback "
                           f"failed: {err}") from None


def package_version(src: Source, path: Path) -> str:
    """The exact version of a downloaded file (needed for Debian, where we do not pin one)."""
    if src.version:
        return src.version
    if src.registry == "debian":  # name_version_arch.deb
        return path.name.split("_")[1]
    return "unknown"


# --- reading package files --------------------------------------------------------------------------
def extract(path: Path, dest: Path, members: list[str] | None = None) -> Path:
    """Unpack a wheel/zip, .tgz/.tar.gz or .deb into ``dest``; ``members`` = glob patterns to keep."""
    dest.mkdir(parents=True, exist_ok=True)
    name = path.name
    if name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(path) as zf:
            keep = [m for m in zf.namelist() if members is None or any(fnmatch.fnmatch(m, p) for p in members)]
            zf.extractall(dest, keep)
    elif name.endswith((".tgz", ".tar.gz")):
        with tarfile.open(path) as tf:
            keep = [m for m in tf.getmembers()
                    if (m.isfile() or m.isdir()) and (members is None or any(fnmatch.fnmatch(m.name, p) for p in members))]
            tf.extractall(dest, keep, filter="data")
    elif name.endswith(".deb"):
        _run(["dpkg-deb", "-x", str(path), str(dest)], cwd=dest)
    else:
        raise ValueError(f"don't know how to unpack {name}")
    return dest


def read_member(path: Path, member: str) -> bytes:
    """One file out of a wheel/zip without unpacking the rest."""
    with zipfile.ZipFile(path) as zf:
        try:
            return zf.read(member)
        except KeyError:
            raise FileNotFoundError(f"{member} not found in {path.name}") from None
