"""Telemetry that never reaches the collector is counted, and waiting on a dead collector is bounded."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Sequence

import pytest
from opentelemetry.metrics import Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, MetricsData
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from chatobs import ConfigError, Telemetry, load_settings
from chatobs.provider import BoundedBatchSpanProcessor, ExportAccounting, ProducingExporter, PushReader
from tests.conftest import free_port
from tests.metrics_text import value


class StuckExporter(SpanExporter):
    """Blocks in export until released, then fails: a collector that hangs, then errors."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.batches: list[int] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.batches.append(len(spans))
        self.entered.set()
        self.release.wait(10)
        return SpanExportResult.FAILURE


def test_every_span_the_queue_has_no_room_for_is_counted_and_failed_exports_too():
    failures: Counter[str] = Counter()
    dropped: Counter[str] = Counter()
    accounting = ExportAccounting(lambda signal: failures.update([signal]),
                                  lambda reason, count: dropped.update({reason: count}))  # fmt: skip
    exporter = StuckExporter()
    processor = BoundedBatchSpanProcessor(exporter, max_queue_size=10, max_export_batch_size=10,
                                          schedule_delay_millis=3_600_000, accounting=accounting)  # fmt: skip
    provider = TracerProvider()
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("test")
    for _ in range(10):
        tracer.start_span("first").end()
    assert exporter.entered.wait(5), "a full batch is exported at once"
    for _ in range(25):  # the first batch is stuck in export: room for 10 more
        tracer.start_span("more").end()
    assert dropped == {"queue_full": 15}
    exporter.release.set()
    processor.force_flush()
    assert exporter.batches == [10], "after a failure the next batch is dropped without an attempt (backoff)"
    assert failures == {"traces": 2}
    assert dropped == {"queue_full": 15, "export_failed": 20}
    provider.shutdown()


def otlp_env(endpoint: str, **extra: str) -> dict[str, str]:
    return {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_METRICS_EXPORTER": "prometheus,otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, **extra}  # fmt: skip


def test_the_otlp_timeout_is_milliseconds_and_a_silent_collector_is_counted(blackhole):
    telemetry = Telemetry(load_settings(otlp_env(blackhole, OTEL_EXPORTER_OTLP_TIMEOUT="300")), service="gateway")
    telemetry.tracer.start_span("request").end()
    started = time.monotonic()
    # Read as seconds (what the Python exporters do with the variable), 300 would be five minutes.
    assert telemetry.force_flush(timeout_millis=5_000)
    assert time.monotonic() - started < 3
    text = telemetry.scrape()[2].decode()
    assert value(text, "chatobs_export_failures_total", signal="traces") == 1
    assert value(text, "chatobs_export_failures_total", signal="metrics") == 1
    assert value(text, "chatobs_spans_dropped_total", reason="export_failed") == 1
    telemetry.shutdown()


def test_shutdown_gives_up_on_a_silent_collector_after_its_timeout(blackhole):
    env = otlp_env(blackhole, OTEL_EXPORTER_OTLP_TIMEOUT="60000", CHATOBS_SHUTDOWN_TIMEOUT_SECONDS="1")
    telemetry = Telemetry(load_settings(env), service="gateway")
    telemetry.tracer.start_span("request").end()
    started = time.monotonic()
    telemetry.shutdown()
    assert time.monotonic() - started < 2.5


def test_a_shutdown_that_gives_up_leaves_no_export_retrying_behind(caplog):
    # Nothing listens there: every push is refused, and the OTLP exporters retry a refused push
    # with backoff until their timeout (here a minute), long after the shutdown stopped waiting.
    env = otlp_env(f"http://127.0.0.1:{free_port()}", OTEL_EXPORTER_OTLP_TIMEOUT="60000",
                   CHATOBS_SHUTDOWN_TIMEOUT_SECONDS="1")  # fmt: skip
    before = set(threading.enumerate())
    telemetry = Telemetry(load_settings(env), service="gateway")
    telemetry.tracer.start_span("request").end()
    started = time.monotonic()
    telemetry.shutdown()
    assert time.monotonic() - started < 2.5
    given_up = time.time()  # the clock of log records' `created`
    for thread in set(threading.enumerate()) - before:
        thread.join(timeout=2)
    left = [thread.name for thread in set(threading.enumerate()) - before]
    assert left == [], f"still running after the shutdown returned: {left}"
    retried_after = [record.getMessage() for record in caplog.records
                     if record.created - given_up > 0.5 and "retrying" in record.getMessage()]  # fmt: skip
    assert retried_after == []


def test_a_batch_larger_than_the_queue_is_a_config_error_naming_the_variable():
    with pytest.raises(ConfigError) as error:
        load_settings({"OTEL_BSP_MAX_QUEUE_SIZE": "100", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "500"})
    assert error.value.variables == ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE",)
    assert "must not exceed OTEL_BSP_MAX_QUEUE_SIZE (100)" in str(error.value)


class RefusingMetricExporter(MetricExporter):
    """A collector that is down: every push fails."""

    def __init__(self) -> None:
        super().__init__(preferred_temporality={})
        self.pushes = 0

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: object) -> MetricExportResult:
        self.pushes += 1
        return MetricExportResult.FAILURE

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: object) -> None:
        pass


def test_no_collection_for_a_push_to_a_collector_known_down():
    failures: Counter[str] = Counter()
    accounting = ExportAccounting(lambda signal: failures.update([signal]), lambda reason, count: None)
    exporter = RefusingMetricExporter()
    reader = PushReader(ProducingExporter(exporter, accounting=accounting), export_interval_millis=3_600_000)
    provider = MeterProvider(metric_readers=[reader])
    collections = []
    provider.get_meter("test").create_observable_gauge(
        "read", callbacks=[lambda options: collections.append(1) or [Observation(1)]]
    )
    reader.collect()  # the first push fails: the backoff starts (1 s)
    reader.collect()
    reader.collect()
    assert (len(collections), exporter.pushes, failures["metrics"]) == (1, 1, 3), "skipped, not collected, counted"
    time.sleep(1.1)
    reader.collect()  # after the backoff: collected and tried again
    assert (len(collections), exporter.pushes) == (2, 2)
    provider.shutdown()
