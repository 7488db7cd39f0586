"""Backend metrics from the real clients, against real Redis, PostgreSQL and a Kafka-protocol broker."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
import uuid

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from chatobs import Telemetry, load_settings
from chatobs.instrumentation import uninstrument_libraries
from tests.conftest import ROOT, clean_env
from tests.metrics_text import exemplar_trace_ids, value

OPENMETRICS = "application/openmetrics-text; version=1.0.0"


def test_failing_redis_commands_are_counted_exactly(start_service, stack):
    service = start_service(stack, app="tests.apps.backend_app:app")
    base = service.base_url
    assert httpx.put(f"{base}/kv/greeting", params={"value": "hi"}).status_code == 200
    assert httpx.get(f"{base}/kv/greeting").json()["value"] == "hi"
    before = service.scrape().text
    for _ in range(3):  # LPUSH on a string key: the server answers WRONGTYPE
        assert httpx.post(f"{base}/kv/greeting/push", params={"value": "x"}).status_code == 502
    httpx.get(f"{base}/kv/greeting").raise_for_status()
    after = service.scrape().text
    assert value(after, "redis_errors_total") - value(before, "redis_errors_total") == 3
    assert value(after, "redis_errors_total", operation="lpush") == 3
    assert value(after, "redis_operation_seconds_count", operation="get") == 2
    assert value(after, "redis_operation_seconds_count", operation="set") == 1


def test_failing_postgres_queries_are_counted_exactly(start_service, stack):
    service = start_service(stack, app="tests.apps.backend_app:app")
    base = service.base_url
    assert httpx.get(f"{base}/sql", params={"statement": "select 40 + 2"}).json() == {"result": "42"}
    before = service.scrape().text
    for _ in range(2):
        response = httpx.get(f"{base}/sql", params={"statement": "insert into no_such_table values (1)"})
        assert response.status_code == 502
    after = service.scrape().text
    assert value(after, "postgres_errors_total") - value(before, "postgres_errors_total") == 2
    assert value(after, "postgres_errors_total", operation="insert") == 2
    assert value(after, "postgres_operation_seconds_count", operation="select") >= 1


def test_metrics_answer_fast_with_redis_and_postgres_down(start_service, own_stack):
    local = own_stack()
    service = start_service(local.environment, app="tests.apps.backend_app:app")
    base = service.base_url
    httpx.put(f"{base}/kv/k", params={"value": "v"}).raise_for_status()
    local.stop_server("redis")
    started = time.monotonic()
    local.stop_server("postgres")  # the service holds pooled connections: a fast shutdown, not a wait
    assert time.monotonic() - started < 5
    with httpx.Client(timeout=10) as client:
        assert client.post(f"{base}/kv/k/push", params={"value": "x"}).status_code == 502
        assert client.get(f"{base}/sql", params={"statement": "select 1"}).status_code == 502
        started = time.monotonic()
        text = client.get(f"{base}/metrics").text
        elapsed = time.monotonic() - started
    assert elapsed < 1.0, f"/metrics took {elapsed:.2f}s with the backends down"
    assert value(text, "redis_errors_total", operation="lpush") == 1
    assert value(text, "postgres_errors_total", operation="connect") == 1


#: This module's own WAL topic: the session's broker also holds other tests' `chat.wal` records,
#: and the trace test below reads its topic from the earliest offset.
WAL_TOPIC = f"chat.wal.backends-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def instrumented():
    """An in-process pipeline with the client libraries instrumented, spans kept in memory."""
    spans = InMemorySpanExporter()
    telemetry = Telemetry(
        load_settings({"CHATOBS_WAL_TOPIC": WAL_TOPIC}),
        service="worker",
        span_processors=[SimpleSpanProcessor(spans)],
    )
    telemetry.instrument()
    yield telemetry, spans
    uninstrument_libraries()
    telemetry.shutdown()


def test_produce_to_a_stopped_broker_is_a_kafka_and_wal_publish_error(instrumented, own_stack):
    telemetry, _ = instrumented
    local = own_stack()
    bootstrap = local.environment["KAFKA_BOOTSTRAP_SERVERS"]

    async def scenario() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, request_timeout_ms=1500, retry_backoff_ms=100)
        await producer.start()
        try:
            await producer.send_and_wait(WAL_TOPIC, b"first")  # succeeds
            local.stop_server("kafka")
            with pytest.raises(Exception):  # noqa: B017 - aiokafka raises one of several errors here
                await asyncio.wait_for(producer.send_and_wait(WAL_TOPIC, b"second"), 30)
        finally:
            with contextlib.suppress(Exception):  # stopping against a dead broker may time out
                await asyncio.wait_for(producer.stop(), 5)

    asyncio.run(scenario())
    text = telemetry.scrape()[2].decode()
    assert value(text, "kafka_errors_total", operation="produce") == 1
    assert value(text, "kafka_operation_seconds_count", operation="produce") == 2
    assert value(text, "wal_publish_errors_total", operation="produce") == 1
    assert value(text, "wal_publish_seconds_count") == 2


def test_one_trace_from_producer_process_to_consumer_with_exemplar(instrumented, stack):
    telemetry, spans = instrumented
    topic = WAL_TOPIC
    env = clean_env({"KAFKA_BOOTSTRAP_SERVERS": stack["KAFKA_BOOTSTRAP_SERVERS"], "CHATOBS_WAL_TOPIC": topic})
    produced = subprocess.run([sys.executable, "-m", "tests.apps.kafka_producer"], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=60)  # fmt: skip
    assert produced.returncode == 0, produced.stderr[-3000:]
    trace_id = produced.stdout.strip()

    async def consume() -> None:
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=stack["KAFKA_BOOTSTRAP_SERVERS"],
                                    group_id="trace-test", auto_offset_reset="earliest")  # fmt: skip
        await consumer.start()
        try:
            while True:
                record = await asyncio.wait_for(consumer.getone(), 30)
                if record.value == b"hello":
                    break
            with telemetry.consumer_span(record), telemetry.backlog.time_wal_consume():
                await asyncio.sleep(0.01)
            await consumer.commit()
        finally:
            await consumer.stop()

    asyncio.run(consume())
    consumer_traces = {format(span.context.trace_id, "032x") for span in spans.get_finished_spans()
                       if span.name in (f"{topic} process", f"{topic} receive")}  # fmt: skip
    assert consumer_traces == {trace_id}
    openmetrics = telemetry.scrape(OPENMETRICS)[2].decode()
    assert trace_id in exemplar_trace_ids(openmetrics, "wal_consume_seconds")


def test_prometheus_stores_backend_series_and_trace_exemplars(start_service, stack, start_prometheus):
    service = start_service(stack, app="tests.apps.backend_app:app")
    base = service.base_url
    httpx.put(f"{base}/kv/answer", params={"value": "42"}).raise_for_status()
    trace_ids = {httpx.get(f"{base}/kv/answer").json()["trace_id"] for _ in range(5)}
    target = base.removeprefix("http://")
    prometheus = start_prometheus(
        "global: {scrape_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: gateway\n    static_configs: [{{targets: ['{target}']}}]\n"
    )
    series = prometheus.wait_for(
        lambda: prometheus.query('redis_operation_seconds_count{job="gateway",operation="get"}'),
        what="redis_operation_seconds_count scraped",
    )
    assert float(series[0]["value"][1]) == 5
    # No failure: the error series exist, at 0, so the first failure will show in increase().
    errors = prometheus.query('redis_errors_total{job="gateway"}')
    assert errors and all(float(sample["value"][1]) == 0 for sample in errors)
    exemplars = prometheus.wait_for(
        lambda: prometheus.query_exemplars('redis_operation_seconds_bucket{job="gateway"}'),
        what="exemplars stored",
    )
    stored = {exemplar["labels"]["trace_id"] for group in exemplars for exemplar in group["exemplars"]}
    assert stored & trace_ids, f"no request trace id among the exemplars {stored}"
