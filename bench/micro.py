"""Micro-benchmarks, measured side by side in one process: chatobs vs prometheus_client (and,
for an OTLP push, vs the OpenTelemetry SDK's own instruments).

Each comparison alternates the contenders over several rounds and keeps the best round of
each (the least disturbed by this noisy machine); the ratio is chatobs / baseline.

chatobs records into its own cells; the scrape renders them, and an OTLP push produces them
as the SDK's data points (the catalogue's Views) at collection time. Pass ``env`` (a
:func:`discard.discarding_receiver` environment) to record with the push configured, as a
service that ships to a collector does; :func:`push` times the push itself.
"""

from __future__ import annotations

import gc
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from chatobs import Telemetry, load_settings
from chatobs.catalogue import LATENCY_BUCKETS

MODELS = ("sim-large", "sim-small", "gpt-4o-mini")


@dataclass
class Comparison:
    name: str
    ours: float
    baseline: float
    unit: str = "ns/op"

    @property
    def ratio(self) -> float:
        return self.ours / self.baseline


def best_of(rounds: int, *contenders: Callable[[], float]) -> list[float]:
    """Run the contenders alternately ``rounds`` times; the best (lowest) figure of each."""
    best = [float("inf")] * len(contenders)
    for _ in range(rounds):
        for index, contender in enumerate(contenders):
            gc.collect()
            best[index] = min(best[index], contender())
    return best


def per_op(operation: Callable[[int], None], iterations: int) -> Callable[[], float]:
    def run() -> float:
        started = time.perf_counter_ns()
        operation(iterations)
        return (time.perf_counter_ns() - started) / iterations

    return run


def telemetry(**env: str) -> Telemetry:
    return Telemetry(load_settings({"CHATOBS_PROCESS_METRICS": "false", **env}), service="worker")


def recording(iterations: int, rounds: int, env: dict[str, str] | None = None) -> Comparison:
    ours = telemetry(**(env or {}))
    request = ours.llm.request
    registry = CollectorRegistry()
    labels = Counter("llm_requests", "LLM requests sent.", ["model", "provider", "mode"], registry=registry).labels

    def chatobs_loop(n: int) -> None:
        for i in range(n):
            request(MODELS[i % 3], "simulator", "normal")

    def prometheus_loop(n: int) -> None:
        for i in range(n):
            labels(MODELS[i % 3], "simulator", "normal").inc()

    a, b = best_of(rounds, per_op(chatobs_loop, iterations), per_op(prometheus_loop, iterations))
    ours.shutdown()
    return Comparison("counter: helper vs labels().inc()", a, b)


def histogram(iterations: int, rounds: int, env: dict[str, str] | None = None) -> Comparison:
    ours = telemetry(**(env or {}))
    latency = ours.llm.latency
    registry = CollectorRegistry()
    labels = Histogram("llm_latency_seconds", "LLM latency.", ["model", "provider", "mode"],
                       buckets=LATENCY_BUCKETS, registry=registry).labels  # fmt: skip

    def chatobs_loop(n: int) -> None:
        for i in range(n):
            latency(0.3, MODELS[i % 3], "simulator", "normal")

    def prometheus_loop(n: int) -> None:
        for i in range(n):
            labels(MODELS[i % 3], "simulator", "normal").observe(0.3)

    a, b = best_of(rounds, per_op(chatobs_loop, iterations), per_op(prometheus_loop, iterations))
    ours.shutdown()
    return Comparison("histogram: helper vs labels().observe()", a, b)


def populated(series: int) -> tuple[Telemetry, CollectorRegistry, Callable[[], None], Callable[[], None]]:
    """The same data in both: ``series`` counter series and ``series // 10`` histogram series;
    and for each, a function observing once more into every histogram series."""
    ours = telemetry(CHATOBS_MAX_LABEL_VALUES=str(max(series, 10)))
    registry = CollectorRegistry()
    counter = Counter("llm_requests", "LLM requests sent.", ["model", "provider", "mode"], registry=registry)
    hist = Histogram("llm_latency_seconds", "LLM latency.", ["model", "provider", "mode"], buckets=LATENCY_BUCKETS,
                     registry=registry)  # fmt: skip
    for i in range(series):
        ours.llm.request(f"model-{i}", "simulator", "normal")
        counter.labels(f"model-{i}", "simulator", "normal").inc()
    models = [f"model-{i}" for i in range(max(1, series // 10))]
    children = [hist.labels(model, "simulator", "normal") for model in models]

    def observe_ours() -> None:
        for model in models:
            ours.llm.latency(0.3, model, "simulator", "normal")

    def observe_theirs() -> None:
        for child in children:
            child.observe(0.3)

    observe_ours()
    observe_theirs()
    return ours, registry, observe_ours, observe_theirs


def _without_created(registry: CollectorRegistry) -> bytes:
    """``generate_latest`` without the ``_created`` series (``PROMETHEUS_DISABLE_CREATED_SERIES``),
    which chatobs does not write: a third of prometheus_client's lines at these label sets."""
    prometheus_client.disable_created_metrics()
    try:
        return generate_latest(registry)
    finally:
        prometheus_client.enable_created_metrics()


def scrape(series: int, rounds: int, changed: bool = False) -> tuple[Comparison, Comparison, Comparison, Comparison]:
    """``/metrics`` time and bytes at ``series`` series, against ``generate_latest`` as it is
    and without its ``_created`` series. ``changed``: every histogram series observed once
    more before each scrape (outside the timing), so no series' lines are the ones the last
    scrape rendered (chatobs keeps a histogram series' lines until it moves)."""
    ours, registry, observe_ours, observe_theirs = populated(series)
    ours_body = ours.scrape()[2]
    theirs_body = generate_latest(registry)
    lean_body = _without_created(registry)

    # Small scrapes take a few ms: several per round, so one scheduler hiccup does not decide the round.
    repeat = max(1, 2_000 // series)

    def timed(scrape_once: Callable[[], object], observe: Callable[[], None]) -> Callable[[], float]:
        def run() -> float:
            spent = 0
            for _ in range(repeat):
                if changed:
                    observe()
                started = time.perf_counter_ns()
                scrape_once()
                spent += time.perf_counter_ns() - started
            return float(spent) / repeat

        return run

    a, b, c = best_of(rounds, timed(ours.scrape, observe_ours),
                      timed(lambda: generate_latest(registry), observe_theirs),
                      timed(lambda: _without_created(registry), observe_theirs))  # fmt: skip
    ours.shutdown()
    moved = ", every histogram series moved" if changed else ", nothing moved"
    return (Comparison(f"/metrics time at {series} series{moved}", a / 1e6, b / 1e6, "ms"),
            Comparison(f"/metrics bytes at {series} series", len(ours_body), len(theirs_body), "bytes"),
            Comparison(f"/metrics time at {series} series{moved}, baseline without _created", a / 1e6, c / 1e6, "ms"),
            Comparison(f"/metrics bytes at {series} series, baseline without _created", len(ours_body),
                       len(lean_body), "bytes"))  # fmt: skip


def push(series: int, rounds: int, receiver: dict[str, str]) -> Comparison:
    """One OTLP metric push (collection, encoding, the POST) of ``series`` counter series and
    ``series // 10`` histogram series: chatobs's cells produced as data points, against the
    OpenTelemetry SDK's own ``Counter`` and ``Histogram`` holding the same series, both through
    the SDK's OTLP/HTTP exporter to ``receiver`` (:func:`discard.discarding_receiver`)."""
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View

    endpoint = receiver["OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"]
    # Push only: a scrape reader would be collected by the flush too, and the baseline has none.
    ours = telemetry(**{**receiver, "OTEL_METRICS_EXPORTER": "otlp"}, CHATOBS_MAX_LABEL_VALUES=str(max(series, 10)))
    reader = PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=endpoint), export_interval_millis=3_600_000)
    buckets = View(
        instrument_name="llm_latency_seconds", aggregation=ExplicitBucketHistogramAggregation(LATENCY_BUCKETS)
    )
    sdk = MeterProvider(metric_readers=[reader], views=[buckets], shutdown_on_exit=False)
    meter = sdk.get_meter("baseline")
    counter, hist = meter.create_counter("llm_requests_total"), meter.create_histogram("llm_latency_seconds", unit="s")
    for i in range(series):
        ours.llm.request(f"model-{i}", "simulator", "normal")
        counter.add(1, {"model": f"model-{i}", "provider": "simulator", "mode": "normal"})
    for i in range(max(1, series // 10)):
        ours.llm.latency(0.3, f"model-{i}", "simulator", "normal")
        hist.record(0.3, {"model": f"model-{i}", "provider": "simulator", "mode": "normal"})

    def timed(flush: Callable[[], object]) -> Callable[[], float]:
        def run() -> float:
            started = time.perf_counter_ns()
            flush()
            return float(time.perf_counter_ns() - started)

        return run

    # The meter provider's own flush, as the SDK's: Telemetry.force_flush adds a thread (its
    # time bound) and the spans' flush.
    a, b = best_of(rounds, timed(ours.meter_provider.force_flush), timed(sdk.force_flush))
    ours.shutdown()
    sdk.shutdown()
    return Comparison(f"OTLP metric push of {series} series, vs the OpenTelemetry SDK's own instruments", a / 1e6,
                      b / 1e6, "ms")  # fmt: skip


def memory_per_series(series: int = 5000) -> Comparison:
    def measure(build: Callable[[], object]) -> float:
        gc.collect()
        tracemalloc.start()
        keep = build()
        current, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        del keep
        return current / series

    def ours() -> object:
        t, _ = populated_ours_only(series)
        t.scrape()  # the SDK allocates its storage per series on first collection too
        return t

    def theirs() -> object:
        registry = CollectorRegistry()
        counter = Counter("llm_requests", "h", ["model", "provider", "mode"], registry=registry)
        for i in range(series):
            counter.labels(f"model-{i}", "simulator", "normal").inc()
        return registry

    return Comparison(f"memory per counter series ({series})", measure(ours), measure(theirs), "bytes")


def populated_ours_only(series: int) -> tuple[Telemetry, None]:
    ours = telemetry(CHATOBS_MAX_LABEL_VALUES=str(series))
    for i in range(series):
        ours.llm.request(f"model-{i}", "simulator", "normal")
    return ours, None


__all__ = ["Comparison", "histogram", "memory_per_series", "prometheus_client", "push", "recording", "scrape"]
