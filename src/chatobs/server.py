"""Serving a scrape: a route on the service's own app, or a standalone server.

Both call one ``scrape`` function ``(accept, accept_encoding) -> (status, headers, body)``.
Rendering runs in a worker thread, off the event loop, so a slow collection
never stalls request handling, and a blocked event loop never stalls a scrape
of the standalone server.

Both can require credentials (:class:`MetricsAuth`, from ``CHATOBS_METRICS_BEARER_TOKEN*``
or ``CHATOBS_METRICS_BASIC_AUTH_*``): a scrape without them is answered 401 before
anything is collected.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal

import anyio
import anyio.to_thread
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from chatobs.settings import ChatobsSettings, read_secret_file

__all__ = ["MetricsAuth", "MetricsServer", "ScrapeFunction", "mount_metrics_route", "vacate_path"]

_logger = logging.getLogger("chatobs")

ScrapeFunction = Callable[[str | None, str | None], tuple[int, Mapping[str, str], bytes]]
Answer = tuple[int, Mapping[str, str], bytes]


class _FileSecret:
    """A secret kept in a file, re-read when the file changes, so a rotated secret (a Kubernetes
    Secret volume swaps its files) takes effect without a restart, as it does on Prometheus's side."""

    def __init__(self, path: Path, render: Callable[[str], bytes]):
        self._path = path
        self._render = render
        self._stamp: tuple[int, int, int] | None = None
        self._value = b""
        self._warned = False
        self._lock = threading.Lock()
        self.current()  # settings validation has read it once already; a failure here is a race

    def current(self) -> bytes:
        try:
            status = os.stat(self._path)
        except OSError as error:
            return self._keep(error)
        stamp = (status.st_mtime_ns, status.st_size, status.st_ino)
        if stamp != self._stamp:
            with self._lock:
                try:
                    self._value = self._render(read_secret_file(self._path))
                except ValueError as error:
                    return self._keep(error)
                self._stamp, self._warned = stamp, False
        return self._value

    def _keep(self, error: Exception) -> bytes:
        # Mid-rotation the file can be briefly missing or empty: keep the last good secret
        # rather than lock every scraper out (an empty one matches nothing). Said once, not per scrape.
        if not self._warned:
            self._warned = True
            _logger.warning("chatobs: cannot read %s (%s); keeping the previous secret", self._path, error)
        return self._value


class MetricsAuth:
    """The credentials a scrape must present: a bearer token or HTTP basic auth.

    :meth:`refusal` answers ``None`` for a request carrying them, and a 401 with a
    ``WWW-Authenticate`` challenge otherwise. Secrets are compared in constant time
    (:func:`hmac.compare_digest`) and never logged.

    Example::

        auth = MetricsAuth.from_settings(settings.chatobs)      # None when nothing is configured
        if auth and (answer := auth.refusal(request.headers.get("authorization"))):
            return answer                                      # 401, nothing collected
    """

    def __init__(self, scheme: Literal["Bearer", "Basic"], secret: Callable[[], bytes],
                 on_refused: Callable[[], None] | None = None):  # fmt: skip
        self.scheme = scheme
        self._secret = secret  # the token, or b"user:password"
        self._on_refused = on_refused
        challenge = 'Bearer realm="metrics"' if scheme == "Bearer" else 'Basic realm="metrics", charset="UTF-8"'
        self._refused: Answer = (
            401,
            {"WWW-Authenticate": challenge, "Content-Type": "text/plain; charset=utf-8", "Cache-Control": "no-store"},
            b"401 Unauthorized: this metrics endpoint needs credentials\n",
        )

    @classmethod
    def from_settings(
        cls, settings: ChatobsSettings, on_refused: Callable[[], None] | None = None
    ) -> MetricsAuth | None:
        """The protection ``settings`` ask for (``CHATOBS_METRICS_BEARER_TOKEN*``,
        ``CHATOBS_METRICS_BASIC_AUTH_*``), or ``None`` when scrapes need no credentials."""
        if settings.metrics_bearer_token is not None:
            token = settings.metrics_bearer_token.get_secret_value().encode()
            return cls("Bearer", lambda: token, on_refused)
        if settings.metrics_bearer_token_file is not None:
            return cls("Bearer", _FileSecret(settings.metrics_bearer_token_file, str.encode).current, on_refused)
        if settings.metrics_basic_auth_user is None or (
            settings.metrics_basic_auth_password is None and settings.metrics_basic_auth_password_file is None
        ):
            return None  # settings validation refuses a user without a password
        prefix = f"{settings.metrics_basic_auth_user}:".encode()
        if settings.metrics_basic_auth_password is not None:
            credentials = prefix + settings.metrics_basic_auth_password.get_secret_value().encode()
            return cls("Basic", lambda: credentials, on_refused)
        password_file = _FileSecret(settings.metrics_basic_auth_password_file, lambda text: prefix + text.encode())
        return cls("Basic", password_file.current, on_refused)

    def credentials(self) -> str:
        """The ``Authorization`` header value this check accepts (for clients such as ``chatobs check``)."""
        secret = self._secret()
        if self.scheme == "Bearer":
            return f"Bearer {secret.decode()}"
        return f"Basic {base64.b64encode(secret).decode()}"

    def allows(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` header value carries the expected credentials."""
        scheme, _, presented = (authorization or "").strip().partition(" ")
        if scheme.lower() != self.scheme.lower():
            return False
        presented = presented.strip()
        if self.scheme == "Bearer":
            # Header values arrive decoded as latin-1: back to the bytes the client sent.
            offered = presented.encode("latin-1", "replace")
        else:
            try:
                offered = base64.b64decode(presented, validate=True)
            except (binascii.Error, ValueError):
                return False
        expected = self._secret()
        # Constant time: how much of a guess matched must not show in the response time.
        return bool(expected) and hmac.compare_digest(offered, expected)

    def refusal(self, authorization: str | None) -> Answer | None:
        """``None`` if the request may scrape; else the 401 answer to send (and the refusal is counted)."""
        if self.allows(authorization):
            return None
        if self._on_refused is not None:
            with contextlib.suppress(Exception):  # counting must never break the answer
                self._on_refused()
        return self._refused


#: Marks routes chatobs added, so mounting twice replaces instead of stacking.
_ROUTE_MARK = "_chatobs_metrics_route"


def vacate_path(app: Any, path: str, reason: str) -> None:
    """Remove every route of ``app`` at ``path`` (logging those chatobs did not add)."""
    routes = app.router.routes
    for route in [route for route in routes if getattr(route, "path", None) == path]:
        if not getattr(route, _ROUTE_MARK, False):
            _logger.info(
                "chatobs: %s: removed the app's own route %r at %s", reason, getattr(route, "name", route), path
            )
        routes.remove(route)


def mount_metrics_route(app: Any, path: str, scrape: ScrapeFunction, auth: MetricsAuth | None = None) -> None:
    """Serve ``scrape`` at ``path`` on a Starlette/FastAPI ``app`` (GET and HEAD), behind ``auth`` if given.

    The route goes first, so it answers even where the app already had a
    ``/metrics`` route (say, a prometheus_client one): the service keeps its
    existing path and gains no new endpoint. Calling it again is harmless.

    Example::

        app = FastAPI()
        mount_metrics_route(app, "/metrics", telemetry.scrape)
    """

    # Scrapes get threads of their own (two), so they never queue behind the app's sync
    # endpoints in Starlette's shared pool, and a stuck collection cannot exhaust that pool.
    limiter = anyio.CapacityLimiter(2)

    async def metrics(request: Request) -> Response:
        if auth is not None and (refused := auth.refusal(request.headers.get("authorization"))):
            status, headers, body = refused  # before any collection: a refused scrape costs nothing
        else:
            status, headers, body = await anyio.to_thread.run_sync(
                scrape, request.headers.get("accept"), request.headers.get("accept-encoding"), limiter=limiter
            )
        return Response(body, status_code=status, headers=dict(headers))

    vacate_path(app, path, "CHATOBS_METRICS_PATH is served by chatobs")
    route = Route(path, metrics, methods=["GET"], include_in_schema=False, name="chatobs_metrics")
    setattr(route, _ROUTE_MARK, True)
    app.router.routes.insert(0, route)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    # Keep-alive, as Prometheus and httpx use it: a connection (and its thread) serves every
    # scrape of its scraper, instead of a new connection and a new thread for each one.
    protocol_version = "HTTP/1.1"
    # A client that connects and sends nothing, or keeps an idle connection, must not hold a
    # thread for ever: the connection is closed after this long without a request.
    timeout = 30

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def _answer(self, send_body: bool) -> None:
        if self.path.split("?", 1)[0] != self.server.metrics_path:
            self.send_error(404, f"metrics are at {self.server.metrics_path}")
            return
        auth = self.server.auth
        if auth is not None and (refused := auth.refusal(self.headers.get("Authorization"))):
            self._send(*refused, send_body=send_body)  # before any collection
            return
        try:
            status, headers, body = self.server.scrape(self.headers.get("Accept"), self.headers.get("Accept-Encoding"))
        except Exception:
            _logger.exception("chatobs: scrape failed")
            self.send_error(500, "scrape failed; see the service log")
            return
        self._send(status, headers, body, send_body=send_body)

    def _send(self, status: int, headers: Mapping[str, str], body: bytes, *, send_body: bool) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base class
        _logger.debug("metrics server: " + format, *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    metrics_path: str
    scrape: ScrapeFunction
    auth: MetricsAuth | None

    def server_activate(self) -> None:
        # The open connections, so stopping the server ends the kept-alive ones too (their
        # threads would otherwise answer scrapes until the idle timeout).
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().server_activate()

    def get_request(self) -> tuple[socket.socket, Any]:
        connection, address = super().get_request()
        with self._connections_lock:
            self._connections.add(connection)
        return connection, address

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class _Server6(_Server):
    address_family = socket.AF_INET6


class MetricsServer:
    """A standalone metrics server on its own thread, for services without an HTTP app.

    Example::

        server = MetricsServer(telemetry.scrape, host="0.0.0.0", port=9464)
        print(server.url)      # http://0.0.0.0:9464/metrics
        server.stop()
    """

    def __init__(self, scrape: ScrapeFunction, *, host: str, port: int, path: str = "/metrics",
                 auth: MetricsAuth | None = None):  # fmt: skip
        server_class = _Server6 if ":" in host else _Server
        self._server = server_class((host, port), _Handler)
        self._server.metrics_path = path
        self._server.scrape = scrape
        self._server.auth = auth
        self._thread = threading.Thread(target=self._server.serve_forever, name="chatobs-metrics", daemon=True)
        self._thread.start()
        self.host, self.port = self._server.server_address[:2]
        self.path = path

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{self.path}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.close_connections()
        self._server.server_close()
        self._thread.join(timeout=5)
