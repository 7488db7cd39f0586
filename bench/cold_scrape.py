"""What one scrape costs a quiet service: with warm caches, and with the caches evicted first.

Under the demo's load the small services wake every few hundred milliseconds, and by then
other processes have evicted their caches; a loop of scrapes measures a different, much
cheaper scrape. Here each service's telemetry is built in this process, and each timed
scrape follows the writing of 64 MB (twice the last-level cache) and some unrelated Python
work (cold), or another scrape (warm). Medians of 60 scrapes; compare the ratios, not the
microseconds.

    python bench/cold_scrape.py [service ...]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

from chatobs import Telemetry, load_settings

SERVICES = ("gateway", "worker", "publisher", "replicator", "tool_executor")
# Twice the last-level cache (32 MB here), copied in full: every cache line and every page
# of it is written, so neither the caches nor the TLB keep anything the scrape touched.
_JUNK = bytearray(64 * 1024 * 1024)
_PATTERN = bytes(range(256)) * (len(_JUNK) // 256)


def evict_caches() -> None:
    """Write all of the 64 MB buffer (``bench/cold_event.py`` uses it too)."""
    _JUNK[:] = _PATTERN


def _evict() -> None:
    evict_caches()
    sorted({str(n): n for n in range(20_000)})  # and some unrelated Python work


def _median_us(call: Callable[[], object], cold: bool, times: int = 60) -> float:
    measured = []
    for _ in range(times):
        if cold:
            _evict()
        else:
            call()
        started = time.perf_counter()
        call()
        measured.append((time.perf_counter() - started) * 1e6)
    return statistics.median(measured)


def _telemetry(service: str) -> Telemetry:
    telemetry = Telemetry(load_settings({}), service=service)
    for operation in ("select", "insert", "begin", "commit", "update"):
        telemetry.clients.operation("postgres", operation, 0.001, failed=False)
    telemetry.clients.operation("kafka", "commit", 0.001, failed=False)
    return telemetry


def main(services: list[str]) -> None:
    print(f"{'service':14s} {'variant':12s} {'warm µs':>8s} {'cold µs':>8s} {'cold/warm':>9s}")
    for service in services:
        telemetry = _telemetry(service)
        try:
            for variant, encoding in (("text", None), ("gzip", "gzip")):
                scrape = functools.partial(telemetry.scrape, None, encoding)
                warm, cold = _median_us(scrape, cold=False), _median_us(scrape, cold=True)
                print(f"{service:14s} {variant:12s} {warm:8.0f} {cold:8.0f} {cold / warm:9.1f}")
        finally:
            telemetry.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "services",
        nargs="*",
        metavar="service",
        help=f"whose telemetry to scrape: {', '.join(SERVICES)} (default: all)",
    )
    chosen = parser.parse_args().services
    unknown = sorted(set(chosen) - set(SERVICES))
    if unknown:
        parser.error(f"no such service: {', '.join(unknown)} (one of {', '.join(SERVICES)})")
    main(chosen or list(SERVICES))
