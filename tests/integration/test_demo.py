"""`chatobs demo --duration 60`, as a user runs it on a fresh machine (the README's main job)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import ROOT, clean_env


def _demo(tmp_path, duration: int, *, terminal_of_its_own: bool = False) -> subprocess.Popen[str]:
    """``chatobs demo``; ``terminal_of_its_own``: in a process group of its own, as a shell runs
    a command, so a Ctrl-C can be sent to the group without reaching the tests."""
    command = [sys.executable, "-m", "chatobs.cli", "demo", "--duration", str(duration), "--rate", "6",
               "--run-dir", str(tmp_path)]  # fmt: skip
    env = clean_env({"COLUMNS": "200"})
    return subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=terminal_of_its_own)  # fmt: skip


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
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_demo_stopped_by_sigterm_or_its_terminal_closing_stops_everything_it_started(tmp_path, stop_signal):
    process = _demo(tmp_path, 600)
    seen: dict[int, psutil.Process] = {}
    # Up to the tool executor, the last service started: then some seconds of traffic.
    _watch(process, seen, time.monotonic() + 180, stop_at="chatpipe.tools")
    assert process.poll() is None, process.communicate()[0][-3000:]
    _watch(process, seen, time.monotonic() + 15)
    process.send_signal(stop_signal)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 0, output[-3000:]
    assert "stopped: every process ended, stack data removed" in output, output[-3000:]
    assert len(seen) >= 10
    _, alive = psutil.wait_procs(list(seen.values()), timeout=10)
    for left in alive:  # not for the next tests to find
        with contextlib.suppress(psutil.Error):
            left.kill()
    assert alive == [], f"left running after {stop_signal.name}: {[(p.pid, p.name()) for p in alive]}"


def _up_and_running(process: subprocess.Popen[str], seen: dict[int, psutil.Process]) -> None:
    """Until the tool executor, the last service started, is up, and then some seconds of traffic."""
    _watch(process, seen, time.monotonic() + 180, stop_at="chatpipe.tools")
    assert process.poll() is None, process.communicate()[0][-3000:]
    _watch(process, seen, time.monotonic() + 8)


def _nothing_left(seen: dict[int, psutil.Process]) -> None:
    _, alive = psutil.wait_procs(list(seen.values()), timeout=10)
    for left in alive:  # not for the next tests to find
        with contextlib.suppress(psutil.Error):
            left.kill()
    assert alive == [], f"left running: {[(p.pid, p.name()) for p in alive]}"


@pytest.mark.slow
def test_a_service_that_dies_stops_the_demo_naming_it_with_a_failure_status(tmp_path):
    """The worker killed: the demo went on printing progress (replies frozen, ``errors 0``) and
    exited 0, its summary showing the worker's last scrape as if read at the end."""
    process = _demo(tmp_path, 600)
    seen: dict[int, psutil.Process] = {}
    _up_and_running(process, seen)
    (worker,) = [child for child in seen.values() if "chatpipe.worker" in " ".join(_command(child))]
    worker.kill()
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 1, output[-3000:]
    assert "died: worker exited with -9" in output, output[-3000:]
    assert "(stale: its last scrape failed)" in output, "the worker's figures are its last scrape's"
    _nothing_left(seen)


@pytest.mark.slow
def test_ctrl_c_in_the_terminal_stops_the_demo_and_only_the_demo_stops_its_services(tmp_path):
    """A Ctrl-C reaches the whole process group: the services, in the demo's group, each got the
    SIGINT too (tracebacks, a start-up that failed, a final scrape of services already gone)."""
    process = _demo(tmp_path, 600, terminal_of_its_own=True)
    seen: dict[int, psutil.Process] = {}
    _up_and_running(process, seen)
    os.killpg(process.pid, signal.SIGINT)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 0, output[-3000:]
    assert "Traceback" not in output and "(stale" not in output and "died" not in output, output[-3000:]
    assert "stopped: every process ended, stack data removed" in output, output[-3000:]
    # The final scrape, read after the services took their last messages, counts every one sent.
    sent = int(re.findall(r"\bsent\s+(\d+)", output)[-1])
    counted = int(re.search(r"chat_messages_in_total\s*│\s*(\d+)", output).group(1))
    assert counted == sent, f"the summary counts {counted} messages in of {sent} sent: read before the stop"
    _nothing_left(seen)
