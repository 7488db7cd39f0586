"""The cells produce, for every counter and gauge of the catalogue, what the SDK would.

chatobs records counters and gauges in cells and hands their points to the readers at
collection instead of through SDK instruments (a series read through the SDK costs about 10
microseconds a collection). This checks the promise that makes that safe: for the same
recordings, the OTLP-shaped data (name, unit, description, kind, monotonicity, temporality,
attributes, values) is what an SDK instrument with the catalogue's View gives, metric by metric.
"""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, Metric

from chatobs import Telemetry, load_settings
from chatobs.catalogue import CATALOGUE, Kind, allowed_fixed_values
from chatobs.catalogue import Metric as CatalogueMetric
from chatobs.instruments import views

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
