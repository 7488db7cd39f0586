"""Fixtures that start real processes: the service under test runs under uvicorn,
configured by environment variables only, and is scraped over HTTP."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The parent's environment without OTEL_*/CHATOBS_* (so the test decides), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "CHATOBS_"))}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


@dataclass
class Service:
    base_url: str
    process: subprocess.Popen[str]

    def scrape(self, accept: str | None = None, path: str = "/metrics") -> httpx.Response:
        headers = {"Accept": accept} if accept else {}
        return httpx.get(self.base_url + path, headers=headers, timeout=10)


def wait_for(url: str, process: subprocess.Popen[str], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            out, err = process.communicate()
            raise AssertionError(f"process exited with {process.returncode}:\n{out}\n{err}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError(f"{url} did not answer within {timeout}s")


@pytest.fixture
def start_service() -> Iterator[Callable[..., Service]]:
    """Start ``uvicorn APP`` (or a custom command) with an environment; stop it after the test."""
    processes: list[subprocess.Popen[str]] = []

    def start(
        env: Mapping[str, str],
        app: str = "tests.apps.env_app:app",
        command: list[str] | None = None,
        ready_path: str = "/metrics",
        port: int | None = None,
    ) -> Service:
        port = port or free_port()
        cmd = command or [
            sys.executable,
            "-m",
            "uvicorn",
            app,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ]
        process = subprocess.Popen(
            cmd, env=clean_env(env), cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        processes.append(process)
        base = f"http://127.0.0.1:{port}"
        wait_for(base + ready_path, process)
        return Service(base, process)

    yield start
    for process in processes:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="session")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: install the Debian package `prometheus` (.ci/run does)")
    return path


@pytest.fixture(scope="session")
def stack() -> Iterator[dict[str, str]]:
    """Redis, PostgreSQL and a Kafka-protocol broker for the whole session: the servers named by
    REDIS_URL / DATABASE_URL / KAFKA_BOOTSTRAP_SERVERS if set, else embedded ones started here."""
    from chatobs.stack import LocalStack

    with LocalStack.from_environment() as local:
        yield local.environment


@pytest.fixture
def own_stack() -> Iterator[Callable[..., object]]:
    """A private embedded stack a test may stop and restart (fault injection)."""
    from chatobs.stack import LocalStack

    stacks: list[LocalStack] = []

    def start() -> LocalStack:
        local = LocalStack({}).start()
        stacks.append(local)
        return local

    yield start
    for local in stacks:
        local.stop()
