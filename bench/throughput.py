"""HTTP throughput with and without instrumentation: uvicorn (one worker) loaded by wrk
from a second process. Every variant's server and the uninstrumented one are measured in
each round, in a rotated order; a variant's ratio is the median of its per-round ratios."""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from chatobs.stack import free_port

HERE = Path(__file__).resolve().parent


def base_environment() -> dict[str, str]:
    """This process's environment without OTEL_*/CHATOBS_*: each variant sets its own."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "CHATOBS_"))}


def _serve(env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    base = base_environment()
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "http_app:app", "--port", str(port), "--log-level", "warning",
         "--no-access-log"],
        cwd=HERE, env={**base, "PYTHONPATH": str(HERE), **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            httpx.get(f"{url}/v1/ping/warm", timeout=1)
            return process, url
        except httpx.TransportError:
            time.sleep(0.05)
    raise RuntimeError("benchmark server did not start")


def _wrk(url: str, seconds: int, connections: int) -> float:
    output = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", f"{url}/v1/ping/item-42"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]


#: Everything on: HTTP metrics, traces (always sampled), exemplars. No trace exporter is set
#: (the default): every request's span is made and sampled, and its trace id is in the
#: exemplars and the trace headers, but nothing records it. :func:`exported` ships them.
FULL = {"OTEL_TRACES_SAMPLER": "always_on", "OTEL_METRICS_EXEMPLAR_FILTER": "trace_based"}
#: The same with a common production sampling rate.
SAMPLED_10_PERCENT = {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"}
#: The full setup on the OpenTelemetry SDK's tracer instead of chatobs's lean one.
FULL_SDK_TRACER = {**FULL, "CHATOBS_TRACER": "sdk"}
OFF = {"OTEL_SDK_DISABLED": "true"}


def exported(receiver: dict[str, str]) -> dict[str, str]:
    """The full setup shipping every span, and pushing its metrics every 5 s, over OTLP to
    ``receiver`` (:func:`discard.discarding_receiver`'s environment)."""
    return {**FULL, **receiver, "OTEL_METRIC_EXPORT_INTERVAL": "5000"}


@dataclass
class HttpResult:
    """Median requests/s per variant, and the median over rounds of each variant's
    requests/s divided by the uninstrumented server's in the same round."""

    rps: dict[str, float]
    ratios: dict[str, float]


def http_ratios(
    variants: dict[str, dict[str, str]], seconds: int = 5, rounds: int = 5, connections: int = 16
) -> HttpResult:
    """Each variant's server against one with instrumentation off, measured in pairs.

    Every round measures every server once, in a rotated order; a variant's ratio is the
    median of its per-round ratios to the uninstrumented server. Pairing within a round,
    rather than comparing best rounds, keeps this machine's minute-to-minute swings (up
    to 30% in its baseline throughput) out of the ratio.
    """
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk not found: apt-get install -y wrk")
    servers = {name: _serve(env) for name, env in {"off": OFF, **variants}.items()}
    try:
        measured: dict[str, list[float]] = {name: [] for name in servers}
        names = list(servers)
        for round_number in range(rounds):
            shift = round_number % len(names)
            for name in names[shift:] + names[:shift]:
                url = servers[name][1]
                _wrk(url, 1, connections)  # warm-up
                measured[name].append(_wrk(url, seconds, connections))
        ratios = {name: statistics.median(v / o for v, o in zip(measured[name], measured["off"], strict=True))
                  for name in variants}  # fmt: skip
        return HttpResult({name: statistics.median(values) for name, values in measured.items()}, ratios)
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait(timeout=10)


def idle_rss_bytes(env: dict[str, str] = FULL) -> int:
    """Resident memory of the service (instrumented, by default), idle after start-up and one request."""
    import psutil

    process, _ = _serve(env)
    try:
        time.sleep(1)
        return int(psutil.Process(process.pid).memory_info().rss)
    finally:
        process.terminate()
        process.wait(timeout=10)
