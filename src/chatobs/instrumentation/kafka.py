"""Kafka: delivery outcomes as spans, and trace context from record headers.

The contrib aiokafka instrumentation injects the trace context into record
headers and traces ``send()``, but its span ends when the record is queued, so
a broker that never acknowledges (stopped, unreachable) fails later, outside
any span. :class:`KafkaDeliveryInstrumentor` adds a producer span per record
from ``send()`` to the broker's acknowledgement or the delivery failure, and a
span per consumer ``commit()``; :mod:`chatobs.instrumentation.spanmetrics`
turns them into ``kafka_*`` and ``wal_*`` metrics.

:func:`consumer_span` continues the producer's trace while a consumer handles
a record, so one chat turn is one trace across services.

Example::

    record = await consumer.getone()
    with consumer_span(tracer, record):
        with telemetry.backlog.time_wal_consume():
            await handle(record)
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor
from opentelemetry.instrumentation.utils import unwrap
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from wrapt import wrap_function_wrapper

from chatobs.instrumentation.spanmetrics import KAFKA_SCOPE

__all__ = ["KafkaDeliveryInstrumentor", "consumer_span"]


class _HeaderGetter(Getter[Any]):
    """Reads aiokafka record headers: a sequence of ``(str, bytes)``."""

    def get(self, carrier: Any, key: str) -> list[str] | None:
        values = [value.decode("latin-1") for name, value in carrier or () if name == key and value is not None]
        return values or None

    def keys(self, carrier: Any) -> list[str]:
        return [name for name, _ in carrier or ()]


_GETTER = _HeaderGetter()


@contextmanager
def consumer_span(tracer: Tracer, record: Any, name: str | None = None) -> Iterator[Span]:
    """A CONSUMER span for handling ``record``, child of the producer's span (from its headers).

    A record it cannot read (no headers, malformed headers, odd attribute types) still gets a
    span, a root one, with what could be read: instrumentation never fails the handler.
    """
    try:
        context = propagate.extract(record.headers, getter=_GETTER)
    except Exception:  # noqa: BLE001 - a malformed record: no parent, but still a span
        context = None
    attributes: dict[str, str | int] = {"messaging.system": "kafka", "messaging.operation.name": "process"}
    topic = getattr(record, "topic", None)
    if isinstance(topic, str):
        attributes["messaging.destination.name"] = topic
    else:
        topic = "kafka"  # for the span name only
    partition = getattr(record, "partition", None)
    if partition.__class__ is int:
        attributes["messaging.destination.partition.id"] = str(partition)
    offset = getattr(record, "offset", None)
    if offset.__class__ is int:
        attributes["messaging.kafka.message.offset"] = offset
    span_name = name if isinstance(name, str) and name else f"{topic} process"
    with tracer.start_as_current_span(
        span_name, context=context, kind=SpanKind.CONSUMER, attributes=attributes
    ) as span:
        yield span


def _end(span: Span, future: asyncio.Future[Any]) -> None:
    if future.cancelled():
        span.set_status(Status(StatusCode.ERROR, "delivery cancelled"))
    elif (error := future.exception()) is not None:
        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, type(error).__name__))
    span.end()


class KafkaDeliveryInstrumentor(BaseInstrumentor):
    """Spans for aiokafka deliveries (send to acknowledgement) and consumer commits.

    ``instrument(tracer_provider=...)``; idempotent, as every ``BaseInstrumentor``.
    """

    def instrumentation_dependencies(self) -> Collection[str]:
        return ("aiokafka >= 0.8",)

    def _instrument(self, **kwargs: Any) -> None:
        tracer = trace.get_tracer(KAFKA_SCOPE, tracer_provider=kwargs.get("tracer_provider"))

        async def send(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            topic = args[0] if args else kwargs.get("topic")
            span = tracer.start_span(
                f"{topic} publish",
                kind=SpanKind.PRODUCER,
                attributes={
                    "messaging.system": "kafka",
                    "messaging.destination.name": str(topic),
                    "messaging.operation.name": "produce",
                },
            )
            try:
                with trace.use_span(span, end_on_exit=False):
                    delivery = await wrapped(*args, **kwargs)
            except BaseException as error:
                span.record_exception(error)
                span.set_status(Status(StatusCode.ERROR, type(error).__name__))
                span.end()
                raise
            delivery.add_done_callback(lambda future: _end(span, future))
            return delivery

        async def commit(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            attributes = {"messaging.system": "kafka", "messaging.operation.name": "commit"}
            with tracer.start_as_current_span("commit", kind=SpanKind.CLIENT, attributes=attributes):
                return await wrapped(*args, **kwargs)

        wrap_function_wrapper("aiokafka", "AIOKafkaProducer.send", send)
        wrap_function_wrapper("aiokafka", "AIOKafkaConsumer.commit", commit)

    def _uninstrument(self, **kwargs: Any) -> None:
        import aiokafka

        unwrap(aiokafka.AIOKafkaProducer, "send")
        unwrap(aiokafka.AIOKafkaConsumer, "commit")
