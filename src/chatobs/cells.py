"""The recording hot path: one cell per label set, aggregated cheaply, read at collection time.

The OpenTelemetry SDK's synchronous ``Counter.add`` costs several times prometheus_client's
``labels(...).inc()`` (it rebuilds the attribute key and walks the view machinery on every
call). Here a recording is a dict lookup of a bound cell and an add under that cell's
lock, as in prometheus_client; the SDK gets the data when it collects:

* counter cells are read by an observable counter's callback (cumulative values), so
  Views, the Prometheus reader and OTLP push see an ordinary OpenTelemetry counter;
* histogram cells (the SDK has no observable histogram) become ``HistogramDataPoint``\\ s
  with the catalogue's buckets, handed to each reader by :func:`with_produced`; each
  bucket keeps its latest exemplar (trace and span id of a sampled span).

Label values are validated once per distinct raw tuple (``LabelPolicy``) and the bound
cell is cached under that tuple.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import Exemplar
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricsData,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from chatobs import catalogue
from chatobs.labels import LabelPolicy

__all__ = ["CellStore", "CounterCell", "HistogramCell", "exemplar_sampler", "with_produced"]

#: Distinct raw label tuples cached per metric (validation still bounds the series beyond it).
_CACHE_LIMIT = 4096


class CounterCell:
    __slots__ = ("_lock", "attributes", "value")

    def __init__(self, attributes: dict[str, str]):
        self.attributes = attributes
        self.value: float = 0
        self._lock = threading.Lock()

    def add(self, amount: float) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        with self._lock:
            self.value += amount


class HistogramCell:
    __slots__ = ("_bounds", "_lock", "attributes", "count", "counts", "exemplars", "start", "sum")

    def __init__(self, attributes: dict[str, str], bounds: Sequence[float]):
        self.attributes = attributes
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.count = 0
        self.sum: float = 0.0
        self.exemplars: list[Exemplar | None] = [None] * (len(bounds) + 1)
        self.start = time.time_ns()
        self._lock = threading.Lock()

    def observe(self, value: float, exemplar_span: trace.SpanContext | None) -> None:
        index = bisect_left(self._bounds, value)  # buckets are upper-inclusive, as Prometheus's `le`
        with self._lock:
            self.counts[index] += 1
            self.count += 1
            self.sum += value
        if exemplar_span is not None:
            self.exemplars[index] = Exemplar(
                {}, value, time.time_ns(), span_id=exemplar_span.span_id, trace_id=exemplar_span.trace_id
            )

    def point(self, now: int) -> HistogramDataPoint:
        with self._lock:
            counts, count, total = list(self.counts), self.count, self.sum
        return HistogramDataPoint(
            attributes=self.attributes,
            start_time_unix_nano=self.start,
            time_unix_nano=now,
            count=count,
            sum=total,
            bucket_counts=counts,
            explicit_bounds=list(self._bounds),
            min=float("nan"),
            max=float("nan"),
            exemplars=[exemplar for exemplar in self.exemplars if exemplar is not None],
        )


Cell = CounterCell | HistogramCell
ExemplarSampler = Callable[[Context | None], "trace.SpanContext | None"]


def exemplar_sampler(filter_name: str) -> ExemplarSampler:
    """Which span context (if any) a histogram observation keeps as its bucket's exemplar
    (``OTEL_METRICS_EXEMPLAR_FILTER``: ``trace_based``, ``always_on``, ``always_off``)."""
    if filter_name == "always_off":
        return lambda context: None

    def sample(context: Context | None) -> trace.SpanContext | None:
        span_context = trace.get_current_span(context).get_span_context()
        if not span_context.is_valid:
            return None
        if filter_name == "always_on" or span_context.trace_flags.sampled:
            return span_context
        return None

    return sample


class CellStore:
    """Bound cells of every catalogue counter and histogram, for one Telemetry."""

    def __init__(self, labels: LabelPolicy, on_reject: Callable[[str, str], None], exemplar_filter: str):
        self._labels = labels
        self._on_reject = on_reject
        self._sample_exemplar = exemplar_sampler(exemplar_filter)
        # Hot-path cache: name -> raw label values -> (cell, labels of those values that were rejected).
        self._bound: dict[str, dict[tuple[str, ...], tuple[Cell, tuple[str, ...]]]] = {}
        # name -> resolved label values -> cell: raw values that resolve alike (two unknown
        # models both become `other`) share one cell, so one series.
        self._series: dict[str, dict[tuple[str, ...], Cell]] = {}
        self._lock = threading.Lock()

    # -- recording ------------------------------------------------------------------
    def add(self, name: str, amount: float, values: tuple[str, ...]) -> None:
        bound = self._bound.get(name)
        entry = bound.get(values) if bound is not None else None
        cell, rejected = entry if entry is not None else self._bind(name, values)
        if rejected:
            self._report(name, rejected)
        cell.add(amount)  # type: ignore[union-attr]

    def observe(self, name: str, value: float, values: tuple[str, ...], context: Context | None = None) -> None:
        bound = self._bound.get(name)
        entry = bound.get(values) if bound is not None else None
        cell, rejected = entry if entry is not None else self._bind(name, values)
        if rejected:
            self._report(name, rejected)
        cell.observe(value, self._sample_exemplar(context))  # type: ignore[union-attr]

    def _report(self, name: str, rejected: tuple[str, ...]) -> None:
        for label in rejected:
            self._on_reject(name, label)

    def _bind(self, name: str, values: tuple[str, ...]) -> tuple[Cell, tuple[str, ...]]:
        metric = catalogue.get(name)
        attributes, rejected = self._labels.resolve(metric, values)
        with self._lock:
            series = self._series.setdefault(name, {})
            key = tuple(attributes.values())
            cell = series.get(key)
            if cell is None:
                cell = HistogramCell(attributes, metric.buckets) if metric.buckets else CounterCell(attributes)
                series[key] = cell
            bound = self._bound.setdefault(name, {})
            if len(bound) < _CACHE_LIMIT:
                bound[values] = (cell, rejected)
            return cell, rejected

    # -- collection --------------------------------------------------------------------
    def counter_callback(self, name: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        """The observable counter's callback: every series' cumulative value."""

        def observe(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(cell.value, cell.attributes) for cell in list(self._series.get(name, {}).values())]

        return observe

    def histogram_metrics(self) -> list[Metric]:
        """Every histogram's points, in the SDK's data model (cumulative)."""
        now = time.time_ns()
        metrics = []
        for name, series in list(self._series.items()):
            metric = catalogue.get(name)
            if metric.buckets is None or not series:
                continue
            points = [cell.point(now) for cell in list(series.values())]  # type: ignore[union-attr]
            data = Histogram(data_points=points, aggregation_temporality=AggregationTemporality.CUMULATIVE)
            metrics.append(Metric(name=name, description=metric.description, unit=metric.unit, data=data))
        return metrics


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
