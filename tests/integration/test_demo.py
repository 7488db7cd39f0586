"""`chatobs demo --duration 60`, as a user runs it on a fresh machine (the README's main job)."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil

from tests.conftest import ROOT, clean_env


def test_demo_runs_its_scenario_moves_every_metric_and_leaves_nothing_behind(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "chatobs.cli", "demo", "--duration", "60", "--rate", "6", "--run-dir", str(tmp_path)],
        env=clean_env({"COLUMNS": "200"}), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    seen: dict[int, psutil.Process] = {}
    deadline = time.monotonic() + 240
    while process.poll() is None and time.monotonic() < deadline:
        try:  # every process the demo starts, to check none outlives it
            for child in psutil.Process(process.pid).children(recursive=True):
                seen.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            pass
        time.sleep(1)
    output = process.communicate(timeout=60)[0]
    assert process.returncode == 0, output[-3000:]
    assert "every catalogue metric moved" in output, output[-3000:]
    for name in ("chat page", "gateway", "worker", "publisher", "replicator", "tool_executor"):
        assert name in output
    assert len(seen) >= 10, "stack servers, simulators and services were started"
    _, alive = psutil.wait_procs(list(seen.values()), timeout=10)
    assert alive == [], f"left running: {[(p.pid, p.name()) for p in alive]}"
