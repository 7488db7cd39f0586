"""Backend metrics derived from the client instrumentations' spans.

The effect of the Collector's spanmetrics connector, inside the process and
without a collector: every Redis, PostgreSQL and Kafka client span that ends
becomes one ``{backend}_operation_seconds`` observation and, when its status
is ERROR, one ``{backend}_errors_total`` increment. So the error counters count
every failure of the real client, not only those application code remembers to
count. Publishes to the WAL topic also feed ``wal_publish_seconds`` and
``wal_publish_errors_total``.

Spans that a sampler drops are never seen by span processors, so
:class:`RecordClientSpans` wraps the configured sampler: a client, producer or
consumer span it would drop is recorded (for these metrics) but still not
sampled, so it is not exported and carries no exemplar.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import Link, SpanKind, StatusCode
from opentelemetry.util.types import Attributes

from chatobs.cells import CellStore
from chatobs.recorders import BacklogRecorder
from chatobs.tracing import parent_decisions

__all__ = ["KAFKA_SCOPE", "BackendSpanMetrics", "RecordClientSpans"]

_logger = logging.getLogger("chatobs")

_HTTPX_SCOPE = "opentelemetry.instrumentation.httpx"

#: Instrumentation scope of chatobs's own Kafka delivery spans.
KAFKA_SCOPE = "chatobs.instrumentation.kafka"

_BACKEND_BY_SCOPE = {
    "opentelemetry.instrumentation.redis": "redis",
    "opentelemetry.instrumentation.asyncpg": "postgres",
    "chatobs.instrumentation.asyncpg": "postgres",  # connection attempts
    KAFKA_SCOPE: "kafka",
}
_RECORDED_KINDS = (SpanKind.CLIENT, SpanKind.PRODUCER, SpanKind.CONSUMER)


def _operation(backend: str, name: str) -> str:
    """The operation label of a Redis or asyncpg client span, from its name."""
    if backend == "redis":
        # The span name is the command, or the commands of a pipeline joined by spaces.
        return "pipeline" if " " in name else name.lower()
    # asyncpg names spans by the statement's first word (`select`, `insert`, ...).
    return name.split(" ", 1)[0].lower()


def _duration(span: ReadableSpan) -> float | None:
    """An ended span's duration in seconds; None for a span without both times."""
    start, end = span.start_time, span.end_time
    if start is None or end is None:
        return None
    return (end - start) / 1e9


class BackendSpanMetrics(SpanProcessor):
    """Turns ended client spans into backend duration and error metrics, and the httpx
    client spans into ``http_client_request_duration_seconds``."""

    def __init__(self, backlog: BacklogRecorder, wal_topic: str, cells: CellStore):
        self._backlog = backlog
        self._wal_topic = wal_topic
        self._observe = cells.observe

    def on_end(self, span: ReadableSpan) -> None:
        scope = span.instrumentation_scope
        if scope is None:
            return
        scope_name = scope.name
        if scope_name == _HTTPX_SCOPE:
            self._http_client(span)
            return
        backend = _BACKEND_BY_SCOPE.get(scope_name)
        if backend is None:
            return
        try:
            seconds = _duration(span)
            if seconds is None:
                return
            # The ended span's own context is the exemplar: it is no longer the current span.
            span_context = span.get_span_context()
            failed = span.status.status_code is StatusCode.ERROR
            if backend == "kafka":
                attributes = span.attributes or {}
                operation = str(attributes.get("messaging.operation.name", "other"))
                self._backlog.backend_operation(backend, operation, seconds, failed=failed, span=span_context)
                if operation == "produce" and attributes.get("messaging.destination.name") == self._wal_topic:
                    self._backlog.wal_publish(seconds, failed=failed, span=span_context)
                return
            operation = _operation(backend, span.name)
            self._backlog.backend_operation(backend, operation, seconds, failed=failed, span=span_context)
        except Exception:
            _logger.debug("chatobs: span metrics failed for %s", span.name, exc_info=True)

    def _http_client(self, span: ReadableSpan) -> None:
        # The contrib httpx instrumentation's own duration histogram is a synchronous SDK
        # instrument (~9 us a call here); it gets a no-op meter provider and the duration
        # comes from its span instead, into a cell.
        try:
            seconds = _duration(span)
            if seconds is None:
                return
            attributes = span.attributes or {}
            values = (
                str(attributes.get("http.request.method", "_OTHER")),
                str(attributes.get("server.address", "")),
                str(attributes.get("http.response.status_code", "")),
            )
            self._observe("http_client_request_duration_seconds", seconds, values, span=span.get_span_context())
        except Exception:
            _logger.debug("chatobs: http client metrics failed for %s", span.name, exc_info=True)


class RecordClientSpans(Sampler):
    """Wraps a sampler so dropped client/producer/consumer spans are still recorded (not sampled).

    ``parent_decided=True`` says ``inner`` decides by the parent's flags and the span's kind
    alone (``ALWAYS_ON``, ``ALWAYS_OFF``, ``ParentBased`` over them): the lean tracer then
    reads the decision from a table instead of asking per span (see
    :class:`chatobs.tracing.ParentDecided`).

    Example::

        sampler = RecordClientSpans(ParentBased(ALWAYS_ON), parent_decided=True)
    """

    def __init__(self, inner: Sampler, *, parent_decided: bool = False):
        self._inner = inner
        self.parent_decision = parent_decisions(self) if parent_decided else None

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: trace.TraceState | None = None,
    ) -> SamplingResult:
        result = self._inner.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)
        if result.decision is Decision.DROP and kind in _RECORDED_KINDS:
            # The span's own attributes: a dropping sampler returns none, and the span metrics
            # read the operation and destination from them.
            return SamplingResult(Decision.RECORD_ONLY, attributes, result.trace_state)
        return result

    def get_description(self) -> str:
        return f"RecordClientSpans{{{self._inner.get_description()}}}"
