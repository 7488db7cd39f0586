"""Inbound HTTP: one SERVER span and one duration observation per request, and little else.

The contrib FastAPI instrumentation opens three spans per request (the request, and an
internal span for each ASGI receive and send) and records five synchronous SDK
instruments; on this project's benchmark it cut a FastAPI service's throughput to about
0.44x. This middleware keeps what an operator uses:

* a SERVER span named ``METHOD /route/{template}``, continuing a ``traceparent`` from the
  request, with the stable HTTP semantic-convention attributes, ERROR on 5xx;
* ``http_server_request_duration_seconds{http_request_method, http_route,
  http_response_status_code}`` recorded in a cell (see :mod:`chatobs.cells`), with the
  request's span as the bucket's exemplar.

The route template comes from Starlette (``scope["route"]``), never the raw path; behind a
``Mount``, the mounts' path templates come first. Excluded paths are compared without the
app's ``root_path`` (``uvicorn --root-path`` puts it in the path).

Example::

    app.add_middleware(ServerMiddleware, tracer=telemetry.tracer, cells=telemetry.cells,
                       excluded_paths=frozenset({"/metrics", "/health"}))
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from time import perf_counter
from typing import Any

# Functions imported, not modules: an attribute lookup fewer for each use, on every request.
from opentelemetry import trace
from opentelemetry.context import attach, detach
from opentelemetry.propagate import extract, get_global_textmap
from opentelemetry.propagators.textmap import Getter
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from opentelemetry.semconv.attributes.http_attributes import (
    HTTP_REQUEST_METHOD,
    HTTP_RESPONSE_STATUS_CODE,
    HTTP_ROUTE,
)
from opentelemetry.semconv.attributes.url_attributes import URL_PATH, URL_SCHEME
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer, set_span_in_context
from starlette.routing import Match, Mount

from chatobs.cells import CellStore
from chatobs.instrumentation.errors import error_type as qualified_error_type
from chatobs.instrumentation.methods import http_method
from chatobs.propagation import header_values
from chatobs.tracing import record_exception

__all__ = ["ServerMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

METRIC = "http_server_request_duration_seconds"
_logger = logging.getLogger("chatobs")


class _HeaderGetter(Getter[list[tuple[bytes, bytes]]]):
    def get(self, carrier: list[tuple[bytes, bytes]], key: str) -> list[str] | None:
        wanted = key.encode("latin-1")
        return header_values(key, [value.decode("latin-1") for name, value in carrier if name == wanted])

    def keys(self, carrier: list[tuple[bytes, bytes]]) -> list[str]:
        return [name.decode("latin-1") for name, _ in carrier]


_GETTER = _HeaderGetter()


class _PropagatedHeaders:
    """The header names the global propagators read (``OTEL_PROPAGATORS``: W3C's, B3's,
    Jaeger's...), as ASGI gives them (lower-case bytes); read again when the propagators change.

    The middleware compares ``textmap`` with the global one itself, on every request, and calls
    :meth:`read` only when they differ: a method call per request shows in a quiet service's CPU.
    """

    __slots__ = ("names", "textmap")

    def __init__(self) -> None:
        self.textmap: object = None
        self.names: frozenset[bytes] = frozenset()

    def read(self, textmap: Any) -> frozenset[bytes]:
        self.names = frozenset(field.lower().encode("latin-1") for field in textmap.fields)
        self.textmap = textmap
        return self.names


_PROPAGATED = _PropagatedHeaders()
#: Scope key the outermost middleware sets: a request is measured by one middleware only.
_MEASURED = "chatobs.measured"


class ServerMiddleware:
    """One SERVER span and one duration observation per HTTP request (see the module doc).

    Instrumentation never fails a request: an exception of its own (a span processor that
    raises, a store closed at shutdown) goes to ``on_error`` (by default logged once) and
    the request is served as if uninstrumented; the app's own exceptions pass unchanged.
    """

    def __init__(self, app: Callable[..., Awaitable[None]], *, tracer: Tracer, cells: CellStore,
                 excluded_paths: frozenset[str],
                 on_error: Callable[[str, BaseException], None] | None = None):  # fmt: skip
        self.app = app
        self._tracer = tracer
        self._observe = cells.observe
        self._excluded = excluded_paths
        self._user_on_error = on_error

    def _on_error(self, metric: str, error: BaseException) -> None:
        if self._user_on_error is not None:
            try:
                self._user_on_error(metric, error)
                return
            except Exception as failure:  # noqa: BLE001 - a failing hook must not fail the request either
                error = failure
        _log_once(metric, error)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _MEASURED in scope:
            # Already measured by the app this one is mounted into (the zero-code path instruments
            # every FastAPI app built, sub-apps too): once is the request's count and its span.
            await self.app(scope, receive, send)
            return
        scope[_MEASURED] = True  # a mount hands its app this scope, updated, so a sub-app sees it
        path, root_path, app = scope["path"], scope.get("root_path"), scope.get("app")
        if root_path and path.startswith(root_path):
            path = path[len(root_path) :] or "/"
        if path in self._excluded:
            await self.app(scope, receive, send)
            return
        started = perf_counter()
        try:  # inline, not a method: a call more per request shows in a quiet service's CPU
            method = http_method(scope["method"])
            headers = scope.get("headers") or []
            # Extracting costs a few microseconds: only when the caller sent trace context.
            parent = None
            textmap = get_global_textmap()
            propagated = _PROPAGATED.names if textmap is _PROPAGATED.textmap else _PROPAGATED.read(textmap)
            for name, _ in headers:  # a loop, not any(...): no generator per request
                if name in propagated:
                    parent = extract(headers, getter=_GETTER)
                    break
            # The attributes known now are given at the start, where the conventions want them
            # (samplers may read them); the route and the status follow at the end.
            attributes = {HTTP_REQUEST_METHOD: method, URL_PATH: scope["path"], URL_SCHEME: scope.get("scheme", "http")}
            # Positional, in the API's order (name, context, kind, attributes): keywords cost a dict.
            span = self._tracer.start_span(method, parent, SpanKind.SERVER, attributes)
            # In the extracted context: its baggage is the handler's, and goes on with its calls.
            token = attach(set_span_in_context(span, parent))
        except Exception as error:  # noqa: BLE001 - serve the request uninstrumented
            self._on_error(METRIC, error)
            await self.app(scope, receive, send)
            return
        status = 500
        error_type = None

        # Not `async`: it hands back send's own awaitable, which the app awaits, so no coroutine
        # of its own wraps each of the response's messages.
        def send_and_watch(message: Message) -> Awaitable[None]:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            return send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        except BaseException as error:
            error_type = type(error)
            try:
                record_exception(span, error)
            except Exception as failure:  # noqa: BLE001 - the app's exception is the one to raise
                self._on_error(METRIC, failure)
            raise
        finally:
            seconds = perf_counter() - started
            # try/except, not a context manager: free when nothing fails, on every request.
            detach(token)  # OpenTelemetry's detach logs its own failures
            try:
                try:  # inline too, as the start is
                    route = getattr(scope.get("route"), "path", None) or ""
                    if scope.get("root_path") != root_path:  # a Mount handed the request to a sub-app
                        route = _mounted_route(scope, root_path, app) or route
                    if span.is_recording():
                        _describe_recorded(span, method, route, status, error_type)
                    # The request's span is the bucket's exemplar (if the exemplar filter keeps it):
                    # handed over as it is, rather than looked up again as the current span.
                    # Positional (name, value, labels, context, span): keywords cost a dict per request.
                    self._observe(METRIC, seconds, (method, route, str(status)), None, span.get_span_context())
                finally:
                    span.end()  # whatever failed above: a span left open would never be exported
            except Exception as failure:  # noqa: BLE001 - instrumentation never fails a request
                self._on_error(METRIC, failure)


def _describe_recorded(
    span: trace.Span, method: str, route: str, status: int, error_type: type[BaseException] | None
) -> None:
    """What a recorded span learns at the end: its name with the route, the route, the status."""
    span.update_name(f"{method} {route}" if route else method)
    span.set_attribute(HTTP_ROUTE, route)
    span.set_attribute(HTTP_RESPONSE_STATUS_CODE, status)
    if error_type is not None or status >= 500:
        span.set_status(Status(StatusCode.ERROR))
        span.set_attribute(ERROR_TYPE, qualified_error_type(error_type) if error_type else str(status))


def _mounted_route(scope: Scope, root_path: str | None, app: Any) -> str | None:
    """The route template of a request that went through ``Mount``s: each mount's path template,
    then the template of the route that answered within the last one (Starlette keeps only that
    last route in the scope). Found by matching again from the app's own routes; None if that
    finds nothing (an app that is no Starlette one)."""
    routes = getattr(getattr(app, "router", None), "routes", None)
    if routes is None:
        return None
    # Matched as the app saw the request: with its own root path, none of the mounts'.
    probe = {**scope, "root_path": root_path or ""}
    template = ""
    while routes:
        # As Starlette's router: the first full match, else the first partial one (a method not allowed).
        route, child = None, {}
        for candidate in routes:
            match, matched = candidate.matches(probe)
            if match is Match.FULL:
                route, child = candidate, matched
                break
            if match is Match.PARTIAL and route is None:
                route, child = candidate, matched
        if route is None:
            return template or None
        if not isinstance(route, Mount):
            return template + getattr(route, "path", "")
        template += route.path
        probe = {**probe, **child}
        routes = route.routes
    return template or None


_logged: set[str] = set()


def _log_once(metric: str, error: BaseException) -> None:
    if metric not in _logged:  # a failure here repeats on every request: say it once
        _logged.add(metric)
        _logger.warning("chatobs: instrumenting a request failed: %r (further failures not logged)", error)
