"""chatobs produces, for every metric of the catalogue, what the SDK would.

chatobs records counters, gauges and histograms in cells and reads observable metrics' callbacks
itself, handing the points to the readers at collection instead of through SDK instruments (a
series read through the SDK costs about 10 microseconds a collection). This checks the promise
that makes that safe: for the same recordings, the OTLP-shaped data (name, unit, description,
kind, monotonicity, temporality, attributes, values; a histogram's buckets, count, sum, min and
max) is what an SDK instrument with the catalogue's View gives, metric by metric.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from opentelemetry.metrics import Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, Metric

from chatobs import Telemetry, load_settings
from chatobs.catalogue import CATALOGUE, Kind, allowed_fixed_values
from chatobs.catalogue import Metric as CatalogueMetric
from chatobs.instruments import Instruments, views

NUMBER_METRICS = [metric for metric in CATALOGUE if metric.kind in (Kind.COUNTER, Kind.UP_DOWN, Kind.GAUGE)]


def _values(metric: CatalogueMetric, n: int) -> tuple[str, ...]:
    """Label values the policy admits as they are (the first allowed value, or a made-up one)."""
    values = []
    for label in metric.labels:
        allowed = sorted(allowed_fixed_values(metric, label))
        values.append(allowed[n % len(allowed)] if allowed else f"v{n}")
    return tuple(values)


def _shape(metric: Metric) -> dict[str, Any]:
    data = metric.data
    return {
        "name": metric.name,
        "unit": metric.unit,
        "description": metric.description,
        "kind": type(data).__name__,
        "monotonic": getattr(data, "is_monotonic", None),
        "temporality": getattr(data, "aggregation_temporality", None),
        "points": sorted((tuple(sorted(point.attributes.items())), point.value) for point in data.data_points),
    }


@pytest.mark.parametrize("metric", NUMBER_METRICS, ids=[metric.name for metric in NUMBER_METRICS])
def test_cells_produce_what_the_sdk_view_gives(metric):
    telemetry = Telemetry(load_settings({"CHATOBS_PROCESS_METRICS": "false"}), service="gateway")
    reader = InMemoryMetricReader()
    sdk = MeterProvider(metric_readers=[reader], views=views([metric])).get_meter("chatobs")
    recordings = [(_values(metric, n), amount) for n, amount in enumerate((3, 1, 4, 1, 5))]

    def attributes(values: tuple[str, ...]) -> dict[str, str]:
        return telemetry.labels.resolve(metric, values)[0]  # the label policy's answer, given to both

    if metric.kind is Kind.COUNTER:
        instrument = sdk.create_counter(metric.name, unit=metric.unit, description=metric.description)
        for values, amount in recordings:
            telemetry.cells.add(metric.name, amount, values)
            instrument.add(amount, attributes(values))
    elif metric.kind is Kind.UP_DOWN:
        instrument = sdk.create_up_down_counter(metric.name, unit=metric.unit, description=metric.description)
        for values, amount in recordings:
            telemetry.cells.move(metric.name, amount, values)
            instrument.add(amount, attributes(values))
    else:
        instrument = sdk.create_gauge(metric.name, unit=metric.unit, description=metric.description)
        for values, amount in recordings:
            telemetry.cells.set(metric.name, amount, values)
            instrument.set(amount, attributes(values))

    (produced,) = [m for m in telemetry.cells.produced_metrics() if m.name == metric.name]
    (collected,) = [m for rm in reader.get_metrics_data().resource_metrics for sm in rm.scope_metrics
                    for m in sm.metrics]  # fmt: skip
    assert _shape(produced) == _shape(collected)
    telemetry.shutdown()


HISTOGRAMS = [metric for metric in CATALOGUE if metric.kind is Kind.HISTOGRAM]


@pytest.mark.parametrize("metric", HISTOGRAMS, ids=[metric.name for metric in HISTOGRAMS])
def test_histogram_cells_produce_what_the_explicit_bucket_view_gives(metric):
    telemetry = Telemetry(load_settings({"CHATOBS_PROCESS_METRICS": "false"}), service="gateway")
    reader = InMemoryMetricReader()
    sdk = MeterProvider(metric_readers=[reader], views=views([metric])).get_meter("chatobs")
    instrument = sdk.create_histogram(metric.name, unit=metric.unit, description=metric.description)
    bounds = metric.buckets or ()
    # On a bound, between two, past the last, and zero: every kind of bucket edge.
    observations = [0.0, bounds[0], (bounds[0] + bounds[1]) / 2, bounds[-1], bounds[-1] * 3, bounds[2]]
    for n, value in enumerate(observations):
        values = _values(metric, n % 2)
        telemetry.cells.observe(metric.name, value, values)
        instrument.record(value, telemetry.labels.resolve(metric, values)[0])

    def shape(otel: Metric) -> dict[str, Any]:
        points = sorted(
            (tuple(sorted(p.attributes.items())), p.count, p.sum, tuple(p.bucket_counts), tuple(p.explicit_bounds),
             p.min, p.max)
            for p in otel.data.data_points
        )  # fmt: skip
        return {"name": otel.name, "unit": otel.unit, "description": otel.description, "kind": type(otel.data).__name__,
                "temporality": otel.data.aggregation_temporality, "points": points}  # fmt: skip

    (produced,) = [m for m in telemetry.cells.produced_metrics() if m.name == metric.name]
    (collected,) = [m for rm in reader.get_metrics_data().resource_metrics for sm in rm.scope_metrics
                    for m in sm.metrics]  # fmt: skip
    assert shape(produced) == shape(collected)
    telemetry.shutdown()


OBSERVABLES = [metric for metric in CATALOGUE if metric.kind in (Kind.OBSERVABLE_GAUGE, Kind.OBSERVABLE_COUNTER)]


@pytest.mark.parametrize("metric", OBSERVABLES, ids=[metric.name for metric in OBSERVABLES])
def test_observable_callbacks_produce_what_the_sdk_instrument_gives(metric):
    readings = [Observation(7, {"pid": "11", "stray": "dropped by the View"}), Observation(9, {"pid": "12"})]
    observables = Instruments([metric])
    observables.observe(metric.name, lambda options: readings)
    reader = InMemoryMetricReader()
    sdk = MeterProvider(metric_readers=[reader], views=views([metric])).get_meter("chatobs")
    create = sdk.create_observable_counter if metric.kind is Kind.OBSERVABLE_COUNTER else sdk.create_observable_gauge
    create(metric.name, callbacks=[lambda options: readings], unit=metric.unit, description=metric.description)

    (produced,) = observables.produced_metrics()
    (collected,) = [m for rm in reader.get_metrics_data().resource_metrics for sm in rm.scope_metrics
                    for m in sm.metrics]  # fmt: skip
    assert _shape(produced) == _shape(collected)


@pytest.mark.parametrize("openmetrics", [False, True], ids=["text", "openmetrics"])
@pytest.mark.parametrize("scope_labels", ["false", "true"])
def test_a_scrape_renders_the_cells_as_their_produced_points_render(openmetrics, scope_labels):
    """A scrape reads this process's cells and callbacks directly instead of producing
    data-model points first, and keeps a histogram series' lines until its count moves: the
    exposition is the one the produced points render, metric by metric, exemplars included,
    scrape after scrape."""
    from opentelemetry.sdk.trace import TracerProvider

    env = {"CHATOBS_PROCESS_METRICS": "false", "CHATOBS_EXPOSE_SCOPE_LABELS": scope_labels,
           "OTEL_METRICS_EXEMPLAR_FILTER": "always_on"}  # fmt: skip
    telemetry = Telemetry(load_settings(env), service="worker")
    tracer = TracerProvider().get_tracer("test")
    for n in range(3):
        for metric in NUMBER_METRICS:
            if metric.kind is Kind.COUNTER:
                telemetry.cells.add(metric.name, n + 1, _values(metric, n))
            elif metric.kind is Kind.UP_DOWN:
                telemetry.cells.move(metric.name, n - 1, _values(metric, n))
            else:
                telemetry.cells.set(metric.name, n * 1.5, _values(metric, n))
        for metric in HISTOGRAMS:
            with tracer.start_as_current_span("observed"):
                telemetry.cells.observe(metric.name, (metric.buckets or (1.0,))[n] * 0.9, _values(metric, n % 2))
    telemetry.cells.observe("llm_latency_seconds", 0.3, ("bad value that is not a model",) * 3)  # a rejected label
    for metric in OBSERVABLES:  # a stray attribute the View drops; an attribute set read twice, the last kept
        readings = [Observation(7, {"pid": "11", "stray": "x"}), Observation(9, {"pid": "12"}),
                    Observation(4, {"pid": "12"})]  # fmt: skip
        telemetry.instruments.observe(metric.name, lambda options, readings=readings: readings)
    for round_ in range(3):
        for each in (openmetrics, not openmetrics):  # the other format in between, on the same renderer
            direct = telemetry.scrape("application/openmetrics-text" if each else None)[2].decode()
            through_points = telemetry._renderer.render(telemetry._with_produced(None), each)
            assert direct == through_points, f"scrape {round_ + 1}, {'OpenMetrics' if each else 'text'}"
        with tracer.start_as_current_span("observed again"):  # one series moves, the others keep their lines
            telemetry.cells.observe(HISTOGRAMS[0].name, 2.5 + round_, _values(HISTOGRAMS[0], 0))
    direct = telemetry.scrape("application/openmetrics-text" if openmetrics else None)[2].decode()
    assert "_bucket{" in direct and (" # {trace_id=" in direct) is openmetrics
    assert re.search(r"^outbox_pending(\{[^}]*\})? 4$", direct, re.MULTILINE) and "stray" not in direct
    telemetry.shutdown()
