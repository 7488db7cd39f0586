"""Kafka (aiokafka): deliveries and commits measured, traced when the span would be recorded,
and trace context carried in record headers.

:class:`KafkaClientInstrumentor` puts dispatchers (:mod:`chatobs.instrumentation.dispatch`)
over ``AIOKafkaProducer.send``, ``AIOKafkaConsumer.commit``, ``getone`` and ``getmany``, and
both clients' ``start``:

* a ``send()`` is measured to the broker's acknowledgement, or the delivery's failure: the
  contrib instrumentation's span ends when the record is queued, so a broker that never
  acknowledges (stopped, unreachable) would fail outside any measurement. Each delivery is one
  ``kafka_operation_seconds{operation="produce"}`` observation (and one
  ``kafka_errors_total`` when it failed), and on ``CHATOBS_WAL_TOPIC`` one
  ``wal_publish_seconds`` (``wal_publish_errors_total``); a ``commit()`` is one ``commit``;
  a ``start()`` (the bootstrap: a connection to the brokers and the cluster's metadata) is one
  ``connect``, so a service waiting for an unreachable broker shows it in
  ``kafka_errors_total{operation="connect"}``;
* when a span would be recorded, a delivery gets a PRODUCER span of its own from ``send()`` to
  the acknowledgement, around the contrib instrumentation's ``send`` span (which puts its
  context in the record's headers), and a commit and a start a CLIENT span;
* a poll (``getone``/``getmany``) that fails counts in ``kafka_errors_total{operation="consume"}``
  (its duration is waiting for records, not work). It never goes through the contrib
  instrumentation: that decodes a fetched record's trace headers as strict UTF-8 after the
  fetch, so one record with a header of other bytes made the poll raise, and the records it
  had fetched were lost to the application (its position already past them). A record gets
  its CONSUMER span from :func:`consumer_span` instead, when it is handled;
* otherwise a ``send()`` puts the current trace context in the record's headers itself,
  so the consumer still continues the trace.

A record always carries the current trace context, and only that: the trace headers of
headers passed on (a consumed record's, say) are replaced, and the caller's list is never
changed (it may be reused for the next record).

:func:`consumer_span` continues the producer's trace while a consumer handles a record, so
one chat turn is one trace across services.

Example::

    record = await consumer.getone()
    with consumer_span(tracer, record):
        with telemetry.backlog.time_wal_consume():
            await handle(record)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection, Iterable
from contextlib import AbstractContextManager
from typing import Any

from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.propagators.textmap import Getter, Setter
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from chatobs.instrumentation.dispatch import (
    BackendOperation,
    ClientInstrumentor,
    ClientOperation,
    FailuresOnly,
    PatchSpec,
    Wiring,
    dispatcher,
    dispatching,
    spanned,
)
from chatobs.instrumentation.errors import error_type
from chatobs.propagation import extract_pairs, fields, header_values, inject
from chatobs.recorders.clients import BoundOperation, ClientRecorder
from chatobs.tracing import error_status, record_exception

__all__ = ["KAFKA_SCOPE", "KafkaClientInstrumentor", "consumer_span"]

#: Instrumentation scope of chatobs's Kafka delivery and commit spans.
KAFKA_SCOPE = "chatobs.instrumentation.kafka"
# The messaging conventions are still incubating: their constants exist only in the
# semantic-conventions package's private `_incubating` module, so the names are spelt here.
MESSAGING_SYSTEM = "messaging.system"
MESSAGING_OPERATION_NAME = "messaging.operation.name"
MESSAGING_DESTINATION_NAME = "messaging.destination.name"
MESSAGING_DESTINATION_PARTITION_ID = "messaging.destination.partition.id"
MESSAGING_KAFKA_MESSAGE_OFFSET = "messaging.kafka.message.offset"
_SEND_HEADERS_POSITION = 6  # send(self, topic, value, key, partition, timestamp_ms, headers)


class _HeaderGetter(Getter[Any]):
    """Reads aiokafka record headers: a sequence of ``(str, bytes)``."""

    def get(self, carrier: Any, key: str) -> list[str] | None:
        return header_values(key, [value.decode("latin-1") for name, value in carrier or ()
                                   if name == key and value is not None])  # fmt: skip

    def keys(self, carrier: Any) -> list[str]:
        return [name for name, _ in carrier or ()]


class _HeaderSetter(Setter[list[tuple[str, bytes]]]):
    """Sets a header in aiokafka record headers, replacing any of that name (a list allows two)."""

    def set(self, carrier: list[tuple[str, bytes]], key: str, value: str) -> None:
        for index in range(len(carrier) - 1, -1, -1):
            if carrier[index][0] == key:
                del carrier[index]
        carrier.append((key, value.encode("latin-1")))


_GETTER = _HeaderGetter()
_SETTER = _HeaderSetter()


def consumer_span(tracer: Tracer, record: Any, name: str | None = None) -> AbstractContextManager[Span]:
    """A CONSUMER span for handling ``record``, child of the producer's span (from its headers),
    current while the ``with`` block runs; an exception leaving the block is recorded on it.
    With no span processor (no trace exporter), the producer's context itself is current
    instead (:mod:`chatobs.tracing`): the trace goes on, naming the producer's span.

    The context current in the block is the record's (as the contrib consumers make it): the
    span in what the headers carried, baggage included, so the handler sends it on.

    A record it cannot read (no headers, malformed headers, odd attribute types) still gets a
    span, a root one, with what could be read: instrumentation never fails the handler.
    """
    return _ConsumerSpan(tracer, record, name)


class _ConsumerSpan:
    """:func:`consumer_span`'s context manager: a class, not a generator (one per record consumed)."""

    __slots__ = ("_name", "_record", "_span", "_token", "_tracer")

    def __init__(self, tracer: Tracer, record: Any, name: str | None):
        self._tracer = tracer
        self._record = record
        self._name = name

    def __enter__(self) -> Span:
        record = self._record
        try:
            parent = extract_pairs(record.headers, _GETTER)
        except Exception:  # noqa: BLE001 - a malformed record: no parent, but still a span
            parent = None
        topic = getattr(record, "topic", None)
        name = self._name
        if not (isinstance(name, str) and name):
            name = f"{topic if isinstance(topic, str) else 'kafka'} process"
        # Positional, in the API's order (name, context, kind): keywords cost a dict per record.
        span = self._span = self._tracer.start_span(name, parent, SpanKind.CONSUMER)
        if span.is_recording():  # nothing to build for a span no processor receives
            span.set_attributes(_record_attributes(record, topic))
        # The record's context, as the contrib consumers attach: what the producer put in its
        # headers besides the trace (baggage) goes on with what the handler sends and logs.
        self._token = context_api.attach(trace.set_span_in_context(span, parent))
        return span

    def __exit__(self, exc_type: Any, error: BaseException | None, tb: Any) -> None:
        span = self._span
        context_api.detach(self._token)
        if isinstance(error, Exception) and span.is_recording():  # as start_as_current_span does
            record_exception(span, error)
            span.set_status(error_status(error))
            span.set_attribute(ERROR_TYPE, error_type(type(error)))
        span.end()


def _record_attributes(record: Any, topic: Any) -> dict[str, str | int]:
    attributes: dict[str, str | int] = {MESSAGING_SYSTEM: "kafka", MESSAGING_OPERATION_NAME: "process"}
    if isinstance(topic, str):
        attributes[MESSAGING_DESTINATION_NAME] = topic
    partition = getattr(record, "partition", None)
    if partition.__class__ is int:
        attributes[MESSAGING_DESTINATION_PARTITION_ID] = str(partition)
    offset = getattr(record, "offset", None)
    if offset.__class__ is int:
        attributes[MESSAGING_KAFKA_MESSAGE_OFFSET] = offset
    return attributes


def _send_topic(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return args[1] if len(args) > 1 else kwargs.get("topic")


class _Produce(ClientOperation):
    """A ``send()``: measured from the call to the delivery's outcome."""

    def __init__(self, clients: ClientRecorder):
        self._clients = clients
        # Bound on the first record of each kind (a service that never sends shows no series).
        self._bound: dict[bool, tuple[BoundOperation, ...]] = {}

    def describe(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, float]:
        return _send_topic(args, kwargs), time.perf_counter()

    def propagate(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return _with_trace_headers(args, kwargs)

    def record(self, described: tuple[Any, float], seconds: float, result: Any, failed: bool) -> None:
        topic, started = described
        wal = topic.__class__ is str and topic == self._clients.wal_topic
        series = self._bound.get(wal) or self._bound.setdefault(wal, self._clients.bound_produced(wal=wal))
        if failed or not isinstance(result, asyncio.Future):
            for each in series:
                each.record(seconds, failed)
            return

        def delivered(future: asyncio.Future[Any]) -> None:
            # A callback of the event loop's: BoundOperation.record never raises into it.
            failed = future.cancelled() or future.exception() is not None
            took = time.perf_counter() - started
            for each in series:
                each.record(took, failed)

        result.add_done_callback(delivered)


class _Commit(BackendOperation):
    backend = "kafka"

    def describe(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> BoundOperation:
        return self._bound.get("commit") or self.bind("commit")


class _Connect(BackendOperation):
    backend = "kafka"

    def describe(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> BoundOperation:
        return self._bound.get("connect") or self.bind("connect")


def _poll(clients: ClientRecorder) -> FailuresOnly:
    """A poll (``getone``/``getmany``): only its failures count, in ``kafka_errors_total{operation=
    "consume"}``; how long it took is how long records took to come, no work of the broker's."""
    import aiokafka.errors

    # Both end a poll when the consumer stops (a service shutting down), which is no failure.
    benign = (asyncio.CancelledError, aiokafka.errors.ConsumerStoppedError)
    return FailuresOnly(lambda: clients.bound_failures("kafka", "consume"), benign)  # 0 from the first poll on


def _fresh_headers(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``send()``'s arguments with a copy of the headers, less any trace headers they had (the
    caller's list is left as it was, and a record carries only the current trace context)."""
    if len(args) >= _SEND_HEADERS_POSITION + 1:
        headers, args = args[_SEND_HEADERS_POSITION], args[:_SEND_HEADERS_POSITION]
    else:
        headers = kwargs.get("headers")
    if headers:
        trace_fields = fields()
        carrier = [header for header in headers if header[0] not in trace_fields]
    else:
        carrier = []
    return args, {**kwargs, "headers": carrier}


def _with_trace_headers(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``send()``'s arguments with fresh headers (:func:`_fresh_headers`) carrying the current trace context."""
    args, kwargs = _fresh_headers(args, kwargs)
    inject(kwargs["headers"], setter=_SETTER)
    return args, kwargs


def _propagating(send: Any) -> Any:
    """``send`` with the current trace context in the record's headers."""

    async def call(*args: Any, **kwargs: Any) -> Any:
        args, kwargs = _with_trace_headers(args, kwargs)
        return await send(*args, **kwargs)

    return call


def _through_contrib(send: Any) -> Any:
    """The contrib ``send``, given fresh headers: it appends its span's context to the list it gets."""

    async def call(*args: Any, **kwargs: Any) -> Any:
        args, kwargs = _fresh_headers(args, kwargs)
        return await send(*args, **kwargs)

    return call


def _end_delivery(span: Span, future: asyncio.Future[Any]) -> None:
    if future.cancelled():
        span.set_status(Status(StatusCode.ERROR, "delivery cancelled"))
        span.set_attribute(ERROR_TYPE, error_type(asyncio.CancelledError))
    elif (error := future.exception()) is not None:
        _failed_span(span, error)
    span.end()


def _failed_span(span: Span, error: BaseException) -> None:
    record_exception(span, error)
    span.set_status(Status(StatusCode.ERROR, type(error).__name__))
    span.set_attribute(ERROR_TYPE, error_type(type(error)))


def _delivery_span(send: Any, tracer: Tracer) -> Any:
    """``send`` in a PRODUCER span that ends with the delivery."""

    async def traced(*args: Any, **kwargs: Any) -> Any:
        topic = _send_topic(args, kwargs)
        attributes = {MESSAGING_SYSTEM: "kafka", MESSAGING_DESTINATION_NAME: str(topic),
                      MESSAGING_OPERATION_NAME: "produce"}  # fmt: skip
        span = tracer.start_span(f"{topic} publish", None, SpanKind.PRODUCER, attributes)  # positional, as above
        try:
            # The failure is recorded once, below: use_span would record it too.
            with trace.use_span(span, end_on_exit=False, record_exception=False, set_status_on_exception=False):
                delivery = await send(*args, **kwargs)
        except BaseException as error:
            _failed_span(span, error)
            span.end()
            raise
        delivery.add_done_callback(lambda future: _end_delivery(span, future))
        return delivery

    return traced


class KafkaClientInstrumentor(ClientInstrumentor):
    """aiokafka's deliveries and commits, measured into a :class:`~chatobs.recorders.ClientRecorder`
    and traced when a span would be recorded (see
    :class:`~chatobs.instrumentation.dispatch.ClientInstrumentor`)."""

    def instrumentation_dependencies(self) -> Collection[str]:
        return ("aiokafka >= 0.8",)

    def _specs(self, wiring: Wiring) -> Iterable[PatchSpec]:
        import aiokafka

        tracer = trace.get_tracer(KAFKA_SCOPE, tracer_provider=wiring.tracer_provider)
        gate, produce, commit, connect, poll = (
            wiring.gate,
            _Produce(wiring.clients),
            _Commit(wiring.clients),
            _Connect(wiring.clients),
            _poll(wiring.clients),
        )

        def build_send(original: Any, contrib: Any) -> Any:
            # Through the contrib `send` (its span puts its context in the headers), or with our own headers.
            inner = _through_contrib(contrib) if contrib is not None else _propagating(original)
            return dispatching(original, _delivery_span(inner, tracer), gate, produce)

        commit_attributes = {MESSAGING_SYSTEM: "kafka", MESSAGING_OPERATION_NAME: "commit"}

        def build_commit(original: Any, _: Any) -> Any:
            return dispatching(original, spanned(original, tracer, "commit", commit_attributes), gate, commit)

        connect_attributes = {MESSAGING_SYSTEM: "kafka"}

        def build_connect(original: Any, _: Any) -> Any:
            return dispatching(original, spanned(original, tracer, "connect", connect_attributes), gate, connect)

        yield aiokafka.AIOKafkaProducer, "send", build_send, True
        yield aiokafka.AIOKafkaProducer, "start", build_connect, False
        yield aiokafka.AIOKafkaConsumer, "start", build_connect, False
        yield aiokafka.AIOKafkaConsumer, "commit", build_commit, False
        # Unwrapped from the contrib instrumentation (see the module doc): its span path is dropped.
        untraced_poll = dispatcher(gate, poll)
        for name in ("getone", "getmany"):
            yield aiokafka.AIOKafkaConsumer, name, lambda original, _: untraced_poll(original, None), True
