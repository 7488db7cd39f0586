"""Instructions per request, counted by valgrind's callgrind: the in-process ASGI benchmark
(``bench/asgi_overhead.py``) with instrumentation off, on with the lean tracer, and on with
the SDK's tracer. Unlike a time, the count does not move with the machine's load, so a
change of a few percent shows.

Each variant runs twice under callgrind, timing 500 and then 2,500 requests after the same
warm-up; the difference of the two totals divided by 2,000 is the count per request
(start-up, imports and warm-up cancel out). The runs go two at a time, one per core: a few
minutes in all. Needs valgrind (``apt-get install -y valgrind``).

    python bench/instructions.py                  # instructions per request
    python bench/instructions.py --caches         # and cache misses, branch mispredictions
    python bench/instructions.py --through-uvicorn

``--caches`` runs cachegrind's cache and branch simulation instead (L1 32 KB each, the
machine's last level): why a share of the instructions can cost a larger share of the time.
``--through-uvicorn`` counts the real server instead: ``bench/http_app.py`` under uvicorn,
off and with the full setup, its counts zeroed after a warm-up and dumped after 2,000
requests over one connection (``callgrind_control``), so uvicorn's HTTP handling is in the
count the in-process app leaves out. It takes a few minutes more: the server starts
under valgrind.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asgi_overhead
import httpx
import throughput

from chatobs.stack import free_port

__all__ = ["available", "per_request", "per_request_events", "through_uvicorn"]

HERE = Path(__file__).resolve().parent
_FEW, _MANY = 500, 2_500
_WARM_UP = 500  # requests before the timed ones, the same in every run
_COLLECTED = re.compile(r"Collected : (\d+)")
#: cachegrind's summary lines, per event (``==pid== D1  misses:  1,234 ...``; spaces vary).
_CACHE_EVENTS = {"instructions": "I refs", "L1 instruction misses": "I1 misses", "data reads and writes": "D refs",
                 "L1 data misses": "D1 misses", "branch mispredictions": "Mispredicts"}  # fmt: skip


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


def _valgrind_environment() -> dict[str, str]:
    """The children's environment; raises if valgrind is missing."""
    if not available():
        raise RuntimeError("valgrind not found: apt-get install -y valgrind")
    # One hash seed for every child: dict and set layouts, and so their counts, alike.
    return {**throughput.base_environment(), "PYTHONHASHSEED": "0"}


def _cache_events(env: dict[str, str], requests: int, out_dir: str) -> dict[str, int]:
    child = [sys.executable, str(HERE / "asgi_overhead.py"), "--child", str(requests), "1", str(_WARM_UP)]
    command = ["valgrind", "--tool=cachegrind", "--cache-sim=yes", "--branch-sim=yes",
               f"--cachegrind-out-file={out_dir}/cachegrind.%p", *child]  # fmt: skip
    finished = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    events = {}
    for name, label in _CACHE_EVENTS.items():
        found = re.search(r"==\d+== " + r"\s+".join(label.split()) + r":\s+([\d,]+)", finished.stderr)
        if found is None:
            raise RuntimeError(f"no {label!r} from cachegrind: {finished.stderr[-500:]}")
        events[name] = int(found.group(1).replace(",", ""))
    return events


def _per_request_of(measure: Callable[[dict[str, str], int, str], Any]) -> dict[str, Any]:
    """``measure(env, requests, out_dir)`` for each variant at two request counts, in parallel;
    the difference over the requests between them, per variant (an int, or a dict of ints)."""
    env = _valgrind_environment()
    jobs = [(name, requests) for name in asgi_overhead.VARIANTS for requests in (_FEW, _MANY)]
    with tempfile.TemporaryDirectory() as out_dir, ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        totals = pool.map(lambda job: measure({**env, **asgi_overhead.VARIANTS[job[0]]}, job[1], out_dir), jobs)
        counts = dict(zip(jobs, totals, strict=True))

    def difference(many: Any, few: Any) -> Any:
        if isinstance(many, dict):
            return {key: (many[key] - few[key]) / (_MANY - _FEW) for key in many}
        return (many - few) / (_MANY - _FEW)

    return {name: difference(counts[name, _MANY], counts[name, _FEW]) for name in asgi_overhead.VARIANTS}


def per_request() -> dict[str, float]:
    """``{variant: instructions per request}`` for the variants of ``bench/asgi_overhead.py``."""
    return _per_request_of(_count)


def per_request_events() -> dict[str, dict[str, float]]:
    """``{variant: {event: count per request}}`` from cachegrind (see :data:`_CACHE_EVENTS`)."""
    return _per_request_of(_cache_events)


def _served_count(env: dict[str, str], requests: int = 2_000, warm_up: int = 300) -> float:
    """Instructions per request of ``bench/http_app.py`` under uvicorn, under callgrind."""
    port = free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        server = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_dir}/callgrind.out",
             *throughput.serve_command(port)],
            cwd=HERE, env={**env, "PYTHONPATH": str(HERE)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}/v1/ping/item-42"
        try:
            deadline = time.monotonic() + 300  # imports under valgrind take a minute or two
            while True:
                try:
                    httpx.get(url, timeout=5)
                    break
                except httpx.TransportError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise RuntimeError("the server under callgrind did not start") from None
                    time.sleep(0.5)
            with httpx.Client(timeout=30) as client:
                for _ in range(warm_up):
                    client.get(url)
                subprocess.run(["callgrind_control", "--zero", str(server.pid)], check=True, capture_output=True)
                for _ in range(requests):
                    client.get(url)
                subprocess.run(["callgrind_control", "--dump", str(server.pid)], check=True, capture_output=True)
            # The dump after --zero is the one numbered .1: only the timed requests are in it.
            summary = re.search(r"^summary: (\d+)", Path(f"{out_dir}/callgrind.out.1").read_text(), re.MULTILINE)
            if summary is None:
                raise RuntimeError("callgrind's dump has no summary line")
            return int(summary.group(1)) / requests
        finally:
            server.terminate()
            server.wait(timeout=60)


def through_uvicorn() -> dict[str, float]:
    """``{"off": n, "full": n}``: instructions per request through the real server."""
    env = _valgrind_environment()
    variants = {"off": throughput.OFF, "full": throughput.FULL}
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        counts = pool.map(lambda variant: _served_count({**env, **variant}), variants.values())
        return dict(zip(variants, counts, strict=True))


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group()
    what.add_argument(
        "--caches", action="store_true", help="cachegrind's cache and branch simulation instead of instruction counts"
    )
    what.add_argument(
        "--through-uvicorn",
        action="store_true",
        help="count the real server (bench/http_app.py under uvicorn), not the in-process app",
    )
    return parser.parse_args()


if __name__ == "__main__":
    arguments = _arguments()
    if arguments.caches:
        events = per_request_events()
        for name in events["off"]:
            print(f"{name:24s} " + "  ".join(
                f"{variant} {by_event[name]:9,.0f} ({by_event[name] / events['off'][name]:.3f}x)"
                for variant, by_event in events.items()))  # fmt: skip
        raise SystemExit
    if arguments.through_uvicorn:
        served = through_uvicorn()
        print(f"through uvicorn: off {served['off']:,.0f}, full setup {served['full']:,.0f} instructions/request "
              f"(+{served['full'] - served['off']:,.0f}, {served['full'] / served['off']:.3f}x)")  # fmt: skip
        raise SystemExit
    measured = per_request()
    for name, count in measured.items():
        print(
            f"{name:12s} {count:10,.0f} instructions/request  (+{count - measured['off']:,.0f}, "
            f"{count / measured['off']:.3f}x off)"
        )
