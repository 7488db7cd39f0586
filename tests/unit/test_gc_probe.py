"""The garbage-collection probe behind `bench/pipeline_cpu.py --demo --gc` (bench/gc_probe):
a real Python process started with it on its path, its figures read back as the benchmark
reads them."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT, clean_env

sys.path.insert(0, str(ROOT / "bench"))

from pipeline_cpu import CollectionProbe

PROBE = str(ROOT / "bench" / "gc_probe")
# Three full collections and two of generation 0, then time for the probe's once-a-second write.
COLLECTING = "import gc, time; [gc.collect() for _ in range(3)]; gc.collect(0); gc.collect(0); time.sleep(1.6)"


def _run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", COLLECTING], env=clean_env(env), capture_output=True, text=True,
                          timeout=60)  # fmt: skip


def test_a_process_with_the_probe_reports_its_collections_by_generation(tmp_path):
    directory = tmp_path / "not yet made"  # the probe makes it
    result = _run({"PYTHONPATH": PROBE, "BENCH_GC_DIR": str(directory)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr == ""
    (written,) = directory.glob("*.json")
    figures = json.loads(written.read_text())
    full_count, full_seconds = figures["collections"]["2"]
    assert full_count >= 3  # the interpreter may collect on its own too, never fewer
    assert full_seconds > 0
    assert figures["collections"]["0"][0] >= 2
    assert figures["cpu_seconds"] > 0


def test_without_a_directory_the_probe_does_nothing(tmp_path):
    looking = "import gc, threading; print(len(gc.callbacks), sorted(t.name for t in threading.enumerate()))"
    for env in ({"PYTHONPATH": PROBE}, {"PYTHONPATH": PROBE, "BENCH_GC_DIR": str(tmp_path)}):
        result = subprocess.run([sys.executable, "-c", looking], env=clean_env(env), capture_output=True,
                                text=True, timeout=60)  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
        shown = result.stdout.strip()
        if "BENCH_GC_DIR" in env:  # the same check sees the probe when it is on
            assert shown == "1 ['MainThread', 'bench-gc-probe']", shown
        else:
            assert shown == "0 ['MainThread']", shown


def test_the_benchmark_reports_what_moved_between_two_readings():
    before = {"worker": {"collections": {"0": [10, 0.01], "1": [2, 0.004], "2": [1, 0.05]}, "cpu_seconds": 1.0}}
    after = {"worker": {"collections": {"0": [25, 0.03], "1": [3, 0.006], "2": [1, 0.05]}, "cpu_seconds": 3.0}}
    (seen,) = CollectionProbe.between(before, after).values()
    assert (seen.young, seen.full, seen.full_seconds) == (16, 0, 0)
    assert round(seen.young_seconds, 6) == 0.022
    assert round(seen.young_share, 4) == 0.011
    assert round(seen.cpu_seconds, 6) == 2.0
