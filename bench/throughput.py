"""HTTP throughput with and without instrumentation: uvicorn (one worker) loaded by wrk
from a second process; the two servers alternate over several rounds, best round each."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _serve(env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "CHATOBS_"))}
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


#: Everything on: HTTP metrics, traces (always sampled), exemplars.
FULL = {"OTEL_TRACES_SAMPLER": "always_on", "OTEL_METRICS_EXEMPLAR_FILTER": "trace_based"}
#: The same with a common production sampling rate.
SAMPLED_10_PERCENT = {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"}
OFF = {"OTEL_SDK_DISABLED": "true"}


def http_ratio(
    seconds: int = 5, rounds: int = 3, connections: int = 16, full_env: dict[str, str] = FULL
) -> tuple[float, float]:
    """(instrumented rps, uninstrumented rps), best of ``rounds`` alternating runs."""
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk not found: apt-get install -y wrk")
    servers = {name: _serve(env) for name, env in (("full", full_env), ("off", OFF))}
    try:
        best = {"full": 0.0, "off": 0.0}
        for _ in range(rounds):
            for name, (_, url) in servers.items():
                _wrk(url, 1, connections)  # warm-up
                best[name] = max(best[name], _wrk(url, seconds, connections))
        return best["full"], best["off"]
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait(timeout=10)


def idle_rss_bytes() -> int:
    """Resident memory of the instrumented service, idle after start-up and one request."""
    import psutil

    process, _ = _serve(FULL)
    try:
        time.sleep(1)
        return int(psutil.Process(process.pid).memory_info().rss)
    finally:
        process.terminate()
        process.wait(timeout=10)
