"""OpenTelemetry instruments and Views, derived from the catalogue.

Example::

    >>> from opentelemetry.sdk.metrics import MeterProvider
    >>> instruments = Instruments(MeterProvider(views=views()).get_meter("chatobs"), cells)
    >>> instruments.observe("outbox_pending", lambda options: [Observation(3)])
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics.view import View

from chatobs.catalogue import CATALOGUE, PROCESS_LABEL, Combine, Kind, Metric
from chatobs.cells import CellStore
from chatobs.labels import series_bound
from chatobs.settings import ChatobsSettings

__all__ = ["SDK_HAS_CARDINALITY_LIMIT", "Instruments", "ObservableCallback", "views"]

ObservableCallback = Callable[[CallbackOptions], Iterable[Observation]]


#: Whether the installed SDK's View takes a per-stream cardinality limit (the specification's
#: ``aggregation_cardinality_limit``; SDKs that have one default it to 2000 and fold the rest
#: into one ``otel.metric.overflow=true`` series).
SDK_HAS_CARDINALITY_LIMIT = "aggregation_cardinality_limit" in inspect.signature(View).parameters


def views(metrics: Iterable[Metric] = CATALOGUE, settings: ChatobsSettings | None = None) -> list[View]:
    """One View per catalogue metric the SDK aggregates, keeping only the catalogue's label
    keys (and ``pid`` on per-process metrics), so a stray attribute can never add series.
    Histograms are recorded in cells and have no SDK instrument (their buckets come from the
    catalogue there), so no View.

    The label policy bounds every metric's series (``other`` takes the overflow, counted in
    ``chatobs_label_rejections_total``), and that bound can exceed an SDK's default
    cardinality limit (51 models x 51 providers x 3 modes = 7803 > 2000). With an SDK that
    has the limit, each View gets the catalogue's bound (plus the SDK's own overflow slot),
    so the SDK never folds a series silently; the installed SDK has no limit at all.
    """
    settings = settings or ChatobsSettings.model_validate({})  # the defaults, not os.environ
    result = []
    for metric in metrics:
        if metric.kind is Kind.HISTOGRAM:
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
    """Every catalogue instrument, created on one Meter, looked up by metric name.

    Counters, gauges and histograms are recorded in ``cells`` (:mod:`chatobs.cells`): a counter
    or gauge is an observable instrument reading its cells, a histogram has no SDK instrument
    (its points are produced from the cells at collection). Other observable instruments call the callback
    registered for them with :meth:`observe`; until then they report nothing.
    """

    def __init__(self, meter: Meter, cells: CellStore, metrics: Iterable[Metric] = CATALOGUE):
        self._instruments: dict[str, Any] = {}
        self._callbacks: dict[str, ObservableCallback] = {}
        self._cells = cells
        for metric in metrics:
            if metric.kind is Kind.HISTOGRAM:
                continue  # produced by the cells at collection
            self._instruments[metric.name] = self._create(meter, metric)

    def _create(self, meter: Meter, metric: Metric) -> Any:
        common = {"name": metric.name, "unit": metric.unit, "description": metric.description}
        if metric.kind is Kind.COUNTER:
            return meter.create_observable_counter(**common, callbacks=[self._cells.counter_callback(metric.name)])
        if metric.kind is Kind.UP_DOWN:
            read = self._cells.gauge_callback(metric.name)
            return meter.create_observable_up_down_counter(**common, callbacks=[read])
        if metric.kind is Kind.GAUGE:
            return meter.create_observable_gauge(**common, callbacks=[self._cells.gauge_callback(metric.name)])
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

    def observe(self, name: str, callback: ObservableCallback) -> None:
        """Make ``callback`` the source of observable metric ``name`` (replacing any earlier one)."""
        if name not in self._instruments:
            raise KeyError(f"{name!r} is not an instrument of this catalogue")
        self._callbacks[name] = callback
