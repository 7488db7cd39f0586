"""Fixtures that start real processes: the service under test runs under uvicorn,
configured by environment variables only, and is scraped over HTTP."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
from hypothesis import settings as hypothesis_settings

from chatobs.stack import PORT_ATTEMPTS, free_port, port_is_free

ROOT = Path(__file__).resolve().parent.parent

# Property tests are reproducible by default: the same examples every run, no example database
# written into the checkout. HYPOTHESIS_PROFILE=explore draws fresh random examples each run.
hypothesis_settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True)
hypothesis_settings.register_profile("explore", database=None, deadline=None, print_blob=True)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The `slow` tests first, in file order otherwise. On `make test`'s two workers the
    minute-long tests then start together and the short ones fill in around them; in file
    order, the last of them would run on by itself at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def clean_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The parent's environment without OTEL_*/CHATOBS_* (so the test decides), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "CHATOBS_"))}
    # This checkout's src/ first: a git worktree's services must not import the editable install's.
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    env.update(extra)
    return env


@dataclass
class Service:
    base_url: str
    process: subprocess.Popen[str]

    def scrape(self, accept: str | None = None, path: str = "/metrics") -> httpx.Response:
        headers = {"Accept": accept} if accept else {}
        return httpx.get(self.base_url + path, headers=headers, timeout=10)


T = TypeVar("T")
#: In a command or environment given to ``start_service``: the port drawn for the service.
PORT = "{port}"


class ProcessExitedError(AssertionError):
    """The process :func:`wait_for` waited for exited."""


def wait_for(url: str, process: subprocess.Popen[str], timeout: float = 20.0, *, ok: bool = False) -> None:
    """Until ``url`` answers (with ``ok``: answers 2xx, as Prometheus's ``/-/ready`` does only once
    its storage is open; before, it and the query API answer 503)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            out, err = process.communicate()
            raise ProcessExitedError(f"process exited with {process.returncode}:\n{out}\n{err}")
        try:
            response = httpx.get(url, timeout=1)
        except httpx.TransportError:
            response = None
        if response is not None and (response.is_success or not ok):
            return
        time.sleep(0.1)
    raise AssertionError(f"{url} did not answer{' 2xx' if ok else ''} within {timeout}s")


def on_a_drawn_port(start: Callable[[int], T]) -> T:
    """``start(port)`` on a drawn port, and on the next draw while another program takes the
    port drawn before the server binds it (in a run, other tests' servers draw ports too)."""
    for attempt in range(1, PORT_ATTEMPTS + 1):
        port = free_port()
        try:
            return start(port)
        except ProcessExitedError:
            if attempt == PORT_ATTEMPTS or port_is_free(port):
                raise
    raise AssertionError("unreachable")


@pytest.fixture
def start_service() -> Iterator[Callable[..., Service]]:
    """Start ``uvicorn APP`` (or a custom command) with an environment; stop it after the test.

    ``{port}`` in the command or in an environment value is the port drawn for the service,
    drawn again while another program takes it first. A ``port`` given is not drawn again."""
    processes: list[subprocess.Popen[str]] = []

    def start(
        env: Mapping[str, str],
        app: str = "tests.apps.env_app:app",
        command: list[str] | None = None,
        ready_path: str = "/metrics",
        port: int | None = None,
    ) -> Service:
        def on(port: int) -> Service:
            def filled(text: str) -> str:
                return text.replace(PORT, str(port))

            cmd = command or [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", PORT,
                              "--log-level", "warning"]  # fmt: skip
            process = subprocess.Popen(
                [filled(part) for part in cmd],
                env=clean_env({name: filled(value) for name, value in env.items()}),
                cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )  # fmt: skip
            processes.append(process)
            base = f"http://127.0.0.1:{port}"
            wait_for(base + ready_path, process)
            return Service(base, process)

        return on(port) if port else on_a_drawn_port(on)

    yield start
    for process in processes:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture
def start_gateway(stack, start_service, tmp_path) -> Callable[..., Service]:  # type: ignore[no-untyped-def]
    """``start_gateway(**settings)``: a gateway of the test's own (``python -m chatpipe.gateway``
    on a drawn port, attachments and data under ``tmp_path``), with ``settings`` beside the
    stack's; stopped after the test."""

    def start(**settings: str) -> Service:
        env = {**stack, "CHATPIPE_GATEWAY_HOST": "127.0.0.1", "CHATPIPE_GATEWAY_PORT": PORT,
               "CHATPIPE_ATTACHMENT_DIR": str(tmp_path / "attachments"), "CHATOBS_DATA_DIR": str(tmp_path),
               **settings}  # fmt: skip
        return start_service(env, command=[sys.executable, "-m", "chatpipe.gateway"], ready_path="/health")

    return start


@pytest.fixture
def blackhole() -> Iterator[str]:
    """An OTLP endpoint that accepts TCP connections and never answers a byte."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                held.append(server.accept()[0])

    accepting = threading.Thread(target=accept, daemon=True)
    accepting.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    with contextlib.suppress(OSError):
        server.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone does not
    server.close()
    accepting.join(timeout=5)
    for connection in held:
        connection.close()


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


@dataclass
class Prometheus:
    base_url: str

    def query(self, expression: str) -> list[dict]:
        response = httpx.get(f"{self.base_url}/api/v1/query", params={"query": expression}, timeout=10)
        response.raise_for_status()
        return response.json()["data"]["result"]

    def query_exemplars(self, expression: str, seconds: float = 600) -> list[dict]:
        now = time.time()
        params = {"query": expression, "start": str(now - seconds), "end": str(now + 60)}
        response = httpx.get(f"{self.base_url}/api/v1/query_exemplars", params=params, timeout=10)
        response.raise_for_status()
        return response.json()["data"]

    def wait_for(self, predicate: Callable[[], object], timeout: float = 30.0, what: str = "condition") -> object:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = predicate()
            if result:
                return result
            time.sleep(0.5)
        raise AssertionError(f"Prometheus: {what} not met within {timeout}s")


@pytest.fixture
def start_prometheus(tmp_path: Path) -> Iterator[Callable[..., Prometheus]]:
    """Start a real Prometheus (Debian package) with exemplar storage on a scrape config."""
    processes: list[subprocess.Popen[str]] = []
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus not found: install the Debian package `prometheus` (.ci/run does)")

    def start(config_yaml: str) -> Prometheus:
        config = tmp_path / "prometheus.yml"
        config.write_text(config_yaml)

        def on(port: int) -> Prometheus:
            log = open(tmp_path / "prometheus.log", "a")  # noqa: SIM115 - closed with the process
            process = subprocess.Popen(
                [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--enable-feature=exemplar-storage"],
                stdout=log, stderr=subprocess.STDOUT, text=True,
            )  # fmt: skip
            processes.append(process)
            wait_for(f"http://127.0.0.1:{port}/-/ready", process, ok=True)
            return Prometheus(f"http://127.0.0.1:{port}")

        return on_a_drawn_port(on)

    yield start
    for process in processes:
        process.terminate()
        process.wait(timeout=20)


#: Faults take effect fast in tests: short timeouts, a breaker that opens after two failures.
PIPELINE_ENV = {
    "CHATPIPE_SOMABRAIN_TIMEOUT_SECONDS": "0.3",
    "CHATPIPE_BREAKER_FAILURE_THRESHOLD": "2",
    "CHATPIPE_BREAKER_RESET_SECONDS": "1.5",
    "CHATPIPE_DEGRADED_REPLAY_SECONDS": "0.5",
    "CHATPIPE_BACKLOG_POLL_SECONDS": "0.3",
    "CHATPIPE_HEALTH_PROBE_SECONDS": "0.5",
    "CHATPIPE_TENANT_TOKEN_BUDGETS": "tiny=30",
    "CHATPIPE_ATTACHMENT_MAX_BYTES": "1000",
}


@contextlib.contextmanager
def database_of_its_own(server_url: str, name: str) -> Iterator[str]:
    """A new, empty database ``name`` on the PostgreSQL server of ``server_url``: its URL, dropped
    (connections and all) afterwards."""
    import asyncio
    from urllib.parse import urlsplit, urlunsplit

    import asyncpg

    async def run(statement: str) -> None:
        connection = await asyncpg.connect(server_url)
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    asyncio.run(run(f"create database {name}"))
    try:
        yield urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))
    finally:
        with contextlib.suppress(Exception):  # a service may still hold connections: FORCE ends them
            asyncio.run(run(f"drop database {name} with (force)"))


@contextlib.contextmanager
def pipeline_of_its_own(stack: dict[str, str], run_dir: Path, progress: Callable[[str], None] | None = None):
    """The whole pipeline (simulators + five services as processes) on ``stack``, with a
    database, topics and consumer groups of its own (``pipeline.backends`` names them)."""
    from chatpipe.launcher import Pipeline

    # Topics of its own: other tests publish to the session broker's default topics.
    suffix = uuid.uuid4().hex[:8]
    # Consumer groups of its own too: pipelines other tests start on this broker join the default
    # groups, and each join or leave would rebalance this pipeline's consumers mid-test.
    env = {**PIPELINE_ENV, "CHATOBS_WAL_TOPIC": f"chat.wal.{suffix}", "CHATPIPE_TOOL_TOPIC": f"chat.tools.{suffix}",
           "CHATPIPE_CONSUMER_GROUP_PREFIX": f"{suffix}."}  # fmt: skip
    # And a database of its own: a publisher sends every outbox row of its database, and sends a
    # row again when no replicator confirmed it. On the session's database this pipeline sent
    # rows other tests' pipelines left there to its own topic, where its worker answered them
    # and its replicator stored them: a test's turn then moved counts by 3, or the replicator's
    # exemplar named another turn's trace.
    with (
        database_of_its_own(stack["DATABASE_URL"], f"pipeline_{suffix}") as database,
        Pipeline({**stack, "DATABASE_URL": database}, run_dir, env=env, progress=progress) as running,
    ):
        yield running


@pytest.fixture(scope="session")
def pipeline(stack, tmp_path_factory):
    """The session's pipeline: :func:`pipeline_of_its_own` on the session's stack."""
    with pipeline_of_its_own(stack, tmp_path_factory.mktemp("pipeline")) as running:
        yield running
