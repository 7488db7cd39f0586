"""In-process pipelines (fresh providers per test), asserting on the rendered scrape."""

from __future__ import annotations

import asyncio
import gzip
import time

import httpx
import pytest
from opentelemetry.context import Context
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from chatobs import Telemetry, load_settings
from chatobs.exposition import negotiate_openmetrics
from tests.metrics_text import value


def build(role: str = "worker", **env: str) -> Telemetry:
    return Telemetry(load_settings(env), service=role)


def scrape(telemetry: Telemetry, accept: str | None = None) -> str:
    status, _, body = telemetry.scrape(accept, None)
    assert status == 200
    return body.decode()


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in parse_text(text)
        for s in family.samples
        if s.name == name
    }


def test_unlabelled_metrics_show_zero_before_any_event():
    text = scrape(build("worker"))
    assert "somabrain_bypass_total 0\n" in text
    assert 'context_build_seconds_bucket{le="+Inf"} 0\n' in text
    assert "# TYPE llm_requests_total counter\n" in text  # labelled: declared, no series yet


def test_counter_values_and_histogram_buckets_are_cumulative():
    telemetry = build("worker")
    for seconds in (0.04, 0.3, 0.3, 7.0, 25.0):
        telemetry.llm.latency(seconds, "m", "p", "normal")
    buckets = {
        dict(labels)["le"]: value for labels, value in samples(scrape(telemetry), "llm_latency_seconds_bucket").items()
    }
    assert buckets == {
        "0.05": 1,
        "0.1": 1,
        "0.25": 1,
        "0.5": 3,
        "1.0": 3,
        "2.0": 3,
        "5.0": 3,
        "10.0": 4,
        "20.0": 4,
        "+Inf": 5,
    }


def test_first_seen_values_are_admitted_up_to_the_limit_then_other():
    telemetry = build("worker", CHATOBS_MAX_LABEL_VALUES="2")
    for model in ("a", "b", "c", "d", "a"):
        telemetry.llm.request(model, "p")
    text = scrape(telemetry)
    models = {dict(labels)["model"]: value for labels, value in samples(text, "llm_requests_total").items()}
    assert models == {"a": 2, "b": 1, "other": 2}
    assert 'chatobs_label_rejections_total{metric="llm_requests_total",label="model"} 2' in text


def test_configured_values_are_the_only_ones_admitted():
    telemetry = build("worker", CHATOBS_TENANTS="acme,globex")
    telemetry.budgets.token_overrun("acme")
    telemetry.budgets.token_overrun("initech")
    tenants = {dict(k)["tenant"] for k in samples(scrape(telemetry), "tenant_budget_tokens_overruns_total")}
    assert tenants == {"acme", "other"}


def test_recording_never_raises_and_failures_are_counted():
    telemetry = build("worker")
    telemetry.llm.latency("slow", "m", "p")  # type: ignore[arg-type]
    telemetry.llm.tokens("m", "p", prompt=None, completion=3)  # type: ignore[arg-type]
    telemetry.traffic.message_in(role=object(), source="web")  # type: ignore[arg-type]
    text = scrape(telemetry)
    assert 'chatobs_recording_errors_total{metric="llm_latency_seconds"} 1' in text
    assert 'chatobs_recording_errors_total{metric="llm_tokens_total"} 1' in text
    assert 'chat_messages_in_total{role="other",source="web"} 1' in text


def test_exemplars_carry_the_trace_id_in_openmetrics_only():
    telemetry = build("worker", OTEL_METRICS_EXEMPLAR_FILTER="trace_based")
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("turn") as span:
        telemetry.somabrain.context_build(0.2)
        trace_id = format(span.get_span_context().trace_id, "032x")
    om = scrape(telemetry, "application/openmetrics-text")
    bucket = next(
        s
        for f in parse_openmetrics(om)
        for s in f.samples
        if s.name == "context_build_seconds_bucket" and s.labels["le"] == "0.25"
    )
    assert bucket.exemplar is not None
    assert bucket.exemplar.labels["trace_id"] == trace_id
    assert bucket.exemplar.value == pytest.approx(0.2)
    assert trace_id not in scrape(telemetry)  # the classic text format has no exemplars


def _bucket_exemplar_trace(telemetry: Telemetry, le: str, span: bool = False) -> str | None:
    """The trace id (or, with ``span``, the span id) of a ``context_build_seconds`` bucket's
    exemplar, as an OpenMetrics scrape shows it."""
    om = scrape(telemetry, "application/openmetrics-text")
    for family in parse_openmetrics(om):
        for sample in family.samples:
            if sample.name == "context_build_seconds_bucket" and sample.labels["le"] == le:
                return sample.exemplar.labels["span_id" if span else "trace_id"] if sample.exemplar else None
    raise AssertionError(f"no context_build_seconds bucket le={le}")


def test_a_bucket_looks_for_its_exemplar_at_most_once_per_interval(monkeypatch):
    """A bucket keeps the span of its first observation in an interval, and an observation
    outside any span counts as that look too; after the interval, the next one is kept."""
    from chatobs import cells

    monkeypatch.setattr(cells, "EXEMPLAR_REFRESH_NS", 200_000_000)  # 0.2 s, not 1 s: a quick test
    telemetry = build("worker", OTEL_METRICS_EXEMPLAR_FILTER="trace_based")
    tracer = TracerProvider().get_tracer("test")

    def in_span(seconds: float) -> str:
        with tracer.start_as_current_span("turn") as span:
            telemetry.somabrain.context_build(seconds)
            return format(span.get_span_context().trace_id, "032x")

    first = in_span(0.2)
    in_span(0.2)  # the same interval: the bucket does not look again
    assert _bucket_exemplar_trace(telemetry, "0.25") == first
    telemetry.somabrain.context_build(0.4)  # no span: bucket le=0.5 looked, found nothing
    in_span(0.4)
    assert _bucket_exemplar_trace(telemetry, "0.5") is None
    time.sleep(0.25)
    later = in_span(0.2)
    assert _bucket_exemplar_trace(telemetry, "0.25") == later


def test_each_observation_keeps_the_span_current_then(monkeypatch):
    """The exemplar is the span current at the observation, as contexts change and come back
    (a child span and its parent again, another task's span, none): the sampler's memory of
    the last context it looked at must never lend one span's exemplar to another."""
    from chatobs import cells

    monkeypatch.setattr(cells, "EXEMPLAR_REFRESH_NS", 0)  # every observation looks
    telemetry = build("worker", OTEL_METRICS_EXEMPLAR_FILTER="trace_based")
    tracer = TracerProvider().get_tracer("test")

    def observed() -> str | None:
        telemetry.somabrain.context_build(0.2)
        return _bucket_exemplar_trace(telemetry, "0.25", span=True)

    def span_id(span) -> str:
        return format(span.get_span_context().span_id, "016x")

    with tracer.start_as_current_span("parent") as parent:
        assert observed() == span_id(parent)
        with tracer.start_as_current_span("child") as child:
            assert observed() == span_id(child)
        assert observed() == span_id(parent)  # the parent's context, current again
    with tracer.start_as_current_span("other", context=Context()) as other:
        assert observed() == span_id(other)
    assert observed() == span_id(other)  # no span: the bucket keeps what it had
    with tracer.start_as_current_span("again", context=Context()) as again:
        assert observed() == span_id(again)


def test_target_info_and_scope_labels_follow_the_settings():
    default = scrape(build("gateway", OTEL_SERVICE_NAME="gw-eu-1"))
    assert 'service_name="gw-eu-1"' in default and "target_info{" in default
    assert "otel_scope_name" not in default
    flipped = build("gateway", CHATOBS_EXPOSE_TARGET_INFO="false", CHATOBS_EXPOSE_SCOPE_LABELS="true")
    flipped.traffic.message_in("user", "web")
    text = scrape(flipped)
    assert "target_info" not in text
    assert 'chat_messages_in_total{role="user",source="web",otel_scope_name="chatobs",otel_scope_version=' in text
    list(parse_text(text))


def test_resource_attributes_reach_target_info():
    text = scrape(build("gateway", OTEL_RESOURCE_ATTRIBUTES="deployment.environment=staging"))
    assert 'deployment_environment="staging"' in text


def test_label_values_are_escaped():
    telemetry = build("worker")
    telemetry.llm.request('gpt "4"\\\n', "p")
    text = scrape(telemetry, "application/openmetrics-text")
    [family] = [f for f in parse_openmetrics(text) if f.name == "llm_requests"]
    assert family.samples[0].labels["model"] == 'gpt "4"\\\n'


@pytest.mark.parametrize(
    ("accept", "openmetrics"),
    [
        (None, False),
        ("text/plain", False),
        ("*/*", False),
        ("application/openmetrics-text", True),
        (
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
            "text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
            True,
        ),
        ("application/openmetrics-text;q=0.2,text/plain;q=0.9", False),
        ("application/openmetrics-text;q=0", False),
        # Prometheus 3's header, with its escaping parameter.
        (
            "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,"
            "text/plain;version=0.0.4;q=0.4,*/*;q=0.1",
            True,
        ),
        # The most specific range decides for text: refused here, though */* is welcome.
        ("text/plain;version=0.0.4;q=0,application/openmetrics-text;version=1.0.0;q=0.5,*/*;q=0.9", True),
        ("text/*;q=0.1,application/openmetrics-text;q=0.5,*/*;q=0.9", True),
        # Only an OpenMetrics version this does not serve: the classic format, as prometheus_client.
        ("application/openmetrics-text;version=0.0.1", False),
        ("application/openmetrics-text;version=2.0.0,text/plain;q=0.1", False),
        ('application/openmetrics-text; version="1.0.0"', True),
    ],
)
def test_content_negotiation(accept, openmetrics):
    assert negotiate_openmetrics(accept) is openmetrics


def test_gzip_body_and_headers():
    telemetry = build("gateway")
    _, headers, body = telemetry.scrape("text/plain", "deflate, gzip;q=0.8")
    assert headers["Content-Encoding"] == "gzip"
    assert b"# TYPE chat_messages_in_total counter" in gzip.decompress(body)
    _, headers, _ = telemetry.scrape("text/plain", "gzip;q=0")
    assert "Content-Encoding" not in headers


def test_sdk_disabled_records_nothing_and_raises_nothing():
    telemetry = build("worker", OTEL_SDK_DISABLED="true")
    telemetry.llm.request("m", "p")
    telemetry.backlog.outbox_pending(3)
    status, _, _ = telemetry.scrape()
    assert status == 404
    telemetry.shutdown()


def test_prometheus_export_off_means_no_scrape():
    telemetry = build("worker", OTEL_METRICS_EXPORTER="none")
    telemetry.llm.request("m", "p")
    assert telemetry.scrape()[0] == 404


def test_backend_error_series_exists_from_the_first_success():
    # Prometheus's increase() of a series that first appears at 1 is 0: the error series must
    # be at 0 before the first failure, and count each failure after it.
    telemetry = build("worker")
    for _ in range(3):
        telemetry.clients.operation("postgres", "select", 0.002, failed=False)
    errors = samples(scrape(telemetry), "postgres_errors_total")
    assert errors == {(("operation", "select"),): 0}
    telemetry.clients.operation("postgres", "select", 0.004, failed=True)
    telemetry.clients.operation("postgres", "insert", 0.004, failed=True)
    text = scrape(telemetry)
    assert samples(text, "postgres_errors_total") == {(("operation", "select"),): 1, (("operation", "insert"),): 1}
    assert samples(text, "postgres_operation_seconds_count") == {
        (("operation", "select"),): 4,
        (("operation", "insert"),): 1,
    }
    telemetry.shutdown()


def test_a_bound_operation_records_what_the_recorder_does_and_never_raises():
    """``clients.bound(...)`` (what the client instrumentors keep per statement kind) gives the
    scrape ``clients.operation(...)`` gives, and a bad value is counted, not raised."""
    by_call, by_handle = build("worker"), build("worker")
    select = by_handle.clients.bound("postgres", "select")
    for seconds, failed in ((0.002, False), (0.04, True), (0.7, False)):
        by_call.clients.operation("postgres", "select", seconds, failed=failed)
        select.record(seconds, failed)
    by_handle.clients.bound("postgres", "select").record(0.01, False)  # bound again: the same series
    by_call.clients.operation("postgres", "select", 0.01, failed=False)

    def postgres_lines(telemetry: Telemetry) -> list[str]:
        return [line for line in scrape(telemetry).splitlines() if line.startswith("postgres_")]

    assert postgres_lines(by_handle) == postgres_lines(by_call)
    assert 'postgres_operation_seconds_count{operation="select"} 4' in postgres_lines(by_handle)
    select.record(float("nan"), False)  # type: ignore[arg-type]
    select.record("slow", False)  # type: ignore[arg-type]
    errors = samples(scrape(by_handle), "chatobs_recording_errors_total")
    assert errors == {(("metric", "postgres_operation_seconds"),): 2}
    with pytest.raises(ValueError, match="unknown backend"):
        by_handle.clients.bound("mysql", "select")  # type: ignore[arg-type]
    by_call.shutdown()
    by_handle.shutdown()


def test_request_duration_keeps_the_request_span_as_exemplar():
    # A sampled request (its traceparent continued) leaves its trace id on the duration
    # bucket; an unsampled one leaves none (OTEL_METRICS_EXEMPLAR_FILTER=trace_based).
    from fastapi import FastAPI

    from chatobs.instrumentation import instrument_app

    telemetry = build("gateway", OTEL_METRICS_EXEMPLAR_FILTER="trace_based")
    app = FastAPI()

    @app.get("/items/{item}")
    async def item(item: str) -> dict[str, str]:
        return {"item": item}

    instrument_app(app, telemetry.tracer, telemetry.cells, excluded_paths=())
    sampled, unsampled = "4bf92f3577b34da6a3ce929d0e0e4736", "0af7651916cd43dd8448eb211c80319c"

    async def requests() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
            for trace_id, flags in ((sampled, "01"), (unsampled, "00")):
                headers = {"traceparent": f"00-{trace_id}-00f067aa0ba902b7-{flags}"}
                assert (await client.get("/items/a", headers=headers)).status_code == 200

    asyncio.run(requests())
    om = scrape(telemetry, "application/openmetrics-text")
    exemplars = [
        s.exemplar.labels["trace_id"]
        for f in parse_openmetrics(om)
        for s in f.samples
        if s.name == "http_server_request_duration_seconds_bucket" and s.exemplar is not None
    ]
    assert exemplars == [sampled]
    assert 'http_route="/items/{item}"' in om
    telemetry.shutdown()


class _Failing(SpanProcessor):
    """A span processor that raises where it is told to: a user's, or a broken exporter's."""

    def __init__(self) -> None:
        self.fail_in: set[str] = set()

    def on_start(self, span, parent_context=None) -> None:
        if "start" in self.fail_in:
            raise RuntimeError("on_start failed")

    def on_end(self, span) -> None:
        if "end" in self.fail_in:
            raise RuntimeError("on_end failed")


# The lean tracer swallows a processor's failure itself (logged once): every request is still
# measured. The SDK's tracer raises it into the middleware, which serves the request anyway and
# counts the failure (a failed start: served unmeasured).
@pytest.mark.parametrize(("tracer", "measured", "errors"), [("lean", 4, 0), ("sdk", 2, 4)])
def test_a_failing_span_processor_fails_no_request(tracer: str, measured: int, errors: int):
    from fastapi import FastAPI

    processor = _Failing()
    settings = load_settings({"OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "httpx,redis,asyncpg,aiokafka",
                              "CHATOBS_TRACER": tracer})  # fmt: skip
    telemetry = Telemetry(settings, service="gateway", span_processors=[processor])
    app = FastAPI()

    @app.get("/ok")
    async def ok() -> dict[str, str]:
        return {"ok": "yes"}

    @app.get("/boom")
    async def boom() -> None:
        raise LookupError("the app's own")

    assert telemetry.instrument(app) == ["fastapi"]

    async def requests() -> list[int]:
        statuses = []
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
            for fail_in in ({"start"}, {"end"}, {"start", "end"}, set()):
                processor.fail_in = fail_in
                statuses.append((await client.get("/ok")).status_code)
            processor.fail_in = {"end"}
            with pytest.raises(LookupError, match="the app's own"):  # unchanged, not the processor's
                await client.get("/boom")
        return statuses

    assert asyncio.run(requests()) == [200, 200, 200, 200]
    text = scrape(telemetry)
    assert value(text, "http_server_request_duration_seconds_count", http_route="/ok") == measured
    assert value(text, "chatobs_recording_errors_total", metric="http_server_request_duration_seconds") == errors
    telemetry.shutdown()


def test_a_cells_kept_label_text_follows_its_scope_and_its_own_attributes():
    """A cell's label text is kept between scrapes; each cell shows its own labels, and a new
    scope's labels are shown, not the text kept under the old scope."""
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    from chatobs.cells import CounterCell, LocalCells
    from chatobs.exposition import Renderer

    renderer = Renderer("worker", target_info=False, scope_labels=True)
    cells = [CounterCell({"model": name, "provider": "sim", "mode": "normal"}) for name in ("a", "b")]
    for amount, cell in enumerate(cells, start=1):
        cell.add(amount)
    for version in ("1.0", "1.0", "2.0"):
        local = LocalCells({"llm_requests_total": cells}, InstrumentationScope("s", version))
        text = renderer.render(None, False, local)
        samples = {s.labels["model"]: (s.value, s.labels["otel_scope_version"])
                   for f in parse_text(text) if f.name == "llm_requests" for s in f.samples}  # fmt: skip
        assert samples == {"a": (1.0, version), "b": (2.0, version)}
