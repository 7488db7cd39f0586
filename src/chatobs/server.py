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

import asyncio
import base64
import binascii
import contextlib
import hmac
import logging
import os
import socket
import threading
import urllib.parse
from collections.abc import Callable, Mapping
from http import HTTPStatus
from pathlib import Path
from typing import Any, Literal

import anyio
import anyio.to_thread
import httptools
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from chatobs.settings import ChatobsSettings, read_secret_file

__all__ = ["MetricsAuth", "MetricsServer", "ScrapeFunction", "mount_metrics_route", "vacate_path"]

_logger = logging.getLogger("chatobs")

#: ``scrape(accept, accept_encoding, names)``: ``names`` are the request's ``name[]`` values
#: (only the families with one of these names are wanted), or None for every family.
ScrapeFunction = Callable[[str | None, str | None, frozenset[str] | None], tuple[int, Mapping[str, str], bytes]]
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
    """Remove every route of ``app`` at ``path`` that answers GET (logging those chatobs did not
    add): a scrape path's old handler, a prometheus_client mount. A route for other methods only
    (``POST /v1/sessions`` under a mistaken ``CHATOBS_METRICS_PATH``) is the app's API, and stays."""
    routes = app.router.routes
    for route in [route for route in routes if getattr(route, "path", None) == path and _answers_get(route)]:
        if not getattr(route, _ROUTE_MARK, False):
            _logger.info(
                "chatobs: %s: removed the app's own route %r at %s", reason, getattr(route, "name", route), path
            )
        routes.remove(route)


def _answers_get(route: Any) -> bool:
    methods = getattr(route, "methods", None)  # None: every method (a Mount, a plain ASGI route)
    return methods is None or "GET" in methods


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
                scrape, _combined(request, "accept"), _combined(request, "accept-encoding"),
                frozenset(request.query_params.getlist("name[]")) or None, limiter=limiter,
            )  # fmt: skip
        return Response(body, status_code=status, headers=dict(headers))

    vacate_path(app, path, "CHATOBS_METRICS_PATH is served by chatobs")
    route = Route(path, metrics, methods=["GET"], include_in_schema=False, name="chatobs_metrics")
    setattr(route, _ROUTE_MARK, True)
    app.router.routes.insert(0, route)


def _names(query: bytes) -> frozenset[str] | None:
    """The ``name[]`` values of a query string (``?name[]=up&name[]=x_total``), as
    prometheus_client's ``/metrics`` takes them."""
    if not query:
        return None
    return frozenset(urllib.parse.parse_qs(query.decode("latin-1")).get("name[]", ())) or None


def _combined(request: Request, name: str) -> str | None:
    # Repeated lines of a list header are one list (RFC 9110 5.3), as prometheus_client joins them.
    return ", ".join(request.headers.getlist(name)) or None


#: A request (line and headers) larger than this is refused: a scrape's is a few hundred bytes.
_MAX_REQUEST_BYTES = 64 * 1024
#: Connections open at once past which new ones are closed: scrapers are few.
_MAX_CONNECTIONS = 64
#: A connection without a request for this long is closed (it holds no thread, but a socket).
_IDLE_SECONDS = 30.0
#: After a last answer, how long the client has to close its side before the server does.
_CLOSE_SECONDS = 5.0


def _status_line(status: int) -> bytes:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = ""
    return f"HTTP/1.1 {status} {reason}\r\n".encode("latin-1")


class _Connection(asyncio.Protocol):
    """One scraper's connection: HTTP/1.1 requests parsed by httptools (llhttp, uvicorn's
    parser), answered in order, kept alive as the client asks."""

    def __init__(self, server: MetricsServer):
        self._server = server
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._headers: dict[bytes, bytes] = {}
        self._received = 0
        self._idle: asyncio.TimerHandle | None = None
        self._closing = False
        self._loop = asyncio.get_running_loop()
        self._active = self._loop.time()

    # -- asyncio ---------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        if len(self._server._connections) >= _MAX_CONNECTIONS:
            transport.close()
            return
        self._server._connections.add(self)
        self._rearm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._server._connections.discard(self)
        if self._idle is not None:
            self._idle.cancel()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return  # read and dropped: closing with unread data would reset the answer away
        self._received += len(data)
        if self._received > _MAX_REQUEST_BYTES:
            self._refuse(431, "request too large")
            return
        self._active = self._loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(400, "no protocol upgrades here")
        except httptools.HttpParserError:
            self._refuse(400, "malformed request")

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _rearm(self, seconds: float | None = None) -> None:
        if self._idle is not None:
            self._idle.cancel()
        self._idle = self._loop.call_later(_IDLE_SECONDS if seconds is None else seconds, self._close_if_idle)

    def _close_if_idle(self) -> None:
        # One timer per idle period, not one per request: activity only moves `_active`.
        quiet = self._loop.time() - self._active
        if self._closing or quiet >= _IDLE_SECONDS:
            self.close()
        else:
            self._idle = self._loop.call_later(_IDLE_SECONDS - quiet, self._close_if_idle)

    def _finish(self) -> None:
        # The answer, then end of stream; the client closes its side on reading it (or the
        # connection is closed a little later). Closing at once, with some of the client's
        # bytes unread, would make the kernel reset the connection, and the answer be lost.
        self._closing = True
        transport = self._transport
        if transport is not None and transport.can_write_eof():
            transport.write_eof()
            self._rearm(_CLOSE_SECONDS)
        else:
            self.close()

    # -- httptools callbacks ---------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url, self._headers = b"", {}

    def on_url(self, url: bytes) -> None:
        self._url += url  # may come in pieces

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        # Repeated lines of a list header (Accept, Accept-Encoding) are one list (RFC 9110 5.3);
        # a repeated Authorization becomes no valid credential, and is refused.
        self._headers[name] = self._headers[name] + b", " + value if name in self._headers else value

    def on_message_complete(self) -> None:
        self._received = 0
        keep_alive = self._parser.should_keep_alive()
        method = self._parser.get_method()
        send_body = method != b"HEAD"
        try:
            status, headers, body = self._answer(method)
        except Exception:
            _logger.exception("chatobs: scrape failed")
            status, headers, body = 500, _TEXT, b"500 scrape failed; see the service log\n"
        self._send(status, headers, body, send_body=send_body, keep_alive=keep_alive)

    # -- answers ---------------------------------------------------------------------------
    def _answer(self, method: bytes) -> Answer:
        server = self._server
        if method not in (b"GET", b"HEAD"):
            return 405, {**_TEXT, "Allow": "GET, HEAD"}, b"405 only GET and HEAD here\n"
        path, _, query = self._url.partition(b"?")
        if path != server._path:
            return 404, _TEXT, f"404 metrics are at {server.path}\n".encode()
        headers = self._headers
        if server._auth is not None and (refused := server._auth.refusal(_text(headers.get(b"authorization")))):
            return refused  # before any collection
        return server._scrape(_text(headers.get(b"accept")), _text(headers.get(b"accept-encoding")), _names(query))

    def _send(self, status: int, headers: Mapping[str, str], body: bytes, *, send_body: bool,
              keep_alive: bool) -> None:  # fmt: skip
        transport = self._transport
        if transport is None or transport.is_closing() or self._closing:
            return  # a request pipelined after the last one answered
        lines = [_status_line(status)]
        lines.extend(f"{name}: {value}\r\n".encode("latin-1") for name, value in headers.items())
        lines.append(f"Content-Length: {len(body)}\r\n".encode())
        if not keep_alive:
            lines.append(b"Connection: close\r\n")
        lines.append(b"\r\n")
        if send_body:
            lines.append(body)
        transport.write(b"".join(lines))
        if not keep_alive:
            self._finish()

    def _refuse(self, status: int, why: str) -> None:
        self._send(status, _TEXT, f"{status} {why}\n".encode(), send_body=True, keep_alive=False)


_TEXT = {"Content-Type": "text/plain; charset=utf-8"}


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


class MetricsServer:
    """A standalone metrics server on its own thread, for services without an HTTP app.

    One thread runs an event loop of its own (not the service's: a blocked service loop never
    stalls a scrape), which waits without waking while nobody scrapes; connections are kept
    alive, as Prometheus keeps its own, so a scrape costs neither a connection nor a thread.
    Requests are parsed by httptools, uvicorn's parser: the standard library's ``http.server``
    parses headers with the ``email`` package, about 100 µs a request with cold caches
    against 30 µs, and its ``serve_forever`` wakes twice a second to look for a shutdown.

    Example::

        server = MetricsServer(telemetry.scrape, host="0.0.0.0", port=9464)
        print(server.url)      # http://0.0.0.0:9464/metrics
        server.stop()
    """

    def __init__(self, scrape: ScrapeFunction, *, host: str, port: int, path: str = "/metrics",
                 auth: MetricsAuth | None = None):  # fmt: skip
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.create_server((host, port), family=family)  # OSError: the caller names the setting
        self._scrape = scrape
        self._auth = auth
        self._path = path.encode("latin-1")
        self._connections: set[_Connection] = set()
        self._loop = asyncio.new_event_loop()
        self._stopped = False
        started = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            asyncio.set_event_loop(self._loop)
            try:
                server = self._loop.run_until_complete(
                    self._loop.create_server(lambda: _Connection(self), sock=self._socket)
                )
            except BaseException as error:  # noqa: BLE001 - handed to the constructor's caller
                failure.append(error)
                started.set()
                return
            started.set()
            try:
                self._loop.run_forever()
            finally:
                server.close()
                for connection in list(self._connections):
                    connection.close()
                self._loop.run_until_complete(asyncio.sleep(0))  # let the transports close
                self._loop.close()

        self._thread = threading.Thread(target=serve, name="chatobs-metrics", daemon=True)
        self._thread.start()
        started.wait()
        if failure:
            self._socket.close()
            raise failure[0]
        self.host, self.port = self._socket.getsockname()[:2]
        self.path = path

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{self.path}"

    def stop(self, timeout: float = 5.0) -> None:
        """Close the listening socket and every connection (kept-alive ones too). Idempotent.

        Waits at most ``timeout`` seconds: a scrape in progress holds the server's loop, and
        the (daemon) thread then closes them once it is done."""
        if self._stopped:
            return
        self._stopped = True
        with contextlib.suppress(RuntimeError):  # the loop already closed
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=max(0.0, timeout))
