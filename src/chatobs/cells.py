"""The recording hot path: one cell per label set, aggregated cheaply, read at collection time.

The OpenTelemetry SDK's synchronous ``Counter.add`` costs several times prometheus_client's
``labels(...).inc()`` (it rebuilds the attribute key and walks the view machinery on every
call), and reading a series through an observable instrument costs about 10 microseconds
a series at every collection (a ``Measurement`` with its attributes cleaned, the view's
attribute key, an aggregation, a data point; docs/performance.md). Here a recording is a
dict lookup of a bound cell and an add under that cell's lock, as in prometheus_client,
and at collection every cell becomes the data point the catalogue's View would have given
(:meth:`CellStore.produced_metrics`): cumulative ``Sum`` points for counters (monotonic)
and up-down counters, ``Gauge`` points for gauges, ``HistogramDataPoint``\\ s with the
catalogue's buckets for histograms, each bucket keeping its latest exemplar (trace and span
id of a sampled span). :func:`with_produced` hands them to each reader with what the SDK
collected, so the Prometheus reader and OTLP push see ordinary OpenTelemetry metrics.

Label values are validated once per distinct raw tuple (``LabelPolicy``) and the bound
cell is cached under that tuple. With a :class:`~chatobs.multiprocess.ProcessDirectory`
(several worker processes behind one scrape) every cell also writes its values through to
this process's file, and collection reads the combined values of every process instead.

Amounts and observations are checked before anything is recorded: a finite real number
from 0 to :data:`MAX_AMOUNT`; anything else raises (the recorders count it in
``chatobs_recording_errors_total``) and leaves every cell as it was. Observations are
checked by :meth:`CellStore.observe`; counter increments by the recorders, which mostly
add constants. One NaN or negative
observation would otherwise poison a histogram's ``_sum`` for good, and Prometheus and
the OpenMetrics parsers reject a NaN or negative ``_sum``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import weakref
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import NamedTuple

from opentelemetry import trace
from opentelemetry.context import Context, get_current
from opentelemetry.metrics import Observation
from opentelemetry.sdk.metrics import Exemplar
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Gauge,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from chatobs import catalogue
from chatobs.catalogue import Kind
from chatobs.labels import LabelPolicy, cacheable
from chatobs.multiprocess import ProcessDirectory, ProcessFile, Snapshot, renew_in_forked_child, series_key, split_key

__all__ = [
    "MAX_AMOUNT",
    "CellStore",
    "CounterCell",
    "GaugeCell",
    "HistogramCell",
    "Series",
    "checked_amount",
    "exemplar_sampler",
    "exemplar_span_filter",
    "exportable_exemplars",
    "has_exact_ids",
    "number_metric",
    "with_produced",
]

_logger = logging.getLogger("chatobs")

#: Distinct raw label tuples cached per metric (validation still bounds the series beyond it).
_CACHE_LIMIT = 4096

#: Largest increment or observation accepted: 2**53, the largest integer a float holds
#: exactly. Nothing the catalogue counts or measures comes near it in one event, and it
#: keeps every sum within float range, so a sum always renders as a Prometheus number.
MAX_AMOUNT = float(2**53)


def checked_amount(value: object) -> int | float:
    """``value`` as an amount to record: a finite real number from 0 to :data:`MAX_AMOUNT`.

    ``int`` and ``float`` pass as they are; other real numbers (``Decimal`` from a
    database, ``bool``, numpy scalars) are converted to ``float`` so they cannot turn a
    cell's running sum into a type that later additions fail on. Raises ``TypeError``
    or ``ValueError`` for anything else.

    >>> checked_amount(3), checked_amount(0.25)
    (3, 0.25)
    >>> checked_amount(float("nan"))
    Traceback (most recent call last):
    ...
    ValueError: amount must be a finite number from 0 to 2**53, got nan
    """
    number: int | float
    if value.__class__ is int or value.__class__ is float:
        number = value  # type: ignore[assignment]
    elif isinstance(value, (str, bytes, bytearray)) or value is None:
        raise TypeError(f"amount must be a number, got {type(value).__name__}")
    else:
        number = float(value)  # type: ignore[arg-type]
    if not 0 <= number <= MAX_AMOUNT:  # also False for NaN
        raise ValueError(f"amount must be a finite number from 0 to 2**53, got {number!r}")
    return number


class CounterCell:
    __slots__ = ("_lock", "attributes", "start", "value")

    def __init__(self, attributes: dict[str, str]):
        self.attributes = attributes
        self.value: float = 0
        self.start = time.time_ns()
        self._lock = threading.Lock()

    def add(self, amount: float) -> None:
        """Add ``amount``, already checked (see :func:`checked_amount`)."""
        with self._lock:
            self.value += amount


class GaugeCell:
    """A gauge's current value: set outright, or moved by increments (an up-down counter)."""

    __slots__ = ("_lock", "attributes", "start", "value")

    def __init__(self, attributes: dict[str, str]):
        self.attributes = attributes
        self.value: float = 0
        self.start = time.time_ns()
        self._lock = threading.Lock()

    def set(self, value: float) -> None:
        self.value = float(value)  # a str or None raises here, in the guarded recorder, not at scrape

    def move(self, amount: float) -> None:
        amount = float(amount)
        with self._lock:
            self.value += amount


#: Kinds recorded in cells and produced as number points (the others: histograms, observable instruments).
_NUMBER_KINDS = (Kind.COUNTER, Kind.UP_DOWN, Kind.GAUGE)

#: A bucket's latest exemplar: (value, time in ns, the span's context).
RawExemplar = tuple[float, int, trace.SpanContext]
#: A bucket looks for the current span, to keep as its exemplar, at most this often. Finding the
#: current span is most of an observation's cost (several OpenTelemetry API calls), and a scrape
#: shows one exemplar a bucket anyway: the latest, now at most this much older than the latest
#: observation. Finding none counts as a look: a statement run outside any span (a transaction's
#: BEGIN, a periodic count) would otherwise look on every call, and find nothing every time.
EXEMPLAR_REFRESH_NS = 1_000_000_000


def _looked_up(looked: list[int], index: int, sample: ExemplarSampler) -> trace.SpanContext | None:
    """The current span, if bucket ``index`` last looked for one ``EXEMPLAR_REFRESH_NS`` ago or more."""
    now = time.monotonic_ns()  # an interval: the wall clock may step
    if now - looked[index] < EXEMPLAR_REFRESH_NS:
        return None
    looked[index] = now  # two threads may both look: harmless, and cheaper than a lock
    return sample(None)


class HistogramCell:
    __slots__ = ("_bounds", "_lock", "_looked", "attributes", "count", "counts", "exemplars", "max", "min", "start",
                 "sum")  # fmt: skip

    def __init__(self, attributes: dict[str, str], bounds: Sequence[float]):
        self.attributes = attributes
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.count = 0
        self.sum: float = 0.0
        self.min = math.inf  # the SDK's explicit-bucket aggregation records both, for OTLP
        self.max = -math.inf
        self.exemplars: list[RawExemplar | None] = [None] * (len(bounds) + 1)
        self._looked = [-EXEMPLAR_REFRESH_NS] * (len(bounds) + 1)  # when each bucket last looked for a span
        self.start = time.time_ns()
        self._lock = threading.Lock()

    def observe(
        self, value: float, exemplar_span: trace.SpanContext | None, sample: ExemplarSampler | None = None
    ) -> None:
        """Count ``value``, already checked (see :func:`checked_amount`). The exemplar is
        ``exemplar_span``, or what ``sample`` finds (the current span) if the bucket's is stale."""
        index = bisect_left(self._bounds, value)  # buckets are upper-inclusive, as Prometheus's `le`
        if sample is not None:
            exemplar_span = _looked_up(self._looked, index, sample)
        # A tuple here, the SDK's Exemplar only at collection: most are replaced before a scrape.
        exemplar = (value, time.time_ns(), exemplar_span) if exemplar_span is not None else None
        with self._lock:  # the exemplar with its count: a scrape sees both or neither
            self.counts[index] += 1
            self.count += 1
            self.sum += value
            if value < self.min:
                self.min = value
            if value > self.max:
                self.max = value
            if exemplar is not None:
                self.exemplars[index] = exemplar

    def snapshot(self) -> tuple[list[int], int, float, list[RawExemplar | None]]:
        """``(bucket counts, count, sum, each bucket's exemplar)``, one consistent reading."""
        with self._lock:
            return list(self.counts), self.count, self.sum, list(self.exemplars)

    def point(self, now: int) -> HistogramDataPoint:
        with self._lock:
            counts, count, total, low, high = list(self.counts), self.count, self.sum, self.min, self.max
            exemplars = list(self.exemplars)
        extremes = (low, high) if count else (math.nan, math.nan)
        return _histogram_point(self.attributes, self.start, now, counts, count, total, self._bounds, exemplars,
                                extremes)  # fmt: skip


def has_exact_ids(trace_id: object, span_id: object) -> bool:
    """Whether an exemplar's ids are ints, not merely numbers: the API takes a float id and calls
    its span valid, and neither an OpenMetrics exemplar (hex) nor OTLP (bytes) can carry one.
    Checked at collection, once an exemplar is kept, rather than on every observation."""
    return type(trace_id) is int and type(span_id) is int


def exportable_exemplars(exemplars: Sequence[RawExemplar | None]) -> Iterator[RawExemplar]:
    """A histogram cell's kept exemplars (one slot a bucket, None when empty) that can be exported."""
    return (exemplar for exemplar in exemplars
            if exemplar is not None and has_exact_ids(exemplar[2].trace_id, exemplar[2].span_id))  # fmt: skip


def _histogram_point(
    attributes: dict[str, str],
    start: int,
    now: int,
    counts: list[int],
    count: int,
    total: float,
    bounds: Sequence[float],
    exemplars: Sequence[RawExemplar | None],
    extremes: tuple[float, float] = (math.nan, math.nan),
) -> HistogramDataPoint:
    """The point; ``extremes`` (min, max) unknown when combined from several processes' files."""
    return HistogramDataPoint(
        attributes=attributes,
        start_time_unix_nano=start,
        time_unix_nano=now,
        count=count,
        sum=total,
        bucket_counts=counts,
        explicit_bounds=list(bounds),
        min=extremes[0],
        max=extremes[1],
        exemplars=[
            Exemplar({}, value, at, span_id=span.span_id, trace_id=span.trace_id)
            for value, at, span in exportable_exemplars(exemplars)
        ],
    )


# Write-through variants for several worker processes: the same recording, then the new
# values into this process's file at the offset allocated for the series. Subclasses, so a
# single-process service pays nothing for the feature.


class FileCounterCell(CounterCell):
    __slots__ = ("_file", "_offset")

    def __init__(self, attributes: dict[str, str], file: ProcessFile, offset: int):
        super().__init__(attributes)
        self._file, self._offset = file, offset

    def add(self, amount: float) -> None:
        with self._lock:
            self.value += amount
            self._file.write(self._offset, self.value)


class FileGaugeCell(GaugeCell):
    __slots__ = ("_file", "_offset")

    def __init__(self, attributes: dict[str, str], file: ProcessFile, offset: int):
        super().__init__(attributes)
        self._file, self._offset = file, offset

    def set(self, value: float) -> None:
        value = float(value)
        with self._lock:
            self.value = value
            self._file.write(self._offset, value)

    def move(self, amount: float) -> None:
        amount = float(amount)
        with self._lock:
            self.value += amount
            self._file.write(self._offset, self.value)


class FileHistogramCell(HistogramCell):
    """Slots: count, sum, then one count per bucket (the last one ``+Inf``)."""

    __slots__ = ("_file", "_offset")

    def __init__(self, attributes: dict[str, str], bounds: Sequence[float], file: ProcessFile, offset: int):
        super().__init__(attributes, bounds)
        self._file, self._offset = file, offset

    def observe(
        self, value: float, exemplar_span: trace.SpanContext | None, sample: ExemplarSampler | None = None
    ) -> None:
        index = bisect_left(self._bounds, value)
        if sample is not None:
            exemplar_span = _looked_up(self._looked, index, sample)
        exemplar = (value, time.time_ns(), exemplar_span) if exemplar_span is not None else None
        write, offset = self._file.write, self._offset
        with self._lock:
            self.counts[index] += 1
            self.count += 1
            self.sum += value
            write(offset, self.count)
            write(offset + 8, self.sum)
            write(offset + 16 + 8 * index, self.counts[index])
            if exemplar is not None:
                self.exemplars[index] = exemplar


Cell = CounterCell | GaugeCell | HistogramCell


class LocalCells(NamedTuple):
    """This process's cells by metric name (:meth:`CellStore.local_cells`), with the scope
    their metrics are produced under, and the observable metrics' readings
    (:meth:`chatobs.instruments.Instruments.readings`): what a scrape renders directly."""

    cells: dict[str, list[Cell]]
    scope: InstrumentationScope
    readings: Mapping[str, Sequence[Observation]] = MappingProxyType({})


ExemplarFilter = Callable[[trace.SpanContext], "trace.SpanContext | None"]
_SAMPLED = trace.TraceFlags.SAMPLED
ExemplarSampler = Callable[[Context | None], "trace.SpanContext | None"]


def exemplar_span_filter(filter_name: str) -> ExemplarFilter:
    """Whether a span may be a bucket's exemplar (``OTEL_METRICS_EXEMPLAR_FILTER``:
    ``trace_based``: sampled spans, ``always_on``: any valid span, ``always_off``: none);
    returns the span's context, or None."""
    if filter_name == "always_off":
        return lambda span_context: None
    if filter_name == "always_on":
        return lambda span_context: span_context if span_context.is_valid else None
    # `& SAMPLED`, not `.sampled`: the property is a Python call, on every request's exemplar.
    return lambda span_context: span_context if span_context.trace_flags & _SAMPLED and span_context.is_valid else None


def exemplar_sampler(filter_name: str) -> ExemplarSampler:
    """Which span context (if any) a histogram observation keeps as its bucket's exemplar:
    the current span's (or ``context``'s), if :func:`exemplar_span_filter` would keep it."""
    if filter_name == "always_off":
        return lambda context: None
    any_valid = filter_name == "always_on"

    # A context is immutable, so the one current at the last look has the same answer now:
    # a task's observations mostly share one (its span's), and a service idle between them
    # pays for each lookup on cold caches. Kept as one tuple, replaced whole (threads).
    last: list[tuple[Context | None, trace.SpanContext | None]] = [(None, None)]

    # The filter's rule again, inline: this runs on every observation. Calling the filter
    # instead measured 0.80 of prometheus_client's observe() against 0.77 inline, side by
    # side in one session (about 60 ns; within this machine's noise, but on every call).
    def sample(context: Context | None) -> trace.SpanContext | None:
        if context is None:
            context = get_current()
        seen, found = last[0]
        if context is seen:
            return found
        span_context = trace.get_current_span(context).get_span_context()
        found = span_context if span_context.is_valid and (any_valid or span_context.trace_flags.sampled) else None
        last[0] = (context, found)
        return found

    return sample


class Series:
    """One series of a catalogue metric, bound once by :meth:`CellStore.series` and then recorded
    into with no lookup: prometheus_client's ``labels(...)`` child, for callers that record the
    same label values over and over (a client instrumentor's ``select``, say).

    A label value the policy rejected is still counted in ``chatobs_label_rejections_total`` at
    each recording, as through the store.
    """

    __slots__ = ("__weakref__", "_cell", "_key", "_name", "_rejected", "_store")

    def __init__(self, store: CellStore, name: str, cell: Cell, rejected: tuple[str, ...]):
        self._store = store
        self._name = name
        self._cell = cell
        self._key = tuple(cell.attributes.values())
        self._rejected = rejected

    def add(self, amount: float) -> None:
        """As :meth:`CellStore.add` (``amount`` already checked)."""
        if self._rejected:
            self._store._report(self._name, self._rejected)
        self._cell.add(amount)  # type: ignore[union-attr]

    def observe(self, value: float, span: trace.SpanContext | None = None) -> None:
        """As :meth:`CellStore.observe`: ``value`` checked, the exemplar ``span`` or the current span."""
        if (value.__class__ is not int and value.__class__ is not float) or not 0 <= value <= MAX_AMOUNT:
            value = checked_amount(value)
        store = self._store
        if span is None:  # the current span, sampled by the cell when the bucket's exemplar is stale
            exemplar, sample = None, store._sample_exemplar
        else:
            exemplar, sample = store._exemplar_of_span(span), None
        if self._rejected:
            store._report(self._name, self._rejected)
        self._cell.observe(value, exemplar, sample)  # type: ignore[union-attr]


class CellStore:
    """Bound cells of every catalogue counter, gauge and histogram, for one Telemetry.

    ``directory``: several worker processes share the scrape (see :mod:`chatobs.multiprocess`);
    call :meth:`refresh` before each collection so that every callback of that collection reads
    the same combined snapshot.
    """

    def __init__(
        self,
        labels: LabelPolicy,
        on_reject: Callable[[str, str], None],
        exemplar_filter: str,
        directory: ProcessDirectory | None = None,
    ):
        self._labels = labels
        self._on_reject = on_reject
        self._sample_exemplar = exemplar_sampler(exemplar_filter)
        self._exemplar_of_span = exemplar_span_filter(exemplar_filter)
        self._directory = directory
        self._snapshot: Snapshot | None = None
        self._unreadable = False  # the shared directory could not be read at the last refresh
        self._start = time.time_ns()
        # Hot-path cache: name -> raw label values -> (cell, labels of those values that were rejected).
        self._bound: dict[str, dict[tuple[str, ...], tuple[Cell, tuple[str, ...]]]] = {}
        # name -> resolved label values -> cell: raw values that resolve alike (two unknown
        # models both become `other`) share one cell, so one series.
        self._series: dict[str, dict[tuple[str, ...], Cell]] = {}
        self._lock = threading.Lock()
        self._handed_out: weakref.WeakSet[Series] = weakref.WeakSet()  # rebound after a fork
        if directory is not None:
            # A server that builds the app before forking its workers (gunicorn --preload) hands
            # every worker this store: each must then write its own file, not the parent's.
            renew_in_forked_child(self, CellStore._after_fork)

    # -- recording ------------------------------------------------------------------
    def add(self, name: str, amount: float, values: tuple[str, ...]) -> None:
        """Add ``amount`` to the series of ``values``.

        ``amount`` is not checked here, the hottest path of all: callers pass a constant or
        what :func:`checked_amount` returned (the recorders do; their fuzz test holds them to it).
        """
        bound = self._bound.get(name)
        try:
            entry = bound.get(values) if bound is not None else None
        except Exception:  # noqa: BLE001 - an unhashable label value: bound (as `other`) without the cache
            entry = None
        cell, rejected = entry if entry is not None else self._bind(name, values)
        if rejected:
            self._report(name, rejected)
        cell.add(amount)  # type: ignore[union-attr]

    def observe(
        self,
        name: str,
        value: float,
        values: tuple[str, ...],
        context: Context | None = None,
        span: trace.SpanContext | None = None,
    ) -> None:
        """Count ``value`` in the series of ``values``; raises, recording nothing, for a bad value.

        The bucket's exemplar is the current span, or ``context``'s, or ``span`` (an ended
        span's context, from a span processor), if the exemplar filter keeps it.
        """
        # Checked here: durations come straight from callers. The plain case costs two type
        # checks and one chained comparison (which NaN fails too).
        if (value.__class__ is not int and value.__class__ is not float) or not 0 <= value <= MAX_AMOUNT:
            value = checked_amount(value)
        # Before binding: a bad context or span records nothing. The current span (no context,
        # no span given, the usual case) is sampled by the cell, when the bucket's exemplar is stale.
        sample: ExemplarSampler | None = None
        if span is not None:
            exemplar = self._exemplar_of_span(span)
        elif context is not None:
            exemplar = self._sample_exemplar(context)
        else:
            exemplar, sample = None, self._sample_exemplar
        bound = self._bound.get(name)
        try:
            entry = bound.get(values) if bound is not None else None
        except Exception:  # noqa: BLE001 - as in add()
            entry = None
        cell, rejected = entry if entry is not None else self._bind(name, values)
        if rejected:
            self._report(name, rejected)
        cell.observe(value, exemplar, sample)  # type: ignore[union-attr]

    def set(self, name: str, value: float, values: tuple[str, ...]) -> None:
        """Set a gauge."""
        cell, rejected = self._cell(name, values)
        if rejected:
            self._report(name, rejected)
        cell.set(value)  # type: ignore[union-attr]

    def move(self, name: str, amount: float, values: tuple[str, ...]) -> None:
        """Move a gauge by ``amount`` (an up-down counter)."""
        cell, rejected = self._cell(name, values)
        if rejected:
            self._report(name, rejected)
        cell.move(amount)  # type: ignore[union-attr]

    def series(self, name: str, values: tuple[str, ...]) -> Series:
        """The series of ``values`` of metric ``name``, bound for repeated recording (see :class:`Series`)."""
        cell, rejected = self._cell(name, values)
        bound = Series(self, name, cell, rejected)
        if self._directory is not None:
            self._handed_out.add(bound)
        return bound

    def _cell(self, name: str, values: tuple[str, ...]) -> tuple[Cell, tuple[str, ...]]:
        bound = self._bound.get(name)
        try:
            entry = bound.get(values) if bound is not None else None
        except Exception:  # noqa: BLE001 - as in add()
            entry = None
        return entry if entry is not None else self._bind(name, values)

    def _report(self, name: str, rejected: tuple[str, ...]) -> None:
        for label in rejected:
            self._on_reject(name, label)

    def _bind(self, name: str, values: tuple[str, ...]) -> tuple[Cell, tuple[str, ...]]:
        metric = catalogue.get(name)
        attributes, rejected = self._labels.resolve(metric, values)
        key = tuple(attributes.values())
        series = self._series.get(name)
        cell = series.get(key) if series is not None else None
        bound = self._bound.get(name)
        if cell is not None and bound is not None and len(bound) >= _CACHE_LIMIT:
            # A flood of new raw values (overflowing to `other`, say): nothing to create or cache.
            return cell, rejected
        with self._lock:
            series = self._series.setdefault(name, {})
            cell = series.get(key)
            if cell is None:
                cell = self._new_cell(metric, attributes)
                series[key] = cell
            bound = self._bound.setdefault(name, {})
            if len(bound) < _CACHE_LIMIT and cacheable(values):
                bound[values] = (cell, rejected)
        return cell, rejected

    def _new_cell(self, metric: catalogue.Metric, attributes: dict[str, str]) -> Cell:
        if self._directory is None:
            if metric.buckets is not None:
                return HistogramCell(attributes, metric.buckets)
            return CounterCell(attributes) if metric.kind is Kind.COUNTER else GaugeCell(attributes)
        file = self._directory.own
        if metric.buckets is not None:
            offset = file.allocate(series_key(metric.name, attributes), slots=len(metric.buckets) + 3)
            return FileHistogramCell(attributes, metric.buckets, file, offset)
        offset = file.allocate(series_key(metric.name, attributes), slots=1)
        if metric.kind is Kind.COUNTER:
            return FileCounterCell(attributes, file, offset)
        return FileGaugeCell(attributes, file, offset)

    def _after_fork(self) -> None:
        """In a forked worker: a file of its own, and cells that start from zero (what the parent
        recorded stays in the parent's file)."""
        assert self._directory is not None
        self._directory.reopen()
        self._lock = threading.Lock()  # the parent's may have been held by another thread at the fork
        self._labels.renew_locks()  # so may the label policy's
        self._bound = {}
        self._snapshot = None
        for name, series in self._series.items():
            metric = catalogue.get(name)
            for key, cell in series.items():
                series[key] = self._new_cell(metric, cell.attributes)
        for bound in list(self._handed_out):
            bound._cell = self._series[bound._name][bound._key]

    # -- collection --------------------------------------------------------------------
    def refresh(self) -> None:
        """Read every worker process's values (no-op for a single process)."""
        if self._directory is not None:
            try:
                self._snapshot = self._directory.snapshot()
            except OSError as error:
                # The directory went away or became unreadable: the previous values beat a failed
                # scrape, or counts at zero. Said once per run of failures, not on every scrape.
                if not self._unreadable:
                    _logger.warning(
                        "chatobs: cannot read %s (%s); serving the previous values until it can be read: "
                        "restart the server if it was removed", self._directory.path, error,
                    )  # fmt: skip
                self._unreadable = True
            else:
                self._unreadable = False

    def live_pids(self) -> list[int]:
        """The live worker processes of this server (this one alone without a directory)."""
        snapshot = self._current_snapshot()
        return [] if snapshot is None else snapshot.live_pids

    def _current_snapshot(self) -> Snapshot | None:
        """The last snapshot read, or one read now; ``None`` without a directory, or when it has
        never been readable (then this process's own cells are all there is to show)."""
        if self._directory is None:
            return None
        if self._snapshot is None:
            try:
                self._snapshot = self._directory.snapshot()
            except OSError:
                return None
        return self._snapshot

    def _combined(self, name: str) -> dict[str, list[float]] | None:
        snapshot = self._current_snapshot()
        return None if snapshot is None else snapshot.combined(name, catalogue.get(name).combine)  # type: ignore[arg-type]

    @property
    def combines_files(self) -> bool:
        """Whether the values are several worker processes' (``CHATOBS_MULTIPROCESS_DIR``),
        combined from their files at each collection, rather than this process's cells."""
        return self._directory is not None

    def local_cells(self, scope: InstrumentationScope) -> LocalCells | None:
        """Every counter's, gauge's and histogram's cells, for a scrape to render as they are
        (a scrape shows no start times or extremes, and building the data-model points first
        was about a third of a small service's scrape); None when the values are combined
        from several processes' files (:attr:`combines_files`): those are produced as points."""
        if self.combines_files:
            return None
        return LocalCells({name: list(series.values()) for name, series in list(self._series.items()) if series},
                          scope)  # fmt: skip

    def produced_metrics(self) -> list[Metric]:
        """Every counter's, gauge's and histogram's points, in the SDK's data model (cumulative),
        as the catalogue's View would give them: its label keys, its buckets."""
        now = time.time_ns()
        metrics = []
        names = list(self._series) if self._directory is None else [m.name for m in catalogue.CATALOGUE]
        for name in names:
            metric = catalogue.get(name)
            if metric.buckets is not None:
                histogram_points = self._histogram_points(metric, now)
                if histogram_points:
                    data = Histogram(data_points=histogram_points,
                                     aggregation_temporality=AggregationTemporality.CUMULATIVE)  # fmt: skip
                    metrics.append(Metric(name=name, description=metric.description, unit=metric.unit, data=data))
            elif metric.kind in _NUMBER_KINDS:
                number_points = self._number_points(metric, now)
                if number_points:
                    metrics.append(number_metric(metric, number_points))
            # An observable metric's points come from chatobs.instruments.Instruments (its callback).
        return metrics

    def _number_points(self, metric: catalogue.Metric, now: int) -> list[NumberDataPoint]:
        combined = self._combined(metric.name)
        if combined is None:
            return [
                NumberDataPoint(cell.attributes, cell.start, now, cell.value, exemplars=[])  # type: ignore[union-attr]
                for cell in list(self._series.get(metric.name, {}).values())
            ]
        return [
            NumberDataPoint(split_key(key)[1], self._start, now, values[0], exemplars=[])
            for key, values in combined.items()
        ]

    def _histogram_points(self, metric: catalogue.Metric, now: int) -> list[HistogramDataPoint]:
        local = self._series.get(metric.name, {})
        combined = self._combined(metric.name)
        if combined is None:
            return [cell.point(now) for cell in list(local.values())]  # type: ignore[union-attr]
        points = []
        for key, values in combined.items():
            attributes = split_key(key)[1]
            # Exemplars are this process's own: they point at traces, and any worker's will do.
            cell = local.get(tuple(attributes.values()))
            exemplars = cell.exemplars if isinstance(cell, HistogramCell) else ()
            counts = [int(count) for count in values[2:]]
            # The count from the buckets, not its own slot: a scrape may read a file between an
            # observation's three writes, and `_count` must equal the `+Inf` bucket (OpenMetrics
            # parsers refuse the scrape otherwise), as prometheus_client's multiprocess mode does.
            points.append(
                _histogram_point(
                    attributes, self._start, now, counts, sum(counts), values[1], metric.buckets or (), exemplars
                )
            )
        return points


def number_metric(metric: catalogue.Metric, points: list[NumberDataPoint]) -> Metric:
    """A counter's or gauge's points as the catalogue's View gives them: a cumulative ``Sum``
    (monotonic for a counter, observable or not; not for an up-down counter), else a ``Gauge``."""
    data: Sum | Gauge
    if metric.kind in (Kind.GAUGE, Kind.OBSERVABLE_GAUGE):
        data = Gauge(data_points=points)
    else:
        monotonic = metric.kind in (Kind.COUNTER, Kind.OBSERVABLE_COUNTER)
        data = Sum(points, AggregationTemporality.CUMULATIVE, is_monotonic=monotonic)
    return Metric(name=metric.name, description=metric.description, unit=metric.unit, data=data)


def with_produced(
    data: MetricsData | None, produced: list[Metric], scope: InstrumentationScope, resource: Resource
) -> MetricsData | None:
    """``data`` with ``produced`` metrics added under ``scope`` (to its first resource)."""
    if not produced:
        return data
    if data is None or not data.resource_metrics:
        extra = ScopeMetrics(scope=scope, metrics=produced, schema_url="")
        return MetricsData(resource_metrics=[ResourceMetrics(resource=resource, scope_metrics=[extra], schema_url="")])
    first, *rest = data.resource_metrics
    # Join the scope's existing ScopeMetrics: exporters group by scope, and a second entry
    # for the same scope would replace the first (the OTLP encoder does exactly that).
    scopes = list(first.scope_metrics)
    for index, existing in enumerate(scopes):
        if existing.scope == scope:
            scopes[index] = ScopeMetrics(scope, [*existing.metrics, *produced], existing.schema_url)
            break
    else:
        scopes.append(ScopeMetrics(scope=scope, metrics=produced, schema_url=""))
    merged = ResourceMetrics(resource=first.resource, scope_metrics=scopes, schema_url=first.schema_url)
    return MetricsData(resource_metrics=[merged, *rest])
