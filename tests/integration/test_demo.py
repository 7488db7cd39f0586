"""`chatobs demo --duration 60`, as a user runs it on a fresh machine (the README's main job)."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import ROOT, clean_env


def _demo(tmp_path, duration: int) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "chatobs.cli", "demo", "--duration", str(duration), "--rate", "6",
               "--run-dir", str(tmp_path)]  # fmt: skip
    env = clean_env({"COLUMNS": "200"})
    return subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _watch(process: subprocess.Popen[str], seen: dict[int, psutil.Process], until: float,
           stop_at: str | None = None) -> None:  # fmt: skip
    """Remember every process the demo starts (to check none outlives it) until it ends, the
    deadline passes, or a process whose command line has ``stop_at`` has started."""
    while process.poll() is None and time.monotonic() < until:
        try:
            for child in psutil.Process(process.pid).children(recursive=True):
                seen.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            pass
        if stop_at and any(stop_at in " ".join(_command(child)) for child in seen.values()):
            return
        time.sleep(1)


def _command(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:  # ended, or a zombie
        return []


@pytest.mark.slow
def test_demo_runs_its_scenario_moves_every_metric_and_leaves_nothing_behind(tmp_path):
    process = _demo(tmp_path, 60)
    seen: dict[int, psutil.Process] = {}
    _watch(process, seen, time.monotonic() + 240)
    output = process.communicate(timeout=60)[0]
    assert process.returncode == 0, output[-3000:]
    assert "every catalogue metric moved" in output, output[-3000:]
    for name in ("chat page", "gateway", "worker", "publisher", "replicator", "tool_executor"):
        assert name in output
    assert len(seen) >= 10, "stack servers, simulators and services were started"
    _, alive = psutil.wait_procs(list(seen.values()), timeout=10)
    assert alive == [], f"left running: {[(p.pid, p.name()) for p in alive]}"


@pytest.mark.slow
def test_demo_stopped_by_sigterm_stops_everything_it_started(tmp_path):
    process = _demo(tmp_path, 600)
    seen: dict[int, psutil.Process] = {}
    # Up to the tool executor, the last service started: then some seconds of traffic.
    _watch(process, seen, time.monotonic() + 180, stop_at="chatpipe.tools")
    assert process.poll() is None, process.communicate()[0][-3000:]
    _watch(process, seen, time.monotonic() + 15)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 0, output[-3000:]
    assert "stopped: every process ended, stack data removed" in output, output[-3000:]
    assert len(seen) >= 10
    _, alive = psutil.wait_procs(list(seen.values()), timeout=10)
    for left in alive:  # not for the next tests to find
        with contextlib.suppress(psutil.Error):
            left.kill()
    assert alive == [], f"left running after SIGTERM: {[(p.pid, p.name()) for p in alive]}"
