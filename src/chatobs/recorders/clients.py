"""Client calls to the backends and upstream HTTP services, as the client instrumentors see them.

The instrumentors of :mod:`chatobs.instrumentation` call these for every statement, Redis
command, Kafka produce or commit and outbound HTTP request; application code rarely needs
to (a client chatobs does not instrument could).
"""

from __future__ import annotations

from typing import Literal, get_args

from opentelemetry.trace import SpanContext

from chatobs.cells import CellStore, Series
from chatobs.instruments import Instruments
from chatobs.labels import LabelPolicy
from chatobs.recorders._base import ErrorCallback, Recorder, checked_amount, guarded

__all__ = ["BACKENDS", "Backend", "BoundFailures", "BoundOperation", "ClientRecorder"]

#: Backends with `{backend}_operation_seconds` and `{backend}_errors_total` in the catalogue.
Backend = Literal["redis", "kafka", "postgres"]
BACKENDS: tuple[str, ...] = get_args(Backend)
_BACKEND_METRICS = {backend: (f"{backend}_operation_seconds", f"{backend}_errors_total") for backend in BACKENDS}
#: Most (backend, operation) pairs kept bound; past it, operations are recorded through the store.
_BOUND_LIMIT = 512


class BoundOperation:
    """One backend operation's duration and error series, bound: what a client instrumentor
    records each statement or command into (:meth:`ClientRecorder.bound`), with no lookup and
    no argument checks beyond the series' own.

    Example::

        select = telemetry.clients.bound("postgres", "select")
        select.record(0.0021, failed=False)   # as clients.operation("postgres", "select", ...)
    """

    __slots__ = ("_duration", "_errors", "_metric", "_on_error", "succeeded")

    def __init__(self, duration: Series, errors: Series, metric: str, on_error: ErrorCallback):
        self._duration = duration
        self._errors = errors
        self._metric = metric
        self._on_error = on_error
        #: ``record(seconds, False)`` a frame shorter, for a caller that catches what it raises
        #: and hands it to :meth:`report` (a client dispatcher, once per call that succeeded).
        self.succeeded = duration.observe

    def record(self, seconds: float, failed: bool) -> None:
        """One operation that took ``seconds`` (the current span as the bucket's exemplar); never raises."""
        try:
            errors = 1 if failed else 0  # first: a flag whose truth test raises records nothing
            self._duration.observe(seconds)
            if errors:
                self._errors.add(1)
        except Exception as error:  # noqa: BLE001 - recording must never raise into the app
            self._on_error(self._metric, error)

    def report(self, error: Exception) -> None:
        """Count ``error``, raised by :attr:`succeeded`, as :meth:`record` counts its own; never raises."""
        self._on_error(self._metric, error)


def _metric_names(backend: str) -> tuple[str, str]:
    names = _BACKEND_METRICS.get(backend)
    if names is None:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    return names


class BoundFailures:
    """One backend operation's error series alone, bound: for calls whose duration measures no
    work of the backend's (a Kafka poll waits for records to arrive), only failures count.

    Example::

        polls = telemetry.clients.bound_failures("kafka", "consume")
        polls.record()   # kafka_errors_total{operation="consume"} + 1
    """

    __slots__ = ("_errors", "_metric", "_on_error")

    def __init__(self, errors: Series, metric: str, on_error: ErrorCallback):
        self._errors = errors
        self._metric = metric
        self._on_error = on_error

    def record(self, seconds: float = 0.0, failed: bool = True) -> None:
        """One failed call (``failed=False``: a call that succeeded, which counts nothing); never
        raises. The signature is :meth:`BoundOperation.record`'s, so a client instrumentor
        records into either the same way (a Redis command that blocks gets one of these)."""
        try:
            if failed:
                self._errors.add(1)
        except Exception as error:  # noqa: BLE001 - recording must never raise into the app
            self._on_error(self._metric, error)

    def succeeded(self, seconds: float) -> None:
        """:meth:`BoundOperation.succeeded`'s counterpart: a call that succeeded counts nothing."""

    def report(self, error: Exception) -> None:
        """As :meth:`BoundOperation.report`."""
        self._on_error(self._metric, error)


class ClientRecorder(Recorder):
    """Recording helpers for client operations.

    Example::

        clients = telemetry.clients
        clients.operation("postgres", "select", 0.0021, failed=False)
        clients.produced(0.004, failed=False, wal=topic == clients.wal_topic)
        clients.http_request("POST", "llm.internal", "200", 0.84)
    """

    def __init__(
        self, instruments: Instruments, labels: LabelPolicy, on_error: ErrorCallback, cells: CellStore, wal_topic: str
    ):
        super().__init__(instruments, labels, on_error, cells)
        self._cells = cells
        # (backend, operation) -> its duration and error series: every statement, command and
        # delivery records into both, so they are bound once (Series) instead of looked up twice.
        self._operations: dict[tuple[str, str], tuple[Series, Series]] = {}
        #: The WAL topic (``CHATOBS_WAL_TOPIC``): a produce to it is also a WAL publish.
        self.wal_topic = wal_topic

    @guarded(lambda backend, *_, **__: f"{backend}_operation_seconds" if backend in BACKENDS else "other")
    def operation(
        self, backend: Backend, operation: str, seconds: float, *, failed: bool, span: SpanContext | None = None
    ) -> None:
        """One client operation on ``backend`` (redis, kafka, postgres): its duration and, if it
        failed, an error. The bucket's exemplar is ``span`` if given, else the current span."""
        # Every argument checked before anything is bound or recorded: a bad call records nothing.
        errors = 1 if failed else 0
        seconds = checked_amount(seconds)
        if span is not None and not isinstance(span, SpanContext):
            raise TypeError(f"span must be a SpanContext or None, got {type(span).__name__}")
        series = self._series(backend, operation)
        series[0].observe(seconds, span)
        if errors:
            # The error series was bound with the duration's, so it shows 0 before the first failure:
            # Prometheus's increase() of a series that first appears at 1 is 0, which would not alert.
            series[1].add(errors)

    def bound(self, backend: Backend, operation: str) -> BoundOperation:
        """:meth:`operation` for one ``backend`` and ``operation``, bound once (label checks and
        the series lookup done here, not per call): what a client instrumentor keeps per
        statement kind or command. Raises ``ValueError`` for an unknown backend."""
        series = self._series(backend, operation)
        return BoundOperation(series[0], series[1], _BACKEND_METRICS[backend][0], self._on_error)

    def bound_failures(self, backend: Backend, operation: str) -> BoundFailures:
        """The error series of ``operation`` on ``backend`` alone, bound now (it shows 0 until the
        first failure). Raises ``ValueError`` for an unknown backend."""
        names = _metric_names(backend)
        errors = self._cells.series(names[1], (operation,))
        errors.add(0)
        return BoundFailures(errors, names[1], self._on_error)

    def _series(self, backend: str, operation: str) -> tuple[Series, Series]:
        """The duration and error series of ``operation`` on ``backend``, bound on first use."""
        try:
            series = self._operations.get((backend, operation))
        except Exception:  # noqa: BLE001 - an unhashable operation (or one whose hash raises): bound below, as `other`
            series = None
        return series if series is not None else self._bind(backend, operation)

    def _bind(self, backend: str, operation: str) -> tuple[Series, Series]:
        names = _metric_names(backend)
        values = (operation,)
        series = (self._cells.series(names[0], values), self._cells.series(names[1], values))
        series[1].add(0)  # counts a rejected operation's `other` for the error series, once it shows
        if len(self._operations) < _BOUND_LIMIT and type(operation) is str:
            self._operations[backend, operation] = series
        return series

    def bound_produced(self, *, wal: bool) -> tuple[BoundOperation, ...]:
        """:meth:`produced` for records to the WAL topic (``wal``) or to any other, bound once:
        the series a record sent records into (Kafka's ``produce`` and, for the WAL, the WAL
        publish), each ``record(seconds, failed)``. What aiokafka's instrumentor keeps.

        Example::

            for series in clients.bound_produced(wal=True):
                series.record(0.004, False)   # as clients.produced(0.004, failed=False, wal=True)
        """
        produce = self.bound("kafka", "produce")
        if not wal:
            return (produce,)
        duration = self._cells.series("wal_publish_seconds", ())
        errors = self._cells.series("wal_publish_errors_total", ("produce",))
        errors.add(0)  # shown from the first publish on, as the operation's error series
        return produce, BoundOperation(duration, errors, "wal_publish_seconds", self._on_error)

    @guarded("kafka_operation_seconds")
    def produced(self, seconds: float, *, failed: bool, wal: bool, span: SpanContext | None = None) -> None:
        """One record sent, from ``send()`` to the broker's acknowledgement (or the failure): a
        Kafka ``produce`` operation and, for a record to the WAL topic (:attr:`wal_topic`), a
        WAL publish."""
        errors = 1 if failed else 0
        seconds = checked_amount(seconds)
        wal = bool(wal)
        # Per record sent: the cells directly, with no keywords (a dict a call) nor a frame between.
        self._cell_observe("kafka_operation_seconds", seconds, ("produce",), None, span)
        self._add("kafka_errors_total", errors, "produce")
        if wal:
            self._cell_observe("wal_publish_seconds", seconds, (), None, span)
            self._add("wal_publish_errors_total", errors, "produce")

    @guarded("http_client_request_duration_seconds")
    def http_request(self, method: str, server: str, status: str, seconds: float) -> None:
        """One outbound HTTP request (``method`` known to HTTP or ``_OTHER``; ``status``: the
        response's code, or empty when there was none)."""
        self._observe("http_client_request_duration_seconds", seconds, method, server, status)
