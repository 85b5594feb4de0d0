"""CUDA MPS for worker pools that share a GPU: one control daemon per invocation, so that the kernels of the
workers on one GPU run side by side instead of taking turns.

Without MPS, processes on one GPU are time-sliced: only one context's kernels run at a time. A small model's
training step launches many small kernels that fill a few of the H200's 132 multiprocessors; if its workers
were waiting for each other's slices, MPS, under which their kernels share the GPU, would make them faster.

``NALORA_MPS`` (or ``run --mps``) picks the mode: ``off`` (default) never starts one; ``auto`` starts a private
daemon when a GPU pool has two or more workers and ``nvidia-cuda-mps-control`` is on the PATH, and falls back to
time-slicing with a one-line reason when it cannot; ``on`` makes that failure an error before any run starts. A
daemon already serving this process (``CUDA_MPS_PIPE_DIRECTORY`` set) is used as it is, never stopped.

Off by default because it was measured and did not pay: on one H200 (2026-12-04, results/perf/h200/throughput.md,
``improved-v4`` against ``improved-v3``) ten workers of the socialiqa slice trained at the same steady-state speed
with and without it: those runs were not waiting on each other's GPU time slices.

The daemon's pipe and log folders are private (a temporary folder), so no other user's MPS is touched; the
GPU's compute mode and every other setting stay as they are. Under MPS a fatal GPU fault in one worker
(an illegal memory access, not an out-of-memory error) ends every worker on that GPU: the pool's dead-worker
retry then reruns their runs once. A runner killed with SIGKILL leaves its daemon idle behind it (its workers
exit with it); ``echo quit | CUDA_MPS_PIPE_DIRECTORY=/tmp/nalora-mps-*/pipe nvidia-cuda-mps-control`` ends it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Callable

CONTROL = "nvidia-cuda-mps-control"
MODES = ("auto", "on", "off")
PIPE_VAR, LOG_VAR = "CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY"
STATE_VAR = "NALORA_MPS_STATE"  # what a worker's records say of MPS (perf.worker.mps)


class MpsError(RuntimeError):
    """``mode='on'`` and MPS could not be started (the message is one line)."""


@dataclass
class Mps:
    """The invocation's MPS: ``state`` is ``on``, ``external`` (a daemon this process was given), ``off`` (not asked
    for) or ``off: <why>`` (asked for with ``auto``, could not be had);
    ``env`` goes into every worker's environment before it starts CUDA."""

    state: str
    env: dict[str, str] = field(default_factory=dict)
    _dir: str | None = None
    _devices: dict[str, str] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return self.state in ("on", "external")

    def device(self, gpu: str) -> str:
        """The ``CUDA_VISIBLE_DEVICES`` of a worker pinned to ``gpu`` (an id of the runner's own list). An MPS
        client counts devices among those its daemon sees, and the daemon sees the runner's list."""
        return self._devices.get(gpu, gpu)

    def stop(self) -> None:
        """Quit the daemon this invocation started (its servers end with it); a no-op otherwise."""
        if self._dir is None:
            return
        _control("quit", self.env)
        shutil.rmtree(self._dir, ignore_errors=True)
        self._dir = None


def worker_state() -> str:
    """What this process's records say of MPS (``perf.worker.mps``): what its pool set, else ``external`` under a
    daemon given from outside (a Ray worker, a user's own MPS), else ``off``."""
    return os.environ.get(STATE_VAR) or ("external" if os.environ.get(PIPE_VAR) else "off")


def mode_from_env(mode: str | None = None) -> str:
    """``mode``, else ``NALORA_MPS``, else ``off``; a one-line error for anything else."""
    m = (mode or os.environ.get("NALORA_MPS") or "off").strip().lower()
    if m not in MODES:
        raise ValueError(f"NALORA_MPS / --mps must be one of {', '.join(MODES)}, got {m!r}")
    return m


def start_mps(mode: str, gpus: list[str | None], workers: int,
              probe: Callable[[dict[str, str]], str] | None = None) -> Mps:
    """Start MPS for ``workers`` processes on each of ``gpus`` (``None``: a CPU pool) as ``mode`` says.

    ``probe(env)`` starts CUDA in a fresh process with ``env`` and returns ``""`` or why it failed (tests pass
    their own); after it, the daemon must list a server, else MPS did not take and the daemon is stopped.
    """
    mode = mode_from_env(mode)
    if os.environ.get(PIPE_VAR) and any(g is not None for g in gpus):  # the workers inherit it whatever the mode
        return Mps("external", {STATE_VAR: "external"})
    if mode == "off":
        return Mps("off")
    if not any(g is not None for g in gpus):
        return _refuse(mode, "no GPU")
    if workers < 2 and mode == "auto":
        return Mps("off: one worker per GPU shares nothing")
    exe = shutil.which(CONTROL)
    if exe is None:
        return _refuse(mode, f"{CONTROL} is not on the PATH")
    d = tempfile.mkdtemp(prefix="nalora-mps-")
    env = {PIPE_VAR: os.path.join(d, "pipe"), LOG_VAR: os.path.join(d, "log")}
    for p in env.values():
        os.makedirs(p)
    try:
        started = subprocess.run([exe, "-d"], env={**os.environ, **env}, capture_output=True, text=True, timeout=30)
        failed = "" if started.returncode == 0 else f"exited {started.returncode}: {_last_line(started.stderr)}"
    except (OSError, subprocess.TimeoutExpired) as err:
        failed = f"did not start: {type(err).__name__}: {err}"
    if failed:
        shutil.rmtree(d, ignore_errors=True)
        return _refuse(mode, f"{CONTROL} -d {failed}")
    ids = [g for g in gpus if g is not None]
    devices = {g: str(i) for i, g in enumerate(ids)} if os.environ.get("CUDA_VISIBLE_DEVICES") is not None else {}
    mps = Mps("on", {**env, STATE_VAR: "on"}, d, devices)
    why = (probe or _probe_cuda)({**env, "CUDA_VISIBLE_DEVICES": mps.device(ids[0])})
    if not why and not _control("get_server_list", env).strip():
        why = "no MPS server started for the probe's CUDA context"
    if why:
        log_tail = _last_line(_read(os.path.join(env[LOG_VAR], "control.log")))
        mps.stop()
        return _refuse(mode, why + (f" (control.log: {log_tail})" if log_tail else ""))
    return mps


def _refuse(mode: str, why: str) -> Mps:
    if mode == "on":
        raise MpsError(f"MPS was asked for (NALORA_MPS=on) but cannot start: {why}")
    return Mps(f"off: {why}")


def _control(command: str, env: dict[str, str]) -> str:
    exe = shutil.which(CONTROL) or CONTROL
    try:
        r = subprocess.run([exe], input=command + "\n", env={**os.environ, **env}, capture_output=True, text=True,
                           timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return r.stdout


def _probe_cuda(env: dict[str, str]) -> str:
    """Start CUDA through the daemon in a fresh process: '' when it works, else its last line."""
    code = "import torch; torch.zeros(1, device='cuda').add_(1); torch.cuda.synchronize(); print('ok')"
    try:
        r = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                           timeout=120)
    except subprocess.TimeoutExpired:
        return "a CUDA probe through the daemon did not answer in 120 s"
    if r.returncode != 0 or "ok" not in r.stdout:
        return f"a CUDA probe through the daemon failed: {_last_line(r.stderr) or f'exit {r.returncode}'}"
    return ""


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1][:200] if lines else ""
