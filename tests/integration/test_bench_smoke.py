"""`python bench/run.py --quick` runs and prints its machine-readable line, and
`bench/cold_event.py` its table (no thresholds: benchmarks are not timed tests; their
results are recorded in docs/performance.md); every script answers `--help` and refuses
an argument it does not know."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT, clean_env


@pytest.mark.slow
# Beyond the suite's 120 s: `--quick` takes about 95 s alone, and runs here beside the other tests
# on two cores. The run's own limit (300 s, below) is the one meant to stop it.
@pytest.mark.timeout(330)
def test_bench_quick_prints_every_ratio():
    result = subprocess.run([sys.executable, "bench/run.py", "--quick"], cwd=ROOT, env=clean_env({"COLUMNS": "160"}),
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    last = result.stdout.strip().splitlines()[-1]
    names = ("recording_ratio", "histogram_ratio", "http_ratio", "scrape_ratio", "scrape_bytes_ratio")
    assert re.fullmatch(" ".join(rf"{name}=\d+\.\d\d" for name in names), last), last


def test_cold_event_prints_every_event():
    result = subprocess.run([sys.executable, "bench/cold_event.py", "3"], cwd=ROOT, env=clean_env({}),
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    last = result.stdout.strip().splitlines()[-1]
    events = ("statement", "consumed_record", "outbox_row", "sent_record", "request")
    assert re.fullmatch("cold_calls " + " ".join(rf"{event}=-?\d+\.\d" for event in events), last), last


#: Every script of bench/ a user runs, and an argument each refuses before doing any work.
SCRIPTS = {
    "run.py": "--quik",
    "pipeline_cpu.py": "--traces",  # only with --demo
    "cold_event.py": "0",
    "cold_scrape.py": "no-such-service",
    "instructions.py": "--cashes",
    "asgi_overhead.py": "--quick",
}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_each_bench_script_explains_itself_and_refuses_what_it_does_not_know(script):
    # A mistyped option must not start minutes of benchmarking in the default mode.
    helped = subprocess.run([sys.executable, f"bench/{script}", "--help"], cwd=ROOT, env=clean_env({}),
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert helped.returncode == 0, helped.stderr[-2000:]
    assert helped.stdout.startswith(f"usage: {script}"), helped.stdout[:500]
    refused = subprocess.run([sys.executable, f"bench/{script}", SCRIPTS[script]], cwd=ROOT, env=clean_env({}),
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
    assert f"{script}: error:" in refused.stderr, refused.stderr[-2000:]
