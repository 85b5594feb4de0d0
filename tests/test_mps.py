"""CUDA MPS for the worker pool (benchmarks/runner/mps.py), against a stand-in nvidia-cuda-mps-control on the PATH.

The stand-in does what the daemon's command line does that the runner relies on: ``-d`` starts it (here: a file
in the pipe folder), ``get_server_list`` on stdin lists server PIDs, ``quit`` stops it; every call is logged to
``$FAKE_MPS_CALLS``. The real daemon's effect on a GPU is measured on the GPU machine (results/perf/).
"""

from __future__ import annotations

import os
import stat

import pytest

from benchmarks.runner import mps as M

FAKE = """#!/usr/bin/env bash
if [ "${1:-}" = "-d" ]; then
  echo "-d pipe=$CUDA_MPS_PIPE_DIRECTORY log=$CUDA_MPS_LOG_DIRECTORY cvd=${CUDA_VISIBLE_DEVICES:-unset}" >> "$FAKE_MPS_CALLS"
  [ "${FAKE_MPS_D_RC:-0}" = 0 ] || { echo "cannot start: no device" >&2; exit "$FAKE_MPS_D_RC"; }
  echo up > "$CUDA_MPS_PIPE_DIRECTORY/control"; echo "server failed: no device" > "$CUDA_MPS_LOG_DIRECTORY/control.log"
  exit 0
fi
read -r cmd; echo "$cmd pipe=$CUDA_MPS_PIPE_DIRECTORY" >> "$FAKE_MPS_CALLS"
case "$cmd" in
  get_server_list) [ -n "${FAKE_MPS_NO_SERVER:-}" ] || echo 4242 ;;
  quit) rm -f "$CUDA_MPS_PIPE_DIRECTORY/control" ;;
esac
"""


@pytest.fixture
def fake_mps(tmp_path, monkeypatch):
    """A stand-in control daemon first on the PATH; returns the file its calls are logged to."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / M.CONTROL
    exe.write_text(FAKE)
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    calls = tmp_path / "calls.log"
    monkeypatch.setenv("FAKE_MPS_CALLS", str(calls))
    for var in (M.PIPE_VAR, M.LOG_VAR, "NALORA_MPS", "CUDA_VISIBLE_DEVICES", "FAKE_MPS_D_RC", "FAKE_MPS_NO_SERVER"):
        monkeypatch.delenv(var, raising=False)
    return calls


def _calls(path) -> list[str]:
    return path.read_text().split("\n")[:-1] if path.exists() else []


def test_auto_starts_a_private_daemon_for_a_shared_gpu_and_quits_it(fake_mps):
    seen = []
    m = M.start_mps("auto", ["0"], 4, probe=lambda env: seen.append(env) or "")
    assert m.state == "on" and m.active
    pipe, log = m.env[M.PIPE_VAR], m.env[M.LOG_VAR]
    assert os.path.isfile(os.path.join(pipe, "control")) and m.env[M.STATE_VAR] == "on"
    assert seen[0][M.PIPE_VAR] == pipe and seen[0]["CUDA_VISIBLE_DEVICES"] == "0"  # the probe goes through it
    assert _calls(fake_mps)[0] == f"-d pipe={pipe} log={log} cvd=unset"
    assert _calls(fake_mps)[1] == f"get_server_list pipe={pipe}"
    assert m.device("0") == "0"
    m.stop()
    assert _calls(fake_mps)[-1] == f"quit pipe={pipe}" and not os.path.exists(os.path.dirname(pipe))
    m.stop()  # once only
    assert len(_calls(fake_mps)) == 3


def test_without_a_daemon_auto_time_slices_with_the_reason_and_on_refuses(fake_mps, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    m = M.start_mps("auto", ["0"], 4, probe=lambda env: "")
    assert m.state == f"off: {M.CONTROL} is not on the PATH" and not m.active and m.env == {}
    with pytest.raises(M.MpsError, match="NALORA_MPS=on.*not on the PATH"):
        M.start_mps("on", ["0"], 4, probe=lambda env: "")


def test_a_failed_probe_stops_the_daemon_and_says_why(fake_mps):
    m = M.start_mps("auto", ["0"], 4, probe=lambda env: "a CUDA probe through the daemon failed: boom")
    assert m.state == "off: a CUDA probe through the daemon failed: boom (control.log: server failed: no device)"
    assert _calls(fake_mps)[-1].startswith("quit ")
    with pytest.raises(M.MpsError, match="boom"):
        M.start_mps("on", ["0"], 4, probe=lambda env: "a CUDA probe through the daemon failed: boom")


def test_a_daemon_that_starts_no_server_is_not_used(fake_mps, monkeypatch):
    monkeypatch.setenv("FAKE_MPS_NO_SERVER", "1")
    m = M.start_mps("auto", ["0"], 4, probe=lambda env: "")
    assert m.state.startswith("off: no MPS server started") and _calls(fake_mps)[-1].startswith("quit ")


def test_a_daemon_that_will_not_start_is_reported(fake_mps, monkeypatch):
    monkeypatch.setenv("FAKE_MPS_D_RC", "3")
    m = M.start_mps("auto", ["0"], 4, probe=lambda env: pytest.fail("no probe without a daemon"))
    assert m.state == f"off: {M.CONTROL} -d exited 3: cannot start: no device"


def test_nothing_to_share_and_off_start_nothing(fake_mps, monkeypatch):
    never = lambda env: pytest.fail("no probe")  # noqa: E731
    assert M.start_mps("auto", ["0"], 1, probe=never).state == "off: one worker per GPU shares nothing"
    assert M.start_mps("auto", [None], 4, probe=never).state == "off: no GPU"
    assert M.start_mps("off", ["0"], 4, probe=never).state == "off"
    monkeypatch.setenv("NALORA_MPS", "off")
    assert M.start_mps(None, ["0"], 4, probe=never).state == "off"
    monkeypatch.delenv("NALORA_MPS")
    assert M.start_mps(None, ["0"], 4, probe=never).state == "off"  # the default
    monkeypatch.setenv("NALORA_MPS", "sometimes")
    with pytest.raises(ValueError, match="must be one of auto, on, off, got 'sometimes'"):
        M.start_mps(None, ["0"], 4, probe=never)
    assert _calls(fake_mps) == []


def test_a_daemon_given_to_the_runner_is_used_and_never_stopped(fake_mps, monkeypatch, tmp_path):
    monkeypatch.setenv(M.PIPE_VAR, str(tmp_path / "theirs"))
    m = M.start_mps("auto", ["0"], 4, probe=lambda env: pytest.fail("no probe"))
    assert m.state == "external" and m.active and m.env == {M.STATE_VAR: "external"}
    m.stop()
    assert M.start_mps(None, ["0"], 4).state == "external"  # its workers use it even with MPS off here
    assert _calls(fake_mps) == []


def test_clients_count_devices_among_those_the_daemon_sees(fake_mps, monkeypatch):
    """With CUDA_VISIBLE_DEVICES=3,5 the daemon sees two devices, 0 and 1 to its clients."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    seen = []
    m = M.start_mps("auto", ["3", "5"], 2, probe=lambda env: seen.append(env) or "")
    assert (m.device("3"), m.device("5")) == ("0", "1") and seen[0]["CUDA_VISIBLE_DEVICES"] == "0"
    assert _calls(fake_mps)[0].endswith("cvd=3,5")
    m.stop()


def test_a_records_mps_state_names_a_daemon_given_from_outside(fake_mps, monkeypatch, tmp_path):
    assert M.worker_state() == "off"
    monkeypatch.setenv(M.PIPE_VAR, str(tmp_path))
    assert M.worker_state() == "external"
    monkeypatch.setenv(M.STATE_VAR, "on")
    assert M.worker_state() == "on"


def _worker_env() -> dict:
    return {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", M.PIPE_VAR, M.STATE_VAR)}


@pytest.mark.slow  # spawns 2 x 2 workers
def test_the_pool_hands_its_workers_the_daemon_and_stops_it_at_close(fake_mps, monkeypatch):
    from benchmarks.runner import pool as P

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    monkeypatch.setattr(M, "_probe_cuda", lambda env: "")
    with P.WorkerPools(2, "auto") as pools:
        assert pools.mps.state == "on"
        pipe = pools.mps.env[M.PIPE_VAR]
        seen = {g: pools.get(g).submit(_worker_env).result(timeout=120) for g in pools.gpus}
    assert seen == {"3": {"CUDA_VISIBLE_DEVICES": "0", M.PIPE_VAR: pipe, M.STATE_VAR: "on"},
                    "5": {"CUDA_VISIBLE_DEVICES": "1", M.PIPE_VAR: pipe, M.STATE_VAR: "on"}}
    assert _calls(fake_mps)[-1] == f"quit pipe={pipe}"
    with P.WorkerPools(2) as pools:  # off by default
        assert pools.mps.state == "off"
        assert pools.get("5").submit(_worker_env).result(timeout=120) == {
            "CUDA_VISIBLE_DEVICES": "5", M.PIPE_VAR: None, M.STATE_VAR: None}


def test_run_mps_on_needs_the_pool(tmp_path, capsys):
    from benchmarks.cli import main

    assert main(["run", "--suite", "smoke", "--mps", "on", "--out", str(tmp_path)]) != 0
    assert "--mps on needs the worker pool" in capsys.readouterr().err
