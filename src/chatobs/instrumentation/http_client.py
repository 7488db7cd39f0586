"""Outbound HTTP (httpx): every request measured, traced when the span would be recorded.

:class:`HttpClientInstrumentor` puts a dispatcher (:mod:`chatobs.instrumentation.dispatch`)
over the transport methods the contrib httpx instrumentation wraps
(``AsyncHTTPTransport.handle_async_request``, ``HTTPTransport.handle_request``). Each request
is one ``http_client_request_duration_seconds{http_request_method, server_address,
http_response_status_code}`` observation: the method as the conventions bound it (a known
method, else ``_OTHER``), the URL's host, and the response's status (empty when the request
failed without one). Without a span, the dispatcher puts the current trace context in the
request's headers itself, as the contrib instrumentation does with its span's, so the upstream
service continues the trace. URLs in ``OTEL_PYTHON_HTTPX_EXCLUDED_URLS`` are neither measured
nor traced, and ``suppress_http_instrumentation`` is honoured, as by the contrib instrumentation.

Example::

    HTTPXClientInstrumentor().instrument(tracer_provider=telemetry.tracer_provider)  # the contrib spans
    HttpClientInstrumentor().instrument(clients=telemetry.clients, tracer_provider=telemetry.tracer_provider,
                                        traced=True)
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Any

from opentelemetry.util.http import ExcludeList, get_excluded_urls

from chatobs.instrumentation.dispatch import (
    ClientInstrumentor,
    ClientOperation,
    PatchSpec,
    Wiring,
    dispatcher,
    http_instrumentation_enabled,
)
from chatobs.instrumentation.methods import http_method
from chatobs.propagation import inject
from chatobs.recorders.clients import ClientRecorder

__all__ = ["HttpClientInstrumentor"]


class _Request(ClientOperation):
    """``transport.handle_(async_)request(request)``: httpx's ``Request`` is the one argument."""

    def __init__(self, clients: ClientRecorder, excluded: ExcludeList | None):
        self._clients = clients
        self._excluded = excluded

    # The check itself, not a method calling it: a frame less on every request.
    enabled = staticmethod(http_instrumentation_enabled)

    def describe(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, str] | None:
        request = args[1] if len(args) > 1 else kwargs["request"]
        url = request.url
        if self._excluded is not None and self._excluded.url_disabled(str(url)):
            return None
        return http_method(request.method), url.host or ""

    def propagate(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        request = args[1] if len(args) > 1 else kwargs["request"]
        if self._excluded is None or not self._excluded.url_disabled(str(request.url)):
            inject(request.headers)
        return args, kwargs

    def record(self, described: tuple[str, str], seconds: float, result: Any, failed: bool) -> None:
        status = getattr(result, "status_code", None)
        self._clients.http_request(described[0], described[1], "" if status is None else str(status), seconds)


class HttpClientInstrumentor(ClientInstrumentor):
    """httpx's requests, measured into a :class:`~chatobs.recorders.ClientRecorder` and traced
    when a span would be recorded (see :class:`~chatobs.instrumentation.dispatch.ClientInstrumentor`)."""

    def instrumentation_dependencies(self) -> Collection[str]:
        return ("httpx >= 0.18",)

    def _specs(self, wiring: Wiring) -> Iterable[PatchSpec]:
        import httpx

        request = _Request(wiring.clients, get_excluded_urls("HTTPX"))
        yield httpx.AsyncHTTPTransport, "handle_async_request", dispatcher(wiring.gate, request), True
        yield httpx.HTTPTransport, "handle_request", dispatcher(wiring.gate, request, sync=True), True
