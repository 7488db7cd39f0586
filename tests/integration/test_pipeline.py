"""The pipeline end to end: real processes, real Redis/PostgreSQL/Kafka protocol, simulated LLM and
Somabrain; everything asserted is read back from the services' /metrics as Prometheus would."""

from __future__ import annotations

import time

import httpx

from chatpipe.launcher import Pipeline
from tests.chat_client import ChatClient, eventually
from tests.metrics_text import exemplar_trace_ids, value


class Scrapes:
    """Before/after readings of every service's /metrics."""

    def __init__(self, pipeline: Pipeline):
        self.urls = pipeline.metrics_urls

    def text(self, service: str) -> str:
        return httpx.get(self.urls[service], timeout=5).text

    def value(self, service: str, name: str, **labels: str) -> float:
        return value(self.text(service), name, **labels)

    def settled(self, quiet_seconds: float = 2.0, timeout: float = 30.0) -> None:
        """Wait until no turn is on its way: the worker took every record the publisher delivered,
        and those counts stay as they are for ``quiet_seconds``. An earlier test on this session's pipeline may
        have left messages whose turns are still running, and they would move these counts."""
        watched = (("publisher", "wal_publish_seconds_count"), ("worker", "wal_consume_seconds_count"),
                   ("worker", "context_build_seconds_count"), ("worker", "llm_latency_seconds_count"))  # fmt: skip

        def counts() -> tuple[float, ...]:
            return tuple(self.value(service, name) for service, name in watched)

        def consumed_all() -> bool:
            # Quiet is not enough: records published before the worker's consumer joined its group
            # (seconds after a pipeline starts) wait unconsumed, and nothing moves meanwhile.
            publisher, worker = self.text("publisher"), self.text("worker")
            delivered = value(publisher, "wal_publish_seconds_count") - value(publisher, "wal_publish_errors_total")
            return value(worker, "wal_consume_seconds_count") >= delivered

        deadline = time.monotonic() + timeout
        last, quiet_since = counts(), time.monotonic()
        while time.monotonic() - quiet_since < quiet_seconds or not consumed_all():
            assert time.monotonic() < deadline, f"the pipeline did not settle in {timeout:g}s"
            time.sleep(0.25)
            now = counts()
            if now != last:
                last, quiet_since = now, time.monotonic()


def control(url: str, **faults: object) -> None:
    httpx.post(f"{url}/control", json=faults, timeout=5).raise_for_status()


def test_a_chat_turn_streams_the_reply_and_moves_the_roadmap_metrics(pipeline):
    scrapes = Scrapes(pipeline)
    scrapes.settled()
    stats_before = httpx.get(f"{pipeline.llm_url}/stats").json()
    before = {service: scrapes.text(service) for service in scrapes.urls}
    chat = ChatClient(pipeline.gateway_url)
    event, tokens = chat.turn(chat.new_session(), "hello pipeline")

    assert event["type"] == "message" and event["mode"] == "normal"
    assert event["content"].startswith("You said: hello pipeline.")
    assert "".join(tokens) == event["content"]
    stats = httpx.get(f"{pipeline.llm_url}/stats").json()

    def moved(service: str, name: str, **labels: str) -> float:
        return scrapes.value(service, name, **labels) - value(before[service], name, **labels)

    assert moved("gateway", "chat_messages_in_total", role="user", source="web") == 1
    assert moved("gateway", "chat_enqueue_seconds_count") == 1
    assert moved("worker", "context_build_seconds_count") == 1
    assert moved("worker", "llm_requests_total", mode="normal") == 1
    assert moved("worker", "llm_tokens_total", direction="in") == stats["prompt_tokens"] - stats_before["prompt_tokens"]
    assert moved("worker", "llm_tokens_total", direction="out") == (
        stats["completion_tokens"] - stats_before["completion_tokens"]
    )
    assert moved("worker", "llm_latency_seconds_count") == 1
    assert moved("worker", "llm_time_to_first_token_seconds_count") == 1
    assert moved("worker", "event_to_response_seconds_count", mode="normal") == 1
    assert moved("worker", "wal_consume_seconds_count") == 1
    assert moved("worker", "assistant_emitted_total", mode="normal") == 1
    assert moved("publisher", "wal_publish_seconds_count") == 1
    # The statements the gateway ran (the session's insert, the event stream's and the message's
    # session lookups, the outbox insert), not the pool's reset of each connection it took back.
    assert moved("gateway", "postgres_operation_seconds_count", operation="insert") == 2
    assert moved("gateway", "postgres_operation_seconds_count", operation="select") == 2
    # Derived from the httpx client spans: the LLM call and the Somabrain recall and remember.
    assert moved("worker", "http_client_request_duration_seconds_count", http_request_method="POST") == 3
    eventually(lambda: moved("replicator", "wal_consume_seconds_count") == 1, what="replicated")
    # The turn is one trace: the replicator's record points at a trace the worker's does too.
    openmetrics = {"Accept": "application/openmetrics-text; version=1.0.0"}
    traces = {service: exemplar_trace_ids(httpx.get(scrapes.urls[service], headers=openmetrics, timeout=5).text,
                                          "wal_consume_seconds") for service in ("worker", "replicator")}  # fmt: skip
    assert traces["replicator"] & traces["worker"], traces


def test_somabrain_outage_degrades_buffers_and_recovers(pipeline):
    scrapes = Scrapes(pipeline)
    before = scrapes.text("worker")
    chat = ChatClient(pipeline.gateway_url)
    session = chat.new_session()
    control(pipeline.somabrain_url, hang=True)
    try:
        replies = [chat.turn(session, f"degraded turn {n}")[0] for n in range(3)]
    finally:
        control(pipeline.somabrain_url, hang=False)
    assert [reply["mode"] for reply in replies] == ["degraded"] * 3
    after = scrapes.text("worker")

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("somabrain_calls_total", result="timeout") >= 2
    assert moved("somabrain_calls_total", result="circuit_open") >= 1
    assert moved("somabrain_bypass_total") == 3
    assert moved("somabrain_calls_total", result="skipped") == 3, "each degraded turn's memory write skips it"
    assert moved("llm_requests_total", mode="degraded_bypass_somabrain") == 3
    assert moved("assistant_emitted_total", mode="degraded") == 3
    # Recovery: the breaker half-opens, the replay drains the buffer, the circuit closes.
    eventually(lambda: scrapes.value("worker", "circuit_state", component="somabrain") == 0, what="circuit closed")
    eventually(lambda: scrapes.value("worker", "degraded_buffer_size") == 0, what="buffer drained")
    # With no traffic, an open circuit is no call: the replay waiting for it counts none refused.
    refused = scrapes.value("worker", "somabrain_calls_total", result="circuit_open")
    assert refused - value(after, "somabrain_calls_total", result="circuit_open") <= 1
    remembered = httpx.get(f"{pipeline.somabrain_url}/memories", params={"session_id": session}).json()
    assert remembered["count"] == 3, "every buffered memory write was replayed once"


def test_the_outage_is_visible_while_it_lasts(pipeline):
    scrapes = Scrapes(pipeline)
    chat = ChatClient(pipeline.gateway_url)
    session = chat.new_session()
    control(pipeline.somabrain_url, outage=True)
    try:
        for n in range(3):
            chat.turn(session, f"during outage {n}")
        eventually(lambda: scrapes.value("worker", "circuit_state", component="somabrain") == 2, what="open")
        eventually(lambda: scrapes.value("worker", "degraded_buffer_size") >= 3, what="buffered")
    finally:
        control(pipeline.somabrain_url, outage=False)
    eventually(lambda: scrapes.value("worker", "degraded_buffer_size") == 0, what="drained")


def test_llm_error_burst_is_counted_and_the_user_told(pipeline):
    scrapes = Scrapes(pipeline)
    before = scrapes.value("worker", "llm_errors_total", provider="simulator", code="http_5xx")
    chat = ChatClient(pipeline.gateway_url)
    control(pipeline.llm_url, error_rates={"503": 1.0})
    try:
        event, _ = chat.turn(chat.new_session(), "are you there?")
    finally:
        control(pipeline.llm_url, error_rates={})
    assert event["type"] == "error" and "http_5xx" in event["error"]
    assert scrapes.value("worker", "llm_errors_total", provider="simulator", code="http_5xx") == before + 1


def test_a_malformed_llm_answer_is_counted_and_the_user_told(pipeline):
    """A 200 from the provider that is no completion (here a stream cut off mid-chunk) is an LLM error."""
    scrapes = Scrapes(pipeline)
    before = scrapes.text("worker")
    chat = ChatClient(pipeline.gateway_url)
    control(pipeline.llm_url, malformed=True)
    try:
        event, _ = chat.turn(chat.new_session(), "are you well?")
    finally:
        control(pipeline.llm_url, malformed=False)
    assert event == {"type": "error", "error": "the language model failed (other)"}
    after = scrapes.text("worker")

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("llm_requests_total") == 1
    assert moved("llm_errors_total", provider="simulator", code="other") == 1
    # `other` is the spec's code for an unclassified failure here, not a value turned away.
    assert moved("chatobs_label_rejections_total", metric="llm_errors_total", label="code") == 0


def test_a_tenant_over_its_budget_is_refused_clearly(pipeline):
    scrapes = Scrapes(pipeline)
    chat = ChatClient(pipeline.gateway_url, tenant="tiny")  # 30 tokens per window (PIPELINE_ENV in conftest)
    session = chat.new_session()
    tokens_before = scrapes.value("worker", "llm_tokens_total")
    first, _ = chat.turn(session, "spend my tokens")
    assert first["type"] == "message"  # admitted: nothing spent yet
    first_turn_tokens = scrapes.value("worker", "llm_tokens_total") - tokens_before
    refused, _ = chat.turn(session, "one more please")
    assert refused["type"] == "error" and refused["reason"] == "budget"
    assert f"Token budget exceeded for tenant tiny: {first_turn_tokens:.0f} of 30 tokens" in refused["error"]
    text = scrapes.text("worker")
    assert value(text, "tenant_budget_tokens_overruns_total", tenant="tiny") == 1
    assert value(text, "tenant_budget_tokens_allowed", tenant="tiny") == 30
    assert value(text, "tenant_budget_tokens_used", tenant="tiny") == first_turn_tokens > 30
    assert value(text, "tenant_budget_messages_used", tenant="tiny") == 1


def test_a_tool_call_is_executed_by_the_tool_executor(pipeline):
    scrapes = Scrapes(pipeline)
    before = scrapes.value("tool_executor", "tool_calls_total", tool="calculator", result="success")
    chat = ChatClient(pipeline.gateway_url)
    event, _ = chat.turn(chat.new_session(), "calc: 6*7")
    assert event["type"] == "message" and "42" in event["content"]
    assert scrapes.value("tool_executor", "tool_calls_total", tool="calculator", result="success") == before + 1
    assert scrapes.value("tool_executor", "tool_call_seconds_count", tool="calculator") >= 1


def test_attachments_limits_answer_json_errors(pipeline):
    chat = ChatClient(pipeline.gateway_url)
    session = chat.new_session()
    scrapes = Scrapes(pipeline)
    before = scrapes.value("gateway", "attachments_uploaded_total")
    ok = chat.http.post(f"/v1/sessions/{session}/attachments", files={"file": ("a.txt", b"hello", "text/plain")})
    assert ok.status_code == 201 and ok.json()["size_bytes"] == 5
    # Media types are case-insensitive: a client's `Text/Plain` is text/plain.
    capitalised = chat.http.post(f"/v1/sessions/{session}/attachments", files={"file": ("a.txt", b"hi", "Text/Plain")})
    assert capitalised.status_code == 201, capitalised.text
    too_big = chat.http.post(f"/v1/sessions/{session}/attachments",
                             files={"file": ("b.txt", b"x" * 1001, "text/plain")})  # fmt: skip
    assert too_big.status_code == 413 and "larger than 1000 bytes" in too_big.json()["error"]
    wrong_type = chat.http.post(f"/v1/sessions/{session}/attachments",
                                files={"file": ("c.exe", b"MZ", "application/x-msdownload")})  # fmt: skip
    assert wrong_type.status_code == 415 and "not accepted" in wrong_type.json()["error"]
    assert scrapes.value("gateway", "attachments_uploaded_total") == before + 2
    assert scrapes.value("gateway", "attachment_upload_seconds_count") >= 2


def test_session_lifecycle_and_health(pipeline):
    scrapes = Scrapes(pipeline)
    chat = ChatClient(pipeline.gateway_url)
    before = scrapes.text("gateway")
    session = chat.new_session()
    assert chat.http.get(f"/v1/sessions/{session}").json() == {"session_id": session, "tenant": "acme"}
    assert chat.http.delete(f"/v1/sessions/{session}").status_code == 204
    assert chat.http.get(f"/v1/sessions/{session}").status_code == 410
    gone = chat.http.post(f"/v1/sessions/{session}/messages", json={"content": "still there?"})
    assert gone.status_code == 410 and "deleted" in gone.json()["error"]
    missing = chat.http.delete("/v1/sessions/no-such-session")
    assert missing.status_code == 404 and missing.json() == {"error": "no session no-such-session"}
    bad_tenant = chat.http.post("/v1/sessions", headers={"X-Tenant-ID": "no spaces allowed"})
    assert bad_tenant.status_code == 400
    health = chat.http.get("/health")
    assert health.status_code == 200 and health.json() == {"redis": "ok", "postgres": "ok"}
    after = scrapes.text("gateway")
    assert value(after, "sessions_created_total") - value(before, "sessions_created_total") == 1
    assert value(after, "sessions_deleted_total") - value(before, "sessions_deleted_total") == 1
    assert value(after, "health_checks_total", component="postgres", result="ok") >= 1
    # Probes and scrapes stay out of the HTTP metrics; API routes appear by template, never raw path.
    assert 'http_route="/v1/sessions/{session_id}"' in after
    assert "/health" not in after.split("http_server_request_duration_seconds", 1)[1]
    assert session not in after


def test_a_client_gone_mid_reply_is_an_sse_stream_error(pipeline):
    scrapes = Scrapes(pipeline)
    chat = ChatClient(pipeline.gateway_url)
    session = chat.new_session()
    before = scrapes.value("gateway", "sse_stream_errors_total", reason="client_disconnect")
    redis_errors = scrapes.value("gateway", "redis_errors_total", operation="subscribe")
    control(pipeline.llm_url, latency_seconds=4.0, completion_words=40)  # a token every 0.1 s
    try:
        with (
            httpx.Client(timeout=30) as sse,
            sse.stream("GET", f"{pipeline.gateway_url}/v1/sessions/{session}/events") as stream,
        ):
            lines = stream.iter_lines()
            assert next(lines) == ": connected"
            chat.http.post(f"/v1/sessions/{session}/messages", json={"content": "a long answer, please"})
            for line in lines:
                if line == "event: token":
                    break  # the reply is streaming: the client goes away now
    finally:
        control(pipeline.llm_url, latency_seconds=0.2, completion_words=24)
    eventually(lambda: scrapes.value("gateway", "sse_stream_errors_total", reason="client_disconnect") == before + 1,
               timeout=10, what="the disconnect mid-reply counted")  # fmt: skip
    eventually(lambda: scrapes.value("gateway", "sse_clients_gauge") == 0, what="the stream's client gone")
    # Its pub/sub read was cancelled: a listener gone, no failure of Redis's (RedisErrorBurst).
    assert scrapes.value("gateway", "redis_errors_total", operation="subscribe") == redis_errors


def test_every_service_probes_its_backends_and_counts_a_backend_down(pipeline):
    scrapes = Scrapes(pipeline)
    backends = {"worker": ("redis", "kafka", "somabrain", "llm"), "tool_executor": ("redis", "kafka", "llm"),
                "publisher": ("postgres", "kafka"), "replicator": ("postgres", "kafka")}  # fmt: skip
    for service, components in backends.items():
        for component in components:
            eventually(lambda service=service, component=component: scrapes.value(
                service, "health_checks_total", component=component, result="ok") >= 1,
                what=f"{service} probed {component}")  # fmt: skip
    before = scrapes.value("worker", "health_checks_total", component="llm", result="fail")
    control(pipeline.llm_url, outage=True)
    try:
        eventually(lambda: scrapes.value("worker", "health_checks_total", component="llm", result="fail") > before,
                   timeout=10, what="the worker's probe saw the LLM down")  # fmt: skip
    finally:
        control(pipeline.llm_url, outage=False)


def test_a_calculation_too_large_to_answer_is_refused_at_once_and_holds_up_no_other(pipeline):
    # `(9**99)**99` has 9,400 digits: more than JSON can write, so its result was dropped (the
    # worker waited out its 10 s) and counted a success. `(((9**99)**99)**99)**99` was minutes
    # of CPU in the executor's event loop, every other tool call stalled behind it.
    scrapes = Scrapes(pipeline)
    rejected = scrapes.value("tool_executor", "tool_calls_total", tool="calculator", result="rejected")
    chat = ChatClient(pipeline.gateway_url)
    for expression in ("(9**99)**99", "(((9**99)**99)**99)**99"):
        started = time.monotonic()
        event, _ = chat.turn(chat.new_session(), f"calc: {expression}")
        assert event["type"] == "message" and "more than 100 digits" in event["content"], event
        assert time.monotonic() - started < 8, "the worker waited for a result that never came"
    event, _ = chat.turn(chat.new_session(), "calc: 6*7")
    assert event["type"] == "message" and "42" in event["content"]
    assert scrapes.value("tool_executor", "tool_calls_total", tool="calculator", result="rejected") == rejected + 2
