"""Backlog and reliability: outbox, degraded buffer, WAL, backend errors."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Literal, get_args

from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import SpanContext

from chatobs.cells import CellStore
from chatobs.instruments import Instruments
from chatobs.labels import LabelPolicy
from chatobs.recorders._base import ErrorCallback, Recorder, Timer, checked_amount, guarded

__all__ = ["BACKENDS", "Backend", "BacklogRecorder"]

#: Backends with `{backend}_operation_seconds` and `{backend}_errors_total` in the catalogue.
Backend = Literal["redis", "kafka", "postgres"]
BACKENDS: tuple[str, ...] = get_args(Backend)
_BACKEND_METRICS = {backend: (f"{backend}_operation_seconds", f"{backend}_errors_total") for backend in BACKENDS}


class BacklogRecorder(Recorder):
    """Recording helpers for backlogs and the WAL.

    ``outbox_pending`` and ``degraded_buffer_size`` are observable gauges: the
    service measures them off the scrape path (a poller with a timeout) and
    reports the latest value here; a scrape reads that value and never waits
    on Postgres or Redis.

    Example::

        backlog = telemetry.backlog
        backlog.outbox_pending(await count_pending(timeout=1.0))
        with backlog.time_wal_publish():
            await producer.send_and_wait(topic, record)
    """

    def __init__(self, instruments: Instruments, labels: LabelPolicy, on_error: ErrorCallback, cells: CellStore):
        super().__init__(instruments, labels, on_error, cells)
        self._latest: dict[str, float] = {}
        self._lock = threading.Lock()
        for name in ("outbox_pending", "degraded_buffer_size"):
            instruments.observe(name, self._reader(name))

    def _reader(self, name: str):
        def read(options: CallbackOptions) -> Iterable[Observation]:
            value = self._latest.get(name)
            return () if value is None else (Observation(value),)

        return read

    # Checked here, not at collection: a bad value read by the SDK's callback would be
    # dropped there with a logged traceback on every scrape, and never counted.
    @guarded("outbox_pending")
    def outbox_pending(self, rows: int) -> None:
        self._latest["outbox_pending"] = checked_amount(rows)

    @guarded("degraded_buffer_size")
    def degraded_buffer_size(self, keys: int) -> None:
        self._latest["degraded_buffer_size"] = checked_amount(keys)

    @guarded("wal_publish_seconds")
    def wal_published(self, seconds: float) -> None:
        self._observe("wal_publish_seconds", seconds)

    def time_wal_publish(self) -> Timer:
        return Timer(self.wal_published)

    @guarded("wal_publish_errors_total")
    def wal_publish_error(self, operation: str = "produce") -> None:
        self._add("wal_publish_errors_total", 1, operation)

    @guarded("wal_consume_seconds")
    def wal_consumed(self, seconds: float) -> None:
        self._observe("wal_consume_seconds", seconds)

    def time_wal_consume(self) -> Timer:
        return Timer(self.wal_consumed)

    @guarded("wal_publish_seconds")
    def wal_publish(self, seconds: float, *, failed: bool, span: SpanContext | None = None) -> None:
        """One publish to the WAL topic, send to broker acknowledgement (or failure)."""
        errors = 1 if failed else 0  # before recording anything: a bad `failed` records nothing
        self._observe("wal_publish_seconds", seconds, span=span)
        # Adding 0 on success creates the error series before the first failure: Prometheus's
        # increase() of a series that first appears at 1 is 0, so that failure would not alert.
        self._add("wal_publish_errors_total", errors, "produce")

    @guarded(lambda backend, *_, **__: f"{backend}_operation_seconds" if backend in BACKENDS else "other")
    def backend_operation(
        self, backend: Backend, operation: str, seconds: float, *, failed: bool, span: SpanContext | None = None
    ) -> None:
        """One client operation on ``backend`` (redis, kafka, postgres): its duration and, if it
        failed, an error; ``span``: the operation's span, for the exemplar. Fed by
        :class:`chatobs.instrumentation.spanmetrics.BackendSpanMetrics`."""
        names = _BACKEND_METRICS.get(backend)
        if names is None:
            raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
        errors = 1 if failed else 0
        self._observe(names[0], seconds, operation, span=span)
        # 0 on success: the error series exists before the first failure (see wal_publish).
        self._add(names[1], errors, operation)

    @guarded("redis_errors_total")
    def redis_error(self, operation: str) -> None:
        """A failed Redis command (``operation``: the command name, lower case)."""
        self._add("redis_errors_total", 1, operation)

    @guarded("kafka_errors_total")
    def kafka_error(self, operation: str) -> None:
        """A failed Kafka client operation (produce, consume, commit, connect, metadata)."""
        self._add("kafka_errors_total", 1, operation)

    @guarded("postgres_errors_total")
    def postgres_error(self, operation: str) -> None:
        """A failed PostgreSQL operation (the statement verb, lower case, or connect)."""
        self._add("postgres_errors_total", 1, operation)
