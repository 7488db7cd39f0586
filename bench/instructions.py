"""Instructions per request, counted by valgrind's callgrind: the in-process ASGI benchmark
(``bench/asgi_overhead.py``) with instrumentation off, on with the lean tracer, and on with
the SDK's tracer. Unlike a time, the count does not move with the machine's load, so a
change of a few percent shows.

Each variant runs twice under callgrind, timing 500 and then 2,500 requests after the same
warm-up; the difference of the two totals divided by 2,000 is the count per request
(start-up, imports and warm-up cancel out). The runs go two at a time, one per core: a few
minutes in all. Needs valgrind (``apt-get install -y valgrind``).

    python bench/instructions.py
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asgi_overhead
import throughput

__all__ = ["available", "per_request"]

HERE = Path(__file__).resolve().parent
_FEW, _MANY = 500, 2_500
_WARM_UP = 500  # requests before the timed ones, the same in every run
_COLLECTED = re.compile(r"Collected : (\d+)")


def available() -> bool:
    return shutil.which("valgrind") is not None


def _count(env: dict[str, str], requests: int, out_dir: str) -> int:
    child = [sys.executable, str(HERE / "asgi_overhead.py"), "--child", str(requests), "1", str(_WARM_UP)]
    command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_dir}/callgrind.%p", *child]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    found = _COLLECTED.search(finished.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count from callgrind: {finished.stderr[-500:]}")
    return int(found.group(1))


def per_request() -> dict[str, float]:
    """``{variant: instructions per request}`` for the variants of ``bench/asgi_overhead.py``."""
    if not available():
        raise RuntimeError("valgrind not found: apt-get install -y valgrind")
    base = throughput.base_environment()
    jobs = [(name, requests) for name in asgi_overhead.VARIANTS for requests in (_FEW, _MANY)]
    with tempfile.TemporaryDirectory() as out_dir, ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        # One hash seed for every child: dict and set layouts, and so their instruction counts, alike.
        env = {**base, "PYTHONHASHSEED": "0"}
        totals = pool.map(lambda job: _count({**env, **asgi_overhead.VARIANTS[job[0]]}, job[1], out_dir), jobs)
        counts = dict(zip(jobs, totals, strict=True))
    return {name: (counts[name, _MANY] - counts[name, _FEW]) / (_MANY - _FEW) for name in asgi_overhead.VARIANTS}


if __name__ == "__main__":
    measured = per_request()
    for name, count in measured.items():
        print(
            f"{name:12s} {count:10,.0f} instructions/request  (+{count - measured['off']:,.0f}, "
            f"{count / measured['off']:.3f}x off)"
        )
