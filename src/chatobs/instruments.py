"""OpenTelemetry instruments and Views, derived from the catalogue.

Example::

    >>> from opentelemetry.sdk.metrics import MeterProvider
    >>> instruments = Instruments(MeterProvider(views=views()).get_meter("chatobs"))
    >>> instruments.observe("outbox_pending", lambda options: [Observation(3)])
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics.view import View

from chatobs.catalogue import CATALOGUE, PROCESS_LABEL, Combine, Kind, Metric
from chatobs.labels import series_bound
from chatobs.settings import ChatobsSettings

__all__ = ["OBSERVABLE_KINDS", "SDK_HAS_CARDINALITY_LIMIT", "Instruments", "ObservableCallback", "views"]

ObservableCallback = Callable[[CallbackOptions], Iterable[Observation]]
#: Metrics read by a callback at collection: the only ones with an SDK instrument.
OBSERVABLE_KINDS = frozenset({Kind.OBSERVABLE_GAUGE, Kind.OBSERVABLE_COUNTER})


#: Whether the installed SDK's View takes a per-stream cardinality limit (the specification's
#: ``aggregation_cardinality_limit``; SDKs that have one default it to 2000 and fold the rest
#: into one ``otel.metric.overflow=true`` series).
SDK_HAS_CARDINALITY_LIMIT = "aggregation_cardinality_limit" in inspect.signature(View).parameters


def views(metrics: Iterable[Metric] = CATALOGUE, settings: ChatobsSettings | None = None) -> list[View]:
    """One View per catalogue metric the SDK aggregates (those read by a callback: process
    metrics, backlog gauges), keeping only the catalogue's label keys (and ``pid`` on
    per-process metrics), so a stray attribute can never add series. Counters, gauges and
    histograms recorded in cells have no SDK instrument: the cells produce the points this
    View would give (:meth:`chatobs.cells.CellStore.produced_metrics`).

    The label policy bounds every metric's series (``other`` takes the overflow, counted in
    ``chatobs_label_rejections_total``), and that bound can exceed an SDK's default
    cardinality limit (2000). With an SDK that has the limit, each View gets the catalogue's
    bound (plus the SDK's own overflow slot), so the SDK never folds a series silently; the
    installed SDK has no limit at all.
    """
    settings = settings or ChatobsSettings.model_validate({})  # the defaults, not os.environ
    result = []
    for metric in metrics:
        if metric.kind not in OBSERVABLE_KINDS:
            continue
        limit: dict[str, int] = {}
        if SDK_HAS_CARDINALITY_LIMIT:
            limit["aggregation_cardinality_limit"] = series_bound(metric, settings) + 1
        result.append(View(instrument_name=metric.name, attribute_keys=_attribute_keys(metric), **limit))
    return result


def _attribute_keys(metric: Metric) -> set[str]:
    keys = set(metric.label_names)
    if metric.combine is Combine.PER_PROCESS:
        keys.add(PROCESS_LABEL)
    return keys


class Instruments:
    """The catalogue's observable instruments (metrics read by a callback at collection),
    created on one Meter, looked up by metric name.

    Counters, gauges and histograms are recorded in ``cells`` (:mod:`chatobs.cells`) and need
    no instrument: the cells produce their points at collection. An observable metric's
    instrument is created when :meth:`observe` registers its callback (or, with
    ``create=False``, when :meth:`ensure` is called at its first reading): each instrument
    costs every collection a callback and a pass through the SDK's storage even with no data.
    """

    def __init__(self, meter: Meter, metrics: Iterable[Metric] = CATALOGUE):
        self._meter = meter
        self._metrics = {metric.name: metric for metric in metrics if metric.kind in OBSERVABLE_KINDS}
        self._instruments: dict[str, Any] = {}
        self._callbacks: dict[str, ObservableCallback] = {}
        self._creating = threading.Lock()

    def ensure(self, name: str) -> None:
        """Create the instrument of observable metric ``name`` if it does not exist yet. Never
        call it holding a lock a collection callback takes: creating an instrument waits for a
        collection in progress."""
        if name in self._instruments or name not in self._metrics:
            return
        with self._creating:
            if name not in self._instruments:
                self._instruments[name] = self._create(self._meter, self._metrics[name])

    def _create(self, meter: Meter, metric: Metric) -> Any:
        common = {"name": metric.name, "unit": metric.unit, "description": metric.description}
        callback = self._dispatcher(metric.name)
        if metric.kind is Kind.OBSERVABLE_GAUGE:
            return meter.create_observable_gauge(**common, callbacks=[callback])
        return meter.create_observable_counter(**common, callbacks=[callback])

    def _dispatcher(self, name: str) -> ObservableCallback:
        def dispatch(options: CallbackOptions) -> Iterable[Observation]:
            callback = self._callbacks.get(name)
            return callback(options) if callback else ()

        return dispatch

    def __getitem__(self, name: str) -> Any:
        return self._instruments[name]

    def observe(self, name: str, callback: ObservableCallback, *, create: bool = True) -> None:
        """Make ``callback`` the source of observable metric ``name`` (replacing any earlier one);
        ``create=False``: only once :meth:`ensure` creates the instrument (the first reading)."""
        if name not in self._metrics:
            raise KeyError(f"{name!r} is not an instrument of this catalogue")
        self._callbacks[name] = callback
        if create:
            self.ensure(name)
