"""Client calls are measured alike whether or not they get a span, and the trace goes on either way.

The same calls to real Redis, PostgreSQL, a Kafka-protocol broker and an HTTP server run
twice in one process: once with no span processor (nothing would receive a client span, so
none is made) and once with an in-memory exporter (the contrib instrumentations' spans are
made and exported). What a scrape shows must be the same; the upstream HTTP server and the
record's consumer must see the caller's trace both times.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
from collections.abc import Coroutine, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import asyncpg
import httpx
import pytest
import redis
import redis.asyncio as aioredis
import redis.exceptions
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError
from opentelemetry import context, trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client.parser import text_string_to_metric_families as parse_text

from chatobs import Telemetry, load_settings
from chatobs.instrumentation import uninstrument_libraries

CLIENT_METRICS = (
    "redis_operation_seconds_count", "redis_errors_total", "postgres_operation_seconds_count",
    "postgres_errors_total", "kafka_operation_seconds_count", "kafka_errors_total",
    "wal_publish_seconds_count", "wal_publish_errors_total", "http_client_request_duration_seconds_count",
)  # fmt: skip


@pytest.fixture
def upstream() -> Iterator[tuple[str, list[str | None]]]:
    """An HTTP server that answers 200 and remembers each request's ``traceparent``."""
    seen: list[str | None] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("traceparent"))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1/echo", seen
    server.shutdown()


#: A ``traceparent`` from elsewhere, in headers passed on (a consumed record's, say).
STALE_TRACEPARENT = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


async def _calls(telemetry: Telemetry, stack: dict[str, str], url: str) -> tuple[int, list[list[str]]]:
    """One chat turn's worth of client calls inside a SERVER span; its trace id and each consumed
    record's ``traceparent`` headers. Records go to the WAL topic."""
    topic = telemetry.clients.wal_topic
    client = aioredis.Redis.from_url(stack["REDIS_URL"])
    producer = AIOKafkaProducer(bootstrap_servers=stack["KAFKA_BOOTSTRAP_SERVERS"])
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=stack["KAFKA_BOOTSTRAP_SERVERS"], group_id=topic,
                                auto_offset_reset="earliest", enable_auto_commit=False)  # fmt: skip
    await producer.start()
    await consumer.start()
    try:
        with telemetry.tracer.start_as_current_span("turn", kind=SpanKind.SERVER) as turn:
            await client.set("client-test", "v")
            await client.get("client-test")
            with pytest.raises(TimeoutError):  # a call that never answers, given up by the caller
                await asyncio.wait_for(client.xread({"client-test-stream": "$"}, block=0), 0.2)
            with pytest.raises(Exception, match="WRONGTYPE"):
                await client.lpush("client-test", "x")
            async with client.pipeline() as pipe:
                await pipe.incr("client-test-n").incr("client-test-n").execute()
            connection = await asyncpg.connect(stack["DATABASE_URL"])
            try:
                assert await connection.fetchval("/* answer */ select 40 + 2") == 42
                with pytest.raises(asyncpg.UndefinedTableError):
                    await connection.execute("insert into no_such_table values (1)")
                async with connection.transaction():
                    await connection.fetch("select 1")
            finally:
                await connection.close()
            async with httpx.AsyncClient() as http:
                (await http.get(url)).raise_for_status()
            # Headers passed on, with a trace context of their own, and the same list sent twice.
            headers = [("tenant", b"acme"), ("traceparent", STALE_TRACEPARENT)]
            await producer.send_and_wait(topic, b"turn", headers=headers)
            await producer.send_and_wait(topic, b"turn again", headers=headers)
            assert headers == [("tenant", b"acme"), ("traceparent", STALE_TRACEPARENT)], "the caller's list changed"
            with pytest.raises(MessageSizeTooLargeError):  # refused before it is queued
                await producer.send(topic, b"x" * 2**21)
            records = [await asyncio.wait_for(consumer.getone(), 30) for _ in range(2)]
            await consumer.commit()
        for record in records:
            assert ("tenant", b"acme") in record.headers, "the caller's own headers are kept"
        parents = [[value.decode() for name, value in record.headers if name == "traceparent"] for record in records]
        return turn.get_span_context().trace_id, parents
    finally:
        await client.aclose()
        await producer.stop()
        await consumer.stop()


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _client_samples(text: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in parse_text(text)
        for sample in family.samples
        if sample.name in CLIENT_METRICS
    }


def _measured(telemetry: Telemetry, calls: Coroutine[Any, Any, object]) -> Samples:
    """Run ``calls`` (the libraries instrumented by ``telemetry``), then uninstrument them and
    shut ``telemetry`` down: the client metrics its scrape showed."""
    try:
        asyncio.run(calls)
    finally:
        uninstrument_libraries()
    samples = _client_samples(telemetry.scrape()[2].decode())
    telemetry.shutdown()
    return samples


def test_client_metrics_are_the_same_with_or_without_spans_and_the_trace_goes_on(stack, upstream):
    url, seen = upstream
    measured = {}
    exporter = InMemorySpanExporter()
    for tier, processors in (("metrics only", []), ("spans too", [SimpleSpanProcessor(exporter)])):
        settings = load_settings({"CHATOBS_WAL_TOPIC": f"chat.client-test.{tier.replace(' ', '-')}"})
        telemetry = Telemetry(settings, service="worker", span_processors=processors)
        telemetry.instrument()
        try:
            seen.clear()
            trace_id, record_parents = asyncio.run(_calls(telemetry, stack, url))
        finally:
            uninstrument_libraries()
        measured[tier] = _client_samples(telemetry.scrape()[2].decode())
        telemetry.shutdown()
        # The upstream server and the consumer continue the caller's trace, span or no span: each
        # record carries one traceparent, the caller's, not the one its headers came with.
        assert len(seen) == 1 and [len(parents) for parents in record_parents] == [1, 1], (tier, seen, record_parents)
        for traceparent in [*seen, *(parents[0] for parents in record_parents)]:
            assert traceparent is not None and traceparent.split("-")[1] == format(trace_id, "032x"), (tier, seen)

    assert measured["metrics only"] == measured["spans too"]
    samples = measured["metrics only"]
    expected = {
        ("redis_operation_seconds_count", (("operation", "set"),)): 1,
        ("redis_operation_seconds_count", (("operation", "get"),)): 1,
        ("redis_errors_total", (("operation", "lpush"),)): 1,
        ("redis_errors_total", (("operation", "get"),)): 0,
        ("redis_errors_total", (("operation", "xread"),)): 1,  # cancelled: no operation that completed
        ("redis_operation_seconds_count", (("operation", "pipeline"),)): 1,
        ("postgres_operation_seconds_count", (("operation", "connect"),)): 1,
        ("postgres_operation_seconds_count", (("operation", "select"),)): 2,
        ("postgres_errors_total", (("operation", "insert"),)): 1,
        ("postgres_operation_seconds_count", (("operation", "begin"),)): 1,
        ("postgres_operation_seconds_count", (("operation", "commit"),)): 1,
        ("kafka_operation_seconds_count", (("operation", "produce"),)): 3,
        ("kafka_errors_total", (("operation", "produce"),)): 1,
        ("kafka_operation_seconds_count", (("operation", "commit"),)): 1,
        ("kafka_operation_seconds_count", (("operation", "connect"),)): 2,  # the producer's and the consumer's start
        ("kafka_errors_total", (("operation", "consume"),)): 0,
        ("wal_publish_seconds_count", ()): 3,
        ("wal_publish_errors_total", (("operation", "produce"),)): 1,
    }
    assert {key: samples.get(key) for key in expected} == expected
    http = {labels: count for (name, labels), count in samples.items() if name.startswith("http_client")}
    assert http == {(("http_request_method", "GET"), ("http_response_status_code", "200"),
                     ("server_address", "127.0.0.1")): 1}  # fmt: skip

    # With a processor, the contrib instrumentations' client spans were made, in the turn's trace.
    spans = exporter.get_finished_spans()
    scopes = {span.instrumentation_scope.name for span in spans if span.kind is not SpanKind.SERVER}
    assert {"opentelemetry.instrumentation.redis", "opentelemetry.instrumentation.asyncpg",
            "opentelemetry.instrumentation.httpx", "opentelemetry.instrumentation.aiokafka",
            "chatobs.instrumentation.kafka", "chatobs.instrumentation.asyncpg"} <= scopes  # fmt: skip
    refused = [span for span in spans if span.kind is SpanKind.PRODUCER and span.status.status_code is StatusCode.ERROR]
    assert len(refused) == 1, refused
    assert [event.name for event in refused[0].events] == ["exception"], "the failure is recorded once"
    assert refused[0].attributes["error.type"] == "aiokafka.errors.MessageSizeTooLargeError"
    statements = [span for span in spans if span.instrumentation_scope.name == "opentelemetry.instrumentation.asyncpg"]
    assert len(statements) == 5  # select, insert, begin, select, commit: not the connection's reset
    assert all(span.attributes.get("db.statement") or span.attributes.get("db.query.text") for span in statements)


def test_a_dropped_trace_gets_no_client_spans_but_its_metrics(stack, upstream):
    url, seen = upstream
    exporter = InMemorySpanExporter()
    settings = load_settings({"CHATOBS_WAL_TOPIC": "chat.client-test.dropped", "OTEL_TRACES_SAMPLER_ARG": "0",
                              "OTEL_TRACES_SAMPLER": "parentbased_traceidratio"})  # fmt: skip
    telemetry = Telemetry(settings, service="worker", span_processors=[SimpleSpanProcessor(exporter)])
    telemetry.instrument()
    samples = _measured(telemetry, _calls(telemetry, stack, url))
    assert exporter.get_finished_spans() == ()
    assert samples[("redis_errors_total", (("operation", "lpush"),))] == 1
    assert samples[("postgres_operation_seconds_count", (("operation", "select"),))] == 2
    assert samples[("wal_publish_seconds_count", ())] == 3
    assert seen and seen[0] is not None and not int(seen[0].rsplit("-", 1)[1], 16) & 1, "told: not sampled"


def test_calls_under_suppressed_instrumentation_are_not_measured(stack, upstream):
    """``suppress_instrumentation`` (and, for HTTP, ``suppress_http_instrumentation``) turns
    the client metrics off for the calls inside it, each time it is entered, and only there."""
    from opentelemetry.instrumentation.utils import suppress_http_instrumentation, suppress_instrumentation

    url, _ = upstream
    telemetry = Telemetry(load_settings({}), service="worker")
    telemetry.instrument()

    async def calls(http: httpx.AsyncClient, client: aioredis.Redis, connection: asyncpg.Connection) -> None:
        await client.get("client-test-suppressed")
        await connection.fetchval("select 1")
        (await http.get(url)).raise_for_status()

    async def turns() -> None:
        client = aioredis.Redis.from_url(stack["REDIS_URL"])
        connection = await asyncpg.connect(stack["DATABASE_URL"])
        try:
            async with httpx.AsyncClient() as http:
                await calls(http, client, connection)  # measured
                with suppress_instrumentation():
                    await calls(http, client, connection)
                await calls(http, client, connection)  # measured
                with suppress_instrumentation():
                    await calls(http, client, connection)
                with suppress_http_instrumentation():  # the HTTP call only
                    await calls(http, client, connection)
        finally:
            await client.aclose()
            await connection.close()

    samples = _measured(telemetry, turns())
    assert samples[("redis_operation_seconds_count", (("operation", "get"),))] == 3
    assert samples[("postgres_operation_seconds_count", (("operation", "select"),))] == 3
    http = [count for (name, _), count in samples.items() if name == "http_client_request_duration_seconds_count"]
    assert http == [2]


def test_uninstrumenting_leaves_the_applications_own_instrumentation(upstream):
    # The application traces httpx itself (the contrib instrumentor, its own provider); chatobs
    # instruments on top and is undone: the application's spans must go on.
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    from opentelemetry.sdk.trace import TracerProvider

    url, _ = upstream
    exporter = InMemorySpanExporter()
    own = TracerProvider()
    own.add_span_processor(SimpleSpanProcessor(exporter))
    HTTPXClientInstrumentor().instrument(tracer_provider=own)
    try:
        telemetry = Telemetry(load_settings({}), service="worker")
        telemetry.instrument()
        uninstrument_libraries()
        telemetry.shutdown()
        httpx.get(url).raise_for_status()
        assert [span.kind for span in exporter.get_finished_spans()] == [SpanKind.CLIENT]
    finally:
        HTTPXClientInstrumentor().uninstrument()


def test_a_failed_poll_counts_and_one_ended_by_a_stop_or_a_cancel_does_not(stack):
    telemetry = Telemetry(load_settings({}), service="worker")
    telemetry.instrument()

    async def polls() -> None:
        consumer = AIOKafkaConsumer(bootstrap_servers=stack["KAFKA_BOOTSTRAP_SERVERS"], enable_auto_commit=False)
        await consumer.start()
        consumer.assign([TopicPartition("client-test-polls", 0)])
        try:
            with pytest.raises(AssertionError):  # aiokafka refuses the call: a poll that failed
                await consumer.getone("not a partition")  # type: ignore[arg-type]
            with pytest.raises(TimeoutError):  # nothing came: given up by the caller
                await asyncio.wait_for(consumer.getone(), 0.5)
            waiting = asyncio.ensure_future(consumer.getmany(timeout_ms=30_000))
            await asyncio.sleep(0.2)
        finally:
            await consumer.stop()
        assert (await waiting) == {} or waiting.exception() is None

    samples = _measured(telemetry, polls())
    assert samples[("kafka_errors_total", (("operation", "consume"),))] == 1
    assert not any(name == "kafka_operation_seconds_count" and labels == (("operation", "consume"),)
                   for name, labels in samples), "a poll's duration is waiting for records: not measured"  # fmt: skip


def test_a_service_shows_the_error_series_of_polls_and_pub_sub_reads_only_once_it_makes_them(stack):
    """A service that never polls Kafka nor reads Redis pub/sub (the publisher, say) showed
    ``kafka_errors_total{operation="consume"} 0`` and ``redis_errors_total{operation="subscribe"} 0``
    all the same: the series of a backend it does not use."""
    telemetry = Telemetry(load_settings({}), service="publisher")
    telemetry.instrument()
    consume = ("kafka_errors_total", (("operation", "consume"),))
    subscribe = ("redis_errors_total", (("operation", "subscribe"),))

    async def one_poll_and_one_read() -> None:
        consumer = AIOKafkaConsumer(bootstrap_servers=stack["KAFKA_BOOTSTRAP_SERVERS"], enable_auto_commit=False)
        client = aioredis.Redis.from_url(stack["REDIS_URL"])
        await consumer.start()
        try:
            consumer.assign([TopicPartition("client-test-first-poll", 0)])
            assert await consumer.getmany(timeout_ms=10) == {}
            pubsub = client.pubsub()
            await pubsub.subscribe("client-test-first-read")
            assert (await pubsub.get_message(timeout=1.0))["type"] == "subscribe"
            await pubsub.aclose()
        finally:
            await consumer.stop()
            await client.aclose()

    before = _client_samples(telemetry.scrape()[2].decode())
    try:
        asyncio.run(one_poll_and_one_read())
    finally:
        uninstrument_libraries()
    after = _client_samples(telemetry.scrape()[2].decode())
    telemetry.shutdown()
    assert consume not in before and subscribe not in before, sorted(before)
    assert (after.get(consume), after.get(subscribe)) == (0, 0), "shown from the first call on, before any failure"


def test_a_call_whose_recording_fails_returns_its_result_and_counts_a_recording_error(stack):
    """The current span is another tracing library's, whose ``get_span_context`` fails: taking
    the command's exemplar fails. The command's answer still comes back, and the failure is
    counted against the command's metric, as a recording helper's is."""

    class BrokenSpan(trace.NonRecordingSpan):
        def get_span_context(self) -> trace.SpanContext:
            raise RuntimeError("a span implementation with a bug")

    telemetry = Telemetry(load_settings({}), service="worker")
    telemetry.instrument()

    async def calls() -> None:
        client = aioredis.Redis.from_url(stack["REDIS_URL"])
        try:
            await client.set("client-test-bogus-span", "kept")
            token = context.attach(trace.set_span_in_context(BrokenSpan(trace.INVALID_SPAN_CONTEXT)))
            try:
                assert await client.get("client-test-bogus-span") == b"kept"
            finally:
                context.detach(token)
        finally:
            await client.aclose()

    try:
        asyncio.run(calls())
    finally:
        uninstrument_libraries()
    text = telemetry.scrape()[2].decode()
    telemetry.shutdown()
    assert 'chatobs_recording_errors_total{metric="redis_operation_seconds"} 1' in text, text


def test_a_span_processor_added_after_instrumenting_gets_the_client_spans_from_then_on(stack):
    telemetry = Telemetry(load_settings({}), service="worker")
    telemetry.instrument()
    exporter = InMemorySpanExporter()

    async def calls() -> None:
        client = aioredis.Redis.from_url(stack["REDIS_URL"])
        listener = client.pubsub()
        try:
            await client.get("client-test-later")
            await listener.subscribe("client-test-later")
            await listener.get_message(timeout=1.0)
            telemetry.tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
            await client.get("client-test-later")
        finally:
            await listener.aclose()
            await client.aclose()

    try:
        asyncio.run(calls())
    finally:
        uninstrument_libraries()
        telemetry.shutdown()
    assert [span.name for span in exporter.get_finished_spans() if span.kind is SpanKind.CLIENT] == ["GET"]


def test_a_start_against_an_unreachable_broker_counts_a_connect_error(stack):
    telemetry = Telemetry(load_settings({}), service="publisher")
    telemetry.instrument()
    with socket.socket() as closed:  # a port nothing listens on: bound, then closed
        closed.bind(("127.0.0.1", 0))
        unreachable = f"127.0.0.1:{closed.getsockname()[1]}"

    async def starts() -> None:
        down = AIOKafkaProducer(bootstrap_servers=unreachable, request_timeout_ms=2000)
        with pytest.raises(KafkaConnectionError):
            await down.start()
        await down.stop()
        up = AIOKafkaProducer(bootstrap_servers=stack["KAFKA_BOOTSTRAP_SERVERS"])
        await up.start()
        await up.stop()

    samples = _measured(telemetry, starts())
    assert samples[("kafka_errors_total", (("operation", "connect"),))] == 1
    assert samples[("kafka_operation_seconds_count", (("operation", "connect"),))] == 2, "both are timed, as statements"


def test_redis_waits_count_only_their_failures_and_pub_sub_is_measured(stack):
    telemetry = Telemetry(load_settings({}), service="gateway")
    telemetry.instrument()
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        unreachable = f"redis://127.0.0.1:{closed.getsockname()[1]}/0"

    async def calls() -> None:
        client = aioredis.Redis.from_url(stack["REDIS_URL"])
        admin = aioredis.Redis.from_url(stack["REDIS_URL"])
        try:
            for _ in range(2):  # the second found by the command's spelling, as the first was named
                assert await client.blpop(["client-test-nothing"], timeout=0.2) is None  # waited, found nothing
            # XREAD waits only when given BLOCK: the same spelling, measured or not by its arguments.
            for block in (None, 100, None):
                assert not await client.xread({"client-test-empty-stream": "$"}, block=block)
            # A listener that stops listening (an SSE client gone): its read is cancelled, no failure.
            listener = admin.pubsub()
            await listener.subscribe("client-test-other")
            assert (await listener.get_message(timeout=1.0))["type"] == "subscribe"
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(listener.get_message(timeout=5), 0.2)
            await listener.aclose()
            pubsub = client.pubsub()
            await pubsub.subscribe("client-test-channel")
            assert (await pubsub.get_message(timeout=1.0))["type"] == "subscribe"
            await admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")  # the server drops the listener
            with pytest.raises(redis.exceptions.ConnectionError):
                for _ in range(5):
                    await pubsub.get_message(timeout=0.5)
            await pubsub.aclose()
            down = aioredis.Redis.from_url(unreachable).pubsub()
            with pytest.raises(redis.exceptions.ConnectionError):
                await down.subscribe("client-test-channel")
            await down.aclose()
        finally:
            await client.aclose()
            await admin.aclose()

    samples = _measured(telemetry, calls())
    assert not any(name == "redis_operation_seconds_count" and labels == (("operation", "blpop"),)
                   for name, labels in samples), "a blocking wait's duration is the caller's timeout"  # fmt: skip
    assert samples.get(("redis_errors_total", (("operation", "blpop"),))) == 0
    assert samples[("redis_operation_seconds_count", (("operation", "xread"),))] == 2, "the two without BLOCK"
    assert samples[("redis_errors_total", (("operation", "xread"),))] == 0
    # The listener's subscribe, the first, the refused one, and those redis-py makes again on reconnecting.
    assert samples[("redis_operation_seconds_count", (("operation", "subscribe"),))] >= 3
    assert samples[("redis_errors_total", (("operation", "subscribe"),))] == 2, (
        "the dropped listener and the refusal, not the cancelled read"
    )


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, SystemExit])
def test_a_call_cut_off_by_ctrl_c_or_an_exit_is_a_failure_not_a_completed_operation(interruption):
    """A Redis command waiting on a backend that does not answer, cut off by a signal whose
    handler raises (Ctrl-C, a handler that exits): it was counted as a command that completed,
    with no error."""
    telemetry = Telemetry(load_settings({}), service="gateway")
    telemetry.instrument()

    def interrupt(signum: int, frame: object) -> None:
        raise interruption

    previous = signal.signal(signal.SIGUSR1, interrupt)
    try:
        with socket.socket() as silent:  # accepts connections (the kernel does), never answers
            silent.bind(("127.0.0.1", 0))
            silent.listen()
            client = redis.Redis(host="127.0.0.1", port=silent.getsockname()[1], socket_timeout=10)
            threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGUSR1)).start()
            with pytest.raises(interruption):
                client.get("client-test-interrupted")
            client.close()
        samples = _client_samples(telemetry.scrape()[2].decode())
    finally:
        signal.signal(signal.SIGUSR1, previous)
        telemetry.shutdown()
    assert samples[("redis_errors_total", (("operation", "get"),))] == 1
    assert samples[("redis_operation_seconds_count", (("operation", "get"),))] == 1


def test_statements_given_by_keyword_are_named_by_them(stack):
    telemetry = Telemetry(load_settings({}), service="worker")
    telemetry.instrument()

    async def calls() -> None:
        connection = await asyncpg.connect(stack["DATABASE_URL"])
        try:
            await connection.execute(query="create temporary table keyword_test (n int)")
            await connection.executemany(command="insert into keyword_test values ($1)", args=[(1,), (2,)])
            for _ in range(2):  # the second found by the statement's text
                assert await connection.fetchval(query="select count(*) from keyword_test") == 2
            assert await connection.fetchval("select count(*) from keyword_test") == 2  # the same text, positional
        finally:
            await connection.close()

    samples = _measured(telemetry, calls())
    for operation, count in (("create", 1), ("insert", 1), ("select", 3)):
        assert samples.get(("postgres_operation_seconds_count", (("operation", operation),))) == count, operation
    assert ("postgres_operation_seconds_count", (("operation", "other"),)) not in samples


def test_a_second_telemetry_measures_the_calls_once_the_first_has_shut_down(stack, caplog):
    async def get(key: str) -> None:
        client = aioredis.Redis.from_url(stack["REDIS_URL"])
        try:
            await client.get(key)
        finally:
            await client.aclose()

    first = Telemetry(load_settings({}), service="worker")
    second = Telemetry(load_settings({}), service="worker")
    try:
        assert "redis" in first.instrument()
        # While the first runs, the libraries stay with it: the second says so and names none.
        assert second.instrument() == []
        assert "already instrumented for another Telemetry" in caplog.text
        asyncio.run(get("client-test-first"))
        first.shutdown()
        assert "redis" in second.instrument()
        asyncio.run(get("client-test-second"))
        key = ("redis_operation_seconds_count", (("operation", "get"),))
        counts = [_client_samples(telemetry.scrape()[2].decode()).get(key) for telemetry in (first, second)]
        assert counts == [1, 1], "each handle measures the calls made while it had the instrumentation"
    finally:
        first.shutdown()
        second.shutdown()
        uninstrument_libraries()


@pytest.mark.parametrize("failing", ["chatobs's instrumentor", "the contrib instrumentor"])
def test_a_library_whose_instrumentation_fails_is_left_as_it_was_and_the_service_starts(
    stack, caplog, monkeypatch, failing
):
    # A redis-py that moved a method: one of the two Redis instrumentors fails after putting most
    # of its wrappers in place. The service must still start, measure its statements, and leave
    # Redis as it was: no dispatcher recording for a handle that said Redis is not instrumented,
    # no contrib wrapper making spans.
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    from chatobs.instrumentation.redis import RedisClientInstrumentor

    moved_method = AttributeError("type object 'PubSub' has no attribute 'get_message'")
    if failing == "chatobs's instrumentor":
        real_specs = RedisClientInstrumentor._specs

        def specs_then_fail(self: RedisClientInstrumentor, wiring: Any) -> Iterator[Any]:
            yield from real_specs(self, wiring)
            raise moved_method

        monkeypatch.setattr(RedisClientInstrumentor, "_specs", specs_then_fail)
    else:
        real_instrument = RedisInstrumentor._instrument

        def wrap_then_fail(self: RedisInstrumentor, **kwargs: Any) -> None:
            real_instrument(self, **kwargs)
            raise moved_method

        monkeypatch.setattr(RedisInstrumentor, "_instrument", wrap_then_fail)

    async def calls() -> None:
        client = aioredis.Redis.from_url(stack["REDIS_URL"])
        connection = await asyncpg.connect(stack["DATABASE_URL"])
        try:
            with telemetry.tracer.start_as_current_span("turn", kind=SpanKind.SERVER):
                await client.get("client-test-failed")
                await connection.fetchval("select 1")
        finally:
            await client.aclose()
            await connection.close()

    get = ("redis_operation_seconds_count", (("operation", "get"),))
    select = ("postgres_operation_seconds_count", (("operation", "select"),))
    exporter = InMemorySpanExporter()
    telemetry = Telemetry(load_settings({}), service="worker", span_processors=[SimpleSpanProcessor(exporter)])
    try:
        names = telemetry.instrument()
        assert "redis" not in names and "asyncpg" in names, names
        assert "chatobs: redis not instrumented" in caplog.text
        assert "no attribute 'get_message'" in caplog.text
        asyncio.run(calls())
        samples = _client_samples(telemetry.scrape()[2].decode())
        assert samples.get(select) == 1
        assert get not in samples, "a dispatcher of the failed attempt was left in place"
        scopes = {span.instrumentation_scope.name for span in exporter.get_finished_spans()}
        assert "opentelemetry.instrumentation.asyncpg" in scopes
        assert "opentelemetry.instrumentation.redis" not in scopes, "a contrib wrapper was left in place"
    finally:
        telemetry.shutdown()
        uninstrument_libraries()
    # With the library's instrumentation working again, Redis is measured, each call once.
    monkeypatch.undo()
    telemetry = Telemetry(load_settings({}), service="worker")
    try:
        assert "redis" in telemetry.instrument()
        asyncio.run(calls())
        samples = _client_samples(telemetry.scrape()[2].decode())
        assert (samples.get(get), samples.get(select)) == (1, 1)
    finally:
        telemetry.shutdown()
        uninstrument_libraries()


def test_records_whose_trace_header_is_not_utf8_still_reach_the_application(stack):
    # A producer outside chatobs wrote bytes that are not UTF-8 into `traceparent`. With spans
    # recorded, the contrib aiokafka instrumentation's strict decoding made the poll raise after
    # the fetch, and the application never saw the records it had fetched.
    topic = "chat.client-test.bad-trace-header"
    bootstrap = stack["KAFKA_BOOTSTRAP_SERVERS"]
    bad = [("traceparent", b"00-\xff\xfe-not-utf8")]

    async def produce() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
        await producer.start()
        try:
            for value, headers in ((b"one", bad), (b"two", bad), (b"three", [("traceparent", STALE_TRACEPARENT)])):
                await producer.send_and_wait(topic, value, headers=headers)
        finally:
            await producer.stop()

    async def consume() -> list[tuple[bytes, int]]:
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=topic, auto_offset_reset="earliest",
                                    enable_auto_commit=False)  # fmt: skip
        await consumer.start()
        try:
            records = [await asyncio.wait_for(consumer.getone(), 30)]
            for _ in range(6):  # the rest through getmany, within 30 s
                for batch in (await consumer.getmany(timeout_ms=5_000)).values():
                    records += batch
                if len(records) >= 3:
                    break
            handled = []
            for record in records:
                with telemetry.consumer_span(record) as span:
                    handled.append((record.value, span.get_span_context().trace_id))
            return handled
        finally:
            await consumer.stop()

    asyncio.run(produce())  # before chatobs instruments: a send through it would replace the header
    exporter = InMemorySpanExporter()
    telemetry = Telemetry(load_settings({}), service="worker", span_processors=[SimpleSpanProcessor(exporter)])
    try:
        telemetry.instrument()
        handled = asyncio.run(consume())
        samples = _client_samples(telemetry.scrape()[2].decode())
    finally:
        telemetry.shutdown()
        uninstrument_libraries()
    traces = dict(handled)  # by value: the topic's partitions give no order across them
    assert sorted(traces) == [b"one", b"three", b"two"], handled
    assert traces[b"three"] == int(STALE_TRACEPARENT.split(b"-")[1], 16), "the valid header's trace goes on"
    assert samples.get(("kafka_errors_total", (("operation", "consume"),))) == 0
    consumer_spans = [span for span in exporter.get_finished_spans() if span.kind is SpanKind.CONSUMER]
    assert len(consumer_spans) == 3, "one CONSUMER span a record, consumer_span's"
