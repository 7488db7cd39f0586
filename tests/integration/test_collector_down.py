"""The OTLP collector down: an endpoint that refuses connections, or a socket that accepts and never
answers, must cost the gateway no request latency and no unbounded memory, and every export lost to
it is counted. Real gateway processes, measured from the outside as a client sees them."""

from __future__ import annotations

import contextlib
import os
import random
import statistics
import time
from collections.abc import Iterator

import httpx
import psutil
import pytest

from tests.conftest import free_port
from tests.metrics_text import value

#: The figure is the median of the rounds' p99 ratios. Each round's ratio moves by about ±4%
#: here (p99s of 1.2-2.5 ms on a quiet machine); over 9 rounds the median still reached 1.047
#: once with nothing wrong, over 15 its spread is a quarter smaller.
ROUNDS = 15
REQUESTS_PER_ROUND = 1500  # per configuration: a p99 from 15 requests above it, not 8
WARM_UP = 300
#: What the issue allows: the request p99 with the collector down within 5% of the p99 without OTLP.
P99_RATIO_LIMIT = 1.05
#: The span queue is bounded (OTEL_BSP_MAX_QUEUE_SIZE spans); growth beyond this is a leak.
RSS_GROWTH_LIMIT_BYTES = 16 * 1024 * 1024


@contextlib.contextmanager
def quiet_scheduling(pids: list[int]) -> Iterator[str]:
    """Run the measured processes (every thread) and this thread at real-time priority, when allowed.

    The machine is shared: other processes' time slices land on random requests and their tail
    latency varies by ±20% between identical runs. Above every ordinary process, what remains is
    the gateways' own work, including their exporter threads: the thing measured here.
    """
    try:
        for pid in pids:
            for thread in os.listdir(f"/proc/{pid}/task"):
                os.sched_setscheduler(int(thread), os.SCHED_FIFO, os.sched_param(1))
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        mode = "real-time"
    except (AttributeError, OSError):  # no permission (or not Linux): measure as it is, noisier
        mode = "normal"
    try:
        yield mode
    finally:
        with contextlib.suppress(AttributeError, OSError):
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


def p99(latencies: list[float]) -> float:
    return statistics.quantiles(latencies, n=100)[98]


# 67,500 interleaved requests take 75 s (quiet) to about 180 s (busy) on this machine kind, alone: past the suite's
# default 120 s as soon as anything else runs. The counts are what make a 5% p99 limit hold.
@pytest.mark.slow
@pytest.mark.alone
@pytest.mark.timeout(300)
def test_an_unreachable_collector_costs_no_latency_no_memory_and_is_counted(start_service, stack, blackhole,
                                                                            tmp_path):  # fmt: skip
    base = {**stack, "CHATPIPE_ATTACHMENT_DIR": str(tmp_path / "attachments")}
    otlp = {
        "OTEL_METRICS_EXPORTER": "prometheus,otlp",
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_METRIC_EXPORT_INTERVAL": "1000",  # push (and fail) often within the run
        "OTEL_BSP_SCHEDULE_DELAY": "200",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "2000",
        "CHATOBS_SHUTDOWN_TIMEOUT_SECONDS": "2",
    }
    configurations = {
        "no OTLP": {},
        # A small span queue: it fills while the first export waits on the silent socket.
        "blackhole": {**otlp, "OTEL_EXPORTER_OTLP_ENDPOINT": blackhole, "OTEL_BSP_MAX_QUEUE_SIZE": "64",
                      "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "64"},
        "refused": {**otlp, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}"},
    }  # fmt: skip
    gateways = {name: start_service({**base, **env}, app="chatpipe.gateway:app")
                for name, env in configurations.items()}  # fmt: skip
    clients = {name: httpx.Client(base_url=gateway.base_url, timeout=10) for name, gateway in gateways.items()}

    def request(name: str) -> float:
        started = time.perf_counter()
        response = clients[name].get("/")  # the chat page: one traced request, no backend in the way
        elapsed = time.perf_counter() - started
        assert response.status_code == 200
        return elapsed

    for name in gateways:
        for _ in range(WARM_UP):
            request(name)
    processes = {name: psutil.Process(gateway.process.pid) for name, gateway in gateways.items()}
    rss_before = {name: process.memory_info().rss for name, process in processes.items()}
    round_p99: dict[str, list[float]] = {name: [] for name in gateways}
    slowest_scrape = 0.0
    with quiet_scheduling([process.pid for process in processes.values()]) as scheduling:
        for _ in range(ROUNDS):
            latencies: dict[str, list[float]] = {name: [] for name in gateways}
            order = list(gateways)
            for _ in range(REQUESTS_PER_ROUND):
                random.shuffle(order)  # request by request, so every configuration meets the same noise
                for name in order:
                    latencies[name].append(request(name))
            for name in gateways:
                round_p99[name].append(p99(latencies[name]))
                started = time.perf_counter()
                assert clients[name].get("/metrics").status_code == 200
                slowest_scrape = max(slowest_scrape, time.perf_counter() - started)
    rss_growth = {name: process.memory_info().rss - rss_before[name] for name, process in processes.items()}
    scrapes = {name: client.get("/metrics").text for name, client in clients.items()}

    # Each round's p99s met the same noise (requests interleaved): compare within rounds, then take
    # the median over rounds. A best-of or an overall p99 swings by more than 5% on this machine.
    ratio = {name: statistics.median(down / base for down, base in zip(values, round_p99["no OTLP"], strict=True))
             for name, values in round_p99.items()}  # fmt: skip
    figures = "; ".join(
        f"{name}: p99 per round {', '.join(f'{v * 1000:.2f}' for v in round_p99[name])} ms, median ratio to no OTLP "
        f"{ratio[name]:.3f}, RSS +{rss_growth[name] / 2**20:.1f} MiB"
        for name in gateways
    )
    print(f"\ncollector down, {scheduling} scheduling, slowest scrape {slowest_scrape * 1000:.1f} ms: {figures}")
    for name in ("blackhole", "refused"):
        assert ratio[name] < P99_RATIO_LIMIT, figures
        assert rss_growth[name] < RSS_GROWTH_LIMIT_BYTES, figures
        text = scrapes[name]
        assert value(text, "chatobs_export_failures_total", signal="traces") > 0, name
        assert value(text, "chatobs_export_failures_total", signal="metrics") > 0, name
        assert value(text, "chatobs_spans_dropped_total", reason="export_failed") > 0, name
    assert value(scrapes["blackhole"], "chatobs_spans_dropped_total", reason="queue_full") > 0
    assert "chatobs_export_failures_total{" not in scrapes["no OTLP"]
    assert slowest_scrape < 1.0, f"/metrics took {slowest_scrape:.2f}s"

    # Stopping is bounded too: the last push to the silent socket is given up after 2 s.
    for client in clients.values():
        client.close()
    process = gateways["blackhole"].process
    started = time.monotonic()
    process.terminate()
    process.wait(timeout=30)
    assert time.monotonic() - started < 10, f"SIGTERM took {time.monotonic() - started:.1f}s to stop the gateway"
