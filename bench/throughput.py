"""HTTP throughput with and without instrumentation: uvicorn (one worker) loaded by wrk
from a second process.

Two ways of pairing a variant's server with the uninstrumented one:

* :func:`side_by_side_ratios` (the headline): both loaded at the same time, sharing one
  core, so whatever the machine does in those seconds it does to both;
* :func:`http_ratios`: one after the other, each with the machine to itself, every server
  once a round in a rotated order.

Either way a variant's ratio is the median of its per-round ratios.
"""

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


def serve_command(port: int) -> list[str]:
    """The benchmark app under uvicorn, one worker, on ``port`` (run with ``cwd`` this directory)."""
    return [sys.executable, "-m", "uvicorn", "http_app:app", "--port", str(port), "--log-level", "warning",
            "--no-access-log"]  # fmt: skip


def _serve(env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    base = base_environment()
    # A session of its own: with the kernel's autogroup scheduling, servers sharing a core
    # get equal CPU time per session, not per thread (an exporting server runs two threads).
    process = subprocess.Popen(
        serve_command(port),
        cwd=HERE, env={**base, "PYTHONPATH": str(HERE), **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            httpx.get(f"{url}/v1/ping/warm", timeout=1)
            return process, url
        except httpx.TransportError:
            time.sleep(0.05)
    raise RuntimeError("benchmark server did not start")


def _wrk_command(url: str, seconds: int, connections: int) -> list[str]:
    return ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", f"{url}/v1/ping/item-42"]


def _requests_per_second(wrk_output: str) -> float:
    found = re.search(r"Requests/sec:\s+([\d.]+)", wrk_output)
    if found is None:
        raise RuntimeError(f"no Requests/sec in wrk's output: {wrk_output[-500:]}")
    return float(found.group(1))


def _wrk(url: str, seconds: int, connections: int) -> float:
    command = _wrk_command(url, seconds, connections)
    return _requests_per_second(subprocess.run(command, capture_output=True, text=True, check=True).stdout)


def _wrk_together(urls: list[str], seconds: int, connections: int) -> list[float]:
    """One wrk per URL, all started at once: each server's requests/s over the same seconds."""
    running = [subprocess.Popen(_wrk_command(url, seconds, connections), stdout=subprocess.PIPE, text=True)
               for url in urls]  # fmt: skip
    outputs = [process.communicate()[0] for process in running]
    for process in running:
        if process.returncode:
            raise RuntimeError(f"wrk failed ({process.returncode}): {process.args}")
    return [_requests_per_second(output) for output in outputs]


def _pin(pid: int, cpus: set[int]) -> None:
    """Every thread of ``pid`` onto ``cpus``; threads it starts later inherit it."""
    for task in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(task), cpus)


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
    """Median requests/s per variant, the median over rounds of each variant's requests/s
    divided by the uninstrumented server's in the same round, and those per-round ratios'
    lowest and highest."""

    rps: dict[str, float]
    ratios: dict[str, float]
    spread: dict[str, tuple[float, float]]

    @classmethod
    def of(cls, measured: dict[str, list[float]], per_round: dict[str, list[float]]) -> HttpResult:
        return cls(
            {name: statistics.median(values) for name, values in measured.items()},
            {name: statistics.median(values) for name, values in per_round.items()},
            {name: (min(values), max(values)) for name, values in per_round.items()},
        )


def _require_wrk() -> None:
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk not found: apt-get install -y wrk")


def side_by_side_ratios(
    variants: dict[str, dict[str, str]], seconds: int = 5, rounds: int = 5, connections: int = 16
) -> HttpResult:
    """Each variant's server loaded at the same time as an uninstrumented one, both on one core.

    Both servers are pinned to the last core this process may use and each is a session of
    its own, so the kernel's scheduler gives them equal CPU time: the one that spends more
    per request serves fewer. The wrk processes run on the other cores. A swing of the
    machine's speed (minute to minute, up to 30% here, and several percent between two
    consecutive seconds) falls on both servers at once and cancels in the ratio, which
    one-after-the-other pairing (:func:`http_ratios`) cannot do. Each server serves at about
    half a core, so the requests/s are about half of what one alone serves.

    Every round pairs each variant once, in a rotated order. Example::

        result = side_by_side_ratios({"full": FULL}, seconds=2, rounds=3)
        print(f"{result.ratios['full']:.2f}x, rounds from {result.spread['full'][0]:.2f}")
    """
    _require_wrk()
    cpus = sorted(os.sched_getaffinity(0))
    server_core = {cpus[-1]}
    load_cores = set(cpus[:-1]) or server_core  # one core: everything on it, still side by side
    servers = {name: _serve(env) for name, env in {"off": OFF, **variants}.items()}
    own_cores = os.sched_getaffinity(0)
    try:
        for process, _ in servers.values():
            _pin(process.pid, server_core)
        os.sched_setaffinity(0, load_cores)  # this thread's children, the wrk processes, inherit it
        measured: dict[str, list[float]] = {name: [] for name in servers}
        per_round: dict[str, list[float]] = {name: [] for name in variants}
        names = list(variants)
        for round_number in range(rounds):
            shift = round_number % len(names)
            for name in names[shift:] + names[:shift]:
                urls = [servers["off"][1], servers[name][1]]
                _wrk_together(urls, 1, connections)  # warm-up
                off, on = _wrk_together(urls, seconds, connections)
                measured["off"].append(off)
                measured[name].append(on)
                per_round[name].append(on / off)
        return HttpResult.of(measured, per_round)
    finally:
        os.sched_setaffinity(0, own_cores)
        _stop(servers)


def _stop(servers: dict[str, tuple[subprocess.Popen[bytes], str]]) -> None:
    for process, _ in servers.values():
        process.terminate()
        process.wait(timeout=10)


def http_ratios(
    variants: dict[str, dict[str, str]], seconds: int = 5, rounds: int = 5, connections: int = 16
) -> HttpResult:
    """Each variant's server against one with instrumentation off, one after the other.

    Every round measures every server once, in a rotated order; a variant's ratio is the
    median of its per-round ratios to the uninstrumented server. Pairing within a round,
    rather than comparing best rounds, keeps this machine's minute-to-minute swings (up
    to 30% in its baseline throughput) out of the ratio, but not its second-to-second
    ones: :func:`side_by_side_ratios` is the steadier figure.
    """
    _require_wrk()
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
        per_round = {name: [v / o for v, o in zip(measured[name], measured["off"], strict=True)] for name in variants}
        return HttpResult.of(measured, per_round)
    finally:
        _stop(servers)


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
