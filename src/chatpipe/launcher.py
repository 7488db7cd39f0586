"""Run the whole pipeline locally as real processes: simulators and every service.

Each service is its own process, bootstrapped only by environment variables and
``chatobs.setup`` (as in production); the launcher only chooses free loopback ports
and passes the addresses along. It is what ``chatobs demo`` and the end-to-end tests use.

Example::

    with LocalStack.from_environment() as stack, Pipeline(stack.environment, run_dir) as pipeline:
        print(pipeline.gateway_url, pipeline.metrics_urls)
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from chatobs.stack import PORT_ATTEMPTS, free_port, port_is_free

__all__ = ["SERVICE_COMMANDS", "Pipeline", "PipelineError"]

# Open SSE streams never end by themselves: bound how long uvicorn waits for them at shutdown.
_GRACEFUL_SECONDS = "3"
_UVICORN = ("--timeout-graceful-shutdown", _GRACEFUL_SECONDS)

#: How each process of the pipeline is started (``{port}`` is its HTTP or metrics port).
SERVICE_COMMANDS: dict[str, list[str]] = {
    "llm_sim": ["-m", "uvicorn", "chatpipe.sim.llm:app", "--host", "127.0.0.1", "--port", "{port}", *_UVICORN],
    "somabrain_sim": [
        "-m",
        "uvicorn",
        "chatpipe.sim.somabrain:app",
        "--host",
        "127.0.0.1",
        "--port",
        "{port}",
        *_UVICORN,
    ],
    "gateway": ["-m", "chatpipe.gateway"],  # CHATPIPE_GATEWAY_PORT: see _environment
    "publisher": ["-m", "chatpipe.outbox.publisher"],
    "replicator": ["-m", "chatpipe.outbox.replicator"],
    "worker": ["-m", "chatpipe.worker"],
    "tool_executor": ["-m", "chatpipe.tools"],
}
#: Services whose metrics are served on their own HTTP port (the others get CHATOBS_METRICS_PORT).
_HTTP_SERVICES = ("llm_sim", "somabrain_sim", "gateway")
_START_TIMEOUT = 60.0


class PipelineError(RuntimeError):
    """A process of the pipeline did not start; the message holds the end of its log."""


class _PortTakenError(PipelineError):
    """The process exited, and another program holds its port: on a port drawn for it, draw again."""


@dataclass
class _Process:
    name: str
    port: int
    log: Path
    process: subprocess.Popen[bytes]
    #: Stopped by :meth:`Pipeline.stop_process` (a fault injected), not dead.
    stopped_on_purpose: bool = False

    def tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"


@dataclass
class Pipeline:
    """Starts the pipeline against ``backends`` (REDIS_URL, DATABASE_URL, KAFKA_BOOTSTRAP_SERVERS).

    ``env`` adds or overrides variables for every service (budgets, topics, faults...).
    """

    backends: Mapping[str, str]
    run_dir: Path
    env: Mapping[str, str] = field(default_factory=dict)
    progress: Callable[[str], None] | None = None
    _processes: dict[str, _Process] = field(default_factory=dict)

    # -- addresses ---------------------------------------------------------------
    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self._processes[name].port}"

    @property
    def gateway_url(self) -> str:
        return self.url("gateway")

    @property
    def llm_url(self) -> str:
        return self.url("llm_sim")

    @property
    def somabrain_url(self) -> str:
        return self.url("somabrain_sim")

    @property
    def metrics_urls(self) -> dict[str, str]:
        """``{service: /metrics URL}`` for the five pipeline services."""
        return {name: f"{self.url(name)}/metrics" for name in self._processes if not name.endswith("_sim")}

    # -- lifecycle -----------------------------------------------------------------
    def _environment(self, name: str, port: int) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CHATOBS_", "CHATPIPE_", "OTEL_"))}
        if name.endswith("_sim"):
            return env
        env.update(self.backends)
        env.update({
            "CHATPIPE_LLM_BASE_URL": f"{self.llm_url}/v1",
            "CHATPIPE_SOMABRAIN_URL": self.somabrain_url,
            "CHATPIPE_ATTACHMENT_DIR": str(self.run_dir / "attachments"),
            "CHATOBS_DATA_DIR": str(self.run_dir),
            "CHATOBS_LLM_MODELS": "sim-large",
            "CHATOBS_LLM_PROVIDERS": "simulator",
            "CHATOBS_TOOLS": "calculator,clock,summarize",
            "OTEL_SERVICE_NAME": name,
        })  # fmt: skip
        if name == "gateway":
            env["CHATPIPE_GATEWAY_HOST"] = "127.0.0.1"
            env["CHATPIPE_GATEWAY_PORT"] = str(port)
            env["CHATPIPE_GATEWAY_GRACEFUL_SHUTDOWN_SECONDS"] = _GRACEFUL_SECONDS
        elif name not in _HTTP_SERVICES:
            env["CHATOBS_METRICS_PORT"] = str(port)
            env["CHATOBS_METRICS_HOST"] = "127.0.0.1"
        env.update(self.env)
        return env

    def _start(self, name: str, port: int | None = None) -> None:
        port = port or free_port()
        log = self.run_dir / f"{name}.log"
        command = [sys.executable, *(part.format(port=port) for part in SERVICE_COMMANDS[name])]
        with open(log, "ab") as out:
            # A session of its own, as the stack's servers: a Ctrl-C in the terminal is the caller's
            # to act on (it stops them in order), not a SIGINT to each service in mid-start.
            process = subprocess.Popen(command, env=self._environment(name, port), stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, cwd=self.run_dir, start_new_session=True)  # fmt: skip
        self._processes[name] = _Process(name, port, log, process)

    def _wait_ready(self, name: str) -> None:
        entry = self._processes[name]
        path = "/health" if name.endswith("_sim") else "/metrics"
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if entry.process.poll() is not None:
                error = PipelineError if port_is_free(entry.port) else _PortTakenError
                raise error(f"{name} exited with {entry.process.returncode}:\n{entry.tail()}")
            try:
                # Any answer but a server error: with OTEL_SDK_DISABLED, /metrics answers 404 on purpose.
                if httpx.get(f"http://127.0.0.1:{entry.port}{path}", timeout=1).status_code < 500:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise PipelineError(f"{name} not ready within {_START_TIMEOUT:.0f}s:\n{entry.tail()}")

    def _ready_on_a_drawn_port(self, name: str) -> None:
        """:meth:`_wait_ready`, starting the process again on another port while another program
        takes the one drawn for it (between the draw and the process's bind)."""
        for attempt in range(1, PORT_ATTEMPTS + 1):
            try:
                self._wait_ready(name)
                return
            except _PortTakenError:
                if attempt == PORT_ATTEMPTS:
                    raise
                taken = self._processes[name].port
                self._start(name)
                if self.progress:
                    self.progress(f"{name}: 127.0.0.1:{taken} was taken before it could bind it; "
                                  f"trying {self._processes[name].port}")  # fmt: skip

    def start(self) -> Pipeline:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            for group in (
                ("llm_sim", "somabrain_sim"),
                ("gateway", "publisher", "replicator", "worker", "tool_executor"),
            ):
                began = time.monotonic()
                for name in group:
                    self._start(name)
                for name in group:
                    self._ready_on_a_drawn_port(name)
                if self.progress:
                    self.progress(f"started {', '.join(group)} ({time.monotonic() - began:.1f}s)")
        except BaseException:
            self.stop()
            raise
        return self

    def stop_process(self, name: str, timeout: float = 15.0) -> int | None:
        """SIGTERM one process (fault injection, or a rolling restart) and wait for it; return its
        exit code (``None`` if it had to be killed after ``timeout``). Its port stays reserved
        for :meth:`start_process`."""
        entry = self._processes[name]
        entry.stopped_on_purpose = True
        if entry.process.poll() is None:
            entry.process.terminate()
            try:
                entry.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                entry.process.kill()
                entry.process.wait(timeout=timeout)
                return None
        return entry.process.returncode

    def start_process(self, name: str) -> None:
        """Start a process stopped by :meth:`stop_process` again, on the same port, and wait until it is ready."""
        entry = self._processes[name]
        if entry.process.poll() is None:
            return
        self._start(name, entry.port)
        self._wait_ready(name)

    def stop(self, timeout: float = 15.0) -> dict[str, int | None]:
        """Stop every process, services first and simulators last, each group in parallel;
        return their exit codes. Anything still running after ``timeout`` is killed."""
        codes: dict[str, int | None] = {}
        services = [entry for entry in self._processes.values() if not entry.name.endswith("_sim")]
        simulators = [entry for entry in self._processes.values() if entry.name.endswith("_sim")]
        for group in (services, simulators):
            for entry in group:
                if entry.process.poll() is None:
                    entry.process.terminate()
            deadline = time.monotonic() + timeout
            for entry in group:
                try:
                    entry.process.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    entry.process.kill()
                    entry.process.wait(timeout=timeout)
                codes[entry.name] = entry.process.returncode
        self._processes.clear()
        return codes

    def pids(self) -> dict[str, int]:
        return {name: entry.process.pid for name, entry in self._processes.items()}

    def dead(self) -> dict[str, str]:
        """The processes that ended without being asked to (:meth:`stop_process` asks): ``{name:
        its exit code and the end of its log}``.

        Example::

            if died := pipeline.dead():
                raise SystemExit(f"{', '.join(died)} died")
        """
        return {name: f"exited with {entry.process.returncode}; the end of {entry.log}:\n{entry.tail(15)}"
                for name, entry in self._processes.items()
                if not entry.stopped_on_purpose and entry.process.poll() is not None}  # fmt: skip

    def __enter__(self) -> Pipeline:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
