"""The catalogue's Views, and the observable metrics chatobs reads by callback at collection.

Example::

    >>> from opentelemetry.metrics import Observation
    >>> from opentelemetry.sdk.metrics import MeterProvider
    >>> provider = MeterProvider(views=views())        # the roadmap's buckets and label keys
    >>> observables = Instruments()
    >>> observables.observe("outbox_pending", lambda options: [Observation(3)])
    >>> [point.value for point in observables.produced_metrics()[0].data.data_points]  # at collection
    [3]
    >>> observables.readings()                         # at a scrape: the observations, kept as the View would
    {'outbox_pending': [Observation(value=3, attributes=None, context=None)]}
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics.export import Metric, NumberDataPoint
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View

from chatobs.catalogue import CATALOGUE, PROCESS_LABEL, Combine, Kind
from chatobs.catalogue import Metric as CatalogueMetric
from chatobs.cells import number_metric
from chatobs.labels import series_bound
from chatobs.settings import ChatobsSettings

__all__ = ["OBSERVABLE_KINDS", "SDK_HAS_CARDINALITY_LIMIT", "Instruments", "ObservableCallback", "views"]

_logger = logging.getLogger("chatobs")

ObservableCallback = Callable[[CallbackOptions], Iterable[Observation]]
#: Metrics read by a callback at collection (the others are recorded in cells).
OBSERVABLE_KINDS = frozenset({Kind.OBSERVABLE_GAUGE, Kind.OBSERVABLE_COUNTER})


#: Whether the installed SDK's View takes a per-stream cardinality limit (the specification's
#: ``aggregation_cardinality_limit``; SDKs that have one default it to 2000 and fold the rest
#: into one ``otel.metric.overflow=true`` series).
SDK_HAS_CARDINALITY_LIMIT = "aggregation_cardinality_limit" in inspect.signature(View).parameters


def views(metrics: Iterable[CatalogueMetric] = CATALOGUE, settings: ChatobsSettings | None = None) -> list[View]:
    """One View per catalogue metric: only the catalogue's label keys (and ``pid`` on
    per-process metrics), so a stray attribute can never add series, and a histogram's
    explicit buckets from the roadmap. An SDK instrument under a catalogue name (another
    meter's on the same provider) gets exactly what the catalogue says; chatobs's own
    recordings skip the SDK's aggregation, and produce the points these Views give
    (:meth:`chatobs.cells.CellStore.produced_metrics`, :meth:`Instruments.produced_metrics`;
    ``tests/unit/test_produced.py`` holds them to it).

    The label policy bounds every metric's series (``other`` takes the overflow, counted in
    ``chatobs_label_rejections_total``), and that bound can exceed an SDK's default
    cardinality limit (51 models x 51 providers x 3 modes = 7803 > 2000). With an SDK that
    has the limit, each View gets the catalogue's bound (plus the SDK's own overflow slot),
    so the SDK never folds a series silently; the installed SDK has no limit at all.
    """
    settings = settings or ChatobsSettings.model_validate({})  # the defaults, not os.environ
    result = []
    for metric in metrics:
        options: dict[str, Any] = {}
        if SDK_HAS_CARDINALITY_LIMIT:
            options["aggregation_cardinality_limit"] = series_bound(metric, settings) + 1
        if metric.buckets is not None:
            options["aggregation"] = ExplicitBucketHistogramAggregation(boundaries=metric.buckets)
        result.append(View(instrument_name=metric.name, attribute_keys=_attribute_keys(metric), **options))
    return result


def _attribute_keys(metric: CatalogueMetric) -> set[str]:
    keys = set(metric.label_names)
    if metric.combine is Combine.PER_PROCESS:
        keys.add(PROCESS_LABEL)
    return keys


class Instruments:
    """The catalogue's observable metrics (read by a callback at collection: process metrics,
    backlog gauges), looked up by metric name.

    A callback is what an OpenTelemetry observable instrument takes, ``(CallbackOptions) ->
    Observations``; chatobs calls it at each collection itself and keeps what the catalogue's
    View would (:meth:`readings`, which a scrape renders as they are), or produces the points
    that View gives (:meth:`produced_metrics`, for OTLP): an SDK observable instrument costs
    about 10 microseconds a series at every collection, most of a small service's scrape.
    A callback that raises reports nothing that collection (logged once per metric).
    """

    def __init__(self, metrics: Iterable[CatalogueMetric] = CATALOGUE):
        self._metrics = {metric.name: metric for metric in metrics if metric.kind in OBSERVABLE_KINDS}
        self._keys = {name: _attribute_keys(metric) for name, metric in self._metrics.items()}
        self._callbacks: dict[str, ObservableCallback] = {}
        self._failing: set[str] = set()
        self._start = time.time_ns()

    def observe(self, name: str, callback: ObservableCallback) -> None:
        """Make ``callback`` the source of observable metric ``name`` (replacing any earlier one)."""
        if name not in self._metrics:
            raise KeyError(f"{name!r} is not an observable metric of this catalogue")
        self._callbacks[name] = callback

    def produced_metrics(self) -> list[Metric]:
        """Every registered callback's observations now: cumulative monotonic ``Sum`` points for
        an observable counter, ``Gauge`` points for an observable gauge."""
        now = time.time_ns()
        return [
            number_metric(self._metrics[name], [NumberDataPoint(observation.attributes or {}, self._start, now,
                                                                observation.value, exemplars=[])
                                                for observation in observations])
            for name, observations in self.readings().items()
        ]  # fmt: skip

    def readings(self) -> dict[str, list[Observation]]:
        """Every registered callback's observations now, by metric name, as the catalogue's View
        keeps them: only its label keys, one observation per attribute set (the last, as in the
        SDK). A scrape renders these as they are; :meth:`produced_metrics` makes points of them.

        Example::

            >>> observables = Instruments()
            >>> observables.observe("outbox_pending", lambda options: [Observation(3)])
            >>> observables.readings()
            {'outbox_pending': [Observation(value=3, attributes=None, context=None)]}
        """
        options = CallbackOptions()
        readings = {}
        for name, callback in list(self._callbacks.items()):
            try:
                kept = self._kept(name, list(callback(options)))
            except Exception:  # one failing reading never fails the scrape
                if name not in self._failing:
                    self._failing.add(name)
                    _logger.warning("chatobs: reading %s failed; it reports nothing while it fails", name,
                                    exc_info=True)  # fmt: skip
                continue
            self._failing.discard(name)
            if kept:
                readings[name] = kept
        return readings

    def _kept(self, name: str, observations: list[Observation]) -> list[Observation]:
        if len(observations) == 1 and not observations[0].attributes:
            return observations  # a process-wide reading: most of them, at every scrape
        keys = self._keys[name]
        kept = {}
        for observation in observations:
            attributes = {k: v for k, v in (observation.attributes or {}).items() if k in keys}
            # A sequence is a valid attribute value (the SDK keeps it as a tuple): hashable here too.
            identity = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in attributes.items()))
            kept[identity] = Observation(observation.value, attributes)
        return list(kept.values())
