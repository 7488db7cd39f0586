"""Backlog and reliability: outbox, degraded buffer, WAL, backend errors."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Literal

from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import SpanContext

from chatobs.cells import CellStore
from chatobs.instruments import Instruments
from chatobs.labels import LabelPolicy
from chatobs.recorders._base import ErrorCallback, Recorder, Timer, checked_amount, guarded

__all__ = ["BacklogRecorder"]

#: The gauges a service measures with a poller and reports here.
_MEASURED_GAUGES = ("outbox_pending", "degraded_buffer_size")


class BacklogRecorder(Recorder):
    """Recording helpers for backlogs and the WAL.

    ``outbox_pending`` and ``degraded_buffer_size`` are observable gauges: the
    service measures them off the scrape path (a poller with a timeout) and
    reports the latest value here; a scrape reads that value and never waits
    on Postgres or Redis. A measurement that fails is reported too
    (:meth:`unmeasured`): the gauge is then left out until one succeeds.

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
        for name in _MEASURED_GAUGES:
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

    @guarded(lambda gauge: gauge if gauge in _MEASURED_GAUGES else "other")
    def unmeasured(self, gauge: Literal["outbox_pending", "degraded_buffer_size"]) -> None:
        """The latest measurement of ``gauge`` failed (it timed out, the backend is down): the
        gauge is left out of scrapes until one succeeds, rather than showing a value that may
        be long out of date."""
        if gauge not in _MEASURED_GAUGES:
            raise ValueError(f"not a measured backlog gauge: {gauge!r}")
        self._latest.pop(gauge, None)

    @guarded("outbox_rows_parked_total")
    def outbox_row_parked(self) -> None:
        """The publisher set an outbox row aside: the broker refuses it for good."""
        self._add("outbox_rows_parked_total", 1)

    @guarded("wal_publish_seconds")
    def wal_published(self, seconds: float) -> None:
        self._observe("wal_publish_seconds", seconds)

    def time_wal_publish(self) -> Timer:
        return Timer(self.wal_published)

    @guarded("wal_publish_errors_total")
    def wal_publish_error(self, operation: str = "produce") -> None:
        self._add("wal_publish_errors_total", 1, operation)

    @guarded("wal_consume_seconds")
    def wal_consumed(self, seconds: float, *, span: SpanContext | None = None) -> None:
        """One WAL record done with (see the catalogue). The bucket's exemplar is ``span`` if
        given (the record's own, for records committed after their spans ended), else the
        current span."""
        if span is not None and not isinstance(span, SpanContext):
            raise TypeError(f"span must be a SpanContext or None, got {type(span).__name__}")
        self._cell_observe("wal_consume_seconds", seconds, (), None, span)  # per record: no keywords, one call

    def time_wal_consume(self) -> Timer:
        return Timer(self.wal_consumed)

    @guarded("redis_errors_total")
    def redis_error(self, operation: str) -> None:
        """A failed Redis command (``operation``: the command name, lower case)."""
        self._add("redis_errors_total", 1, operation)

    @guarded("kafka_errors_total")
    def kafka_error(self, operation: str) -> None:
        """A failed Kafka client operation (produce, consume, commit, connect)."""
        self._add("kafka_errors_total", 1, operation)

    @guarded("postgres_errors_total")
    def postgres_error(self, operation: str) -> None:
        """A failed PostgreSQL operation (the statement verb, lower case, or connect)."""
        self._add("postgres_errors_total", 1, operation)
