"""The full setup's cost per request without an HTTP server: the benchmark app called as an
ASGI application in one process, 10,000 requests per round, best of 7 rounds.

Steadier than requests/s through uvicorn, whose own per-request cost here (about 170 µs of
CPU at the 5,794 requests a second of the latest full run, more on slower days) and
run-to-run swings dwarf the instrumentation's. Each variant runs in a fresh
process because chatobs reads its settings once, from the environment.

    python bench/asgi_overhead.py
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from pathlib import Path

import throughput

HERE = Path(__file__).resolve().parent
#: The same configurations as the HTTP throughput benchmark's.
VARIANTS = {"off": throughput.OFF, "lean tracer": throughput.FULL, "SDK tracer": throughput.FULL_SDK_TRACER}
_SCOPE = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
          "path": "/v1/ping/item-42", "raw_path": b"/v1/ping/item-42", "query_string": b"", "root_path": "",
          "headers": [(b"host", b"bench")], "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}  # fmt: skip


#: Requests per round.
REQUESTS = 10_000


async def _per_request_us(requests: int = REQUESTS, rounds: int = 7, warm_up: int = 2_000) -> float:
    sys.path.insert(0, str(HERE))
    from http_app import app

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, object]) -> None:
        pass

    async def run(count: int) -> None:
        for _ in range(count):
            await app(dict(_SCOPE), receive, send)

    await run(warm_up)
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        await run(requests)
        best = min(best, (time.perf_counter() - started) / requests)
    return best * 1e6


def measure(rounds: int = 7) -> dict[str, float]:
    """µs per request for each variant, each in its own process: the best of ``rounds`` rounds
    of :data:`REQUESTS` requests (``bench/run.py --quick`` takes 3)."""
    base = throughput.base_environment()
    results = {}
    for name, env in VARIANTS.items():
        output = subprocess.run([sys.executable, __file__, "--child", str(REQUESTS), str(rounds)], env={**base, **env},
                                capture_output=True, text=True, check=True).stdout  # fmt: skip
        results[name] = float(output.strip().splitlines()[-1])
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # --child [requests [rounds [warm-up]]]: one variant, in the environment it was started
    # with (measure() starts these; bench/instructions.py runs them under callgrind).
    parser.add_argument("--child", nargs="*", type=int, metavar="count", help=argparse.SUPPRESS)
    counts = parser.parse_args().child
    if counts is not None:
        print(asyncio.run(_per_request_us(*counts)))
    else:
        measured = measure()
        for name, us in measured.items():
            print(f"{name:12s} {us:6.1f} µs/request  (+{us - measured['off']:.1f} µs)")
