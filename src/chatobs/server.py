"""Serving a scrape: a route on the service's own app, or a standalone server.

Both call one ``scrape`` function ``(accept, accept_encoding) -> (status, headers, body)``.
Rendering runs in a worker thread, off the event loop, so a slow collection
never stalls request handling, and a blocked event loop never stalls a scrape
of the standalone server.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import anyio
import anyio.to_thread
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

__all__ = ["MetricsServer", "ScrapeFunction", "mount_metrics_route"]

_logger = logging.getLogger("chatobs")

ScrapeFunction = Callable[[str | None, str | None], tuple[int, Mapping[str, str], bytes]]

#: Marks routes chatobs added, so mounting twice replaces instead of stacking.
_ROUTE_MARK = "_chatobs_metrics_route"


def mount_metrics_route(app: Any, path: str, scrape: ScrapeFunction) -> None:
    """Serve ``scrape`` at ``path`` on a Starlette/FastAPI ``app``.

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
        status, headers, body = await anyio.to_thread.run_sync(
            scrape, request.headers.get("accept"), request.headers.get("accept-encoding"), limiter=limiter
        )
        return Response(body, status_code=status, headers=dict(headers))

    routes = app.router.routes
    shadowed = [route for route in routes if getattr(route, "path", None) == path]
    for route in shadowed:
        if not getattr(route, _ROUTE_MARK, False):
            _logger.info("chatobs: serving %s instead of the app's own route %r", path, getattr(route, "name", route))
        routes.remove(route)
    route = Route(path, metrics, methods=["GET"], include_in_schema=False, name="chatobs_metrics")
    setattr(route, _ROUTE_MARK, True)
    routes.insert(0, route)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    # A client that connects and sends nothing must not hold a thread for ever.
    timeout = 30

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def _answer(self, send_body: bool) -> None:
        if self.path.split("?", 1)[0] != self.server.metrics_path:
            self.send_error(404, f"metrics are at {self.server.metrics_path}")
            return
        try:
            status, headers, body = self.server.scrape(self.headers.get("Accept"), self.headers.get("Accept-Encoding"))
        except Exception:
            _logger.exception("chatobs: scrape failed")
            self.send_error(500, "scrape failed; see the service log")
            return
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


class _Server6(_Server):
    address_family = socket.AF_INET6


class MetricsServer:
    """A standalone metrics server on its own thread, for services without an HTTP app.

    Example::

        server = MetricsServer(telemetry.scrape, host="0.0.0.0", port=9464)
        print(server.url)      # http://0.0.0.0:9464/metrics
        server.stop()
    """

    def __init__(self, scrape: ScrapeFunction, *, host: str, port: int, path: str = "/metrics"):
        server_class = _Server6 if ":" in host else _Server
        self._server = server_class((host, port), _Handler)
        self._server.metrics_path = path
        self._server.scrape = scrape
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
        self._server.server_close()
        self._thread.join(timeout=5)
