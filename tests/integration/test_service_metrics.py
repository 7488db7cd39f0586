"""A FastAPI service configured only by environment variables, scraped over HTTP."""

from __future__ import annotations

import math
import subprocess
import sys

import httpx
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from chatobs import catalogue
from chatobs.catalogue import SERVICES
from tests.conftest import clean_env, free_port

OPENMETRICS = "application/openmetrics-text; version=1.0.0"
# Families with no series in this test: real backends and outgoing HTTP drive the first four
# (tests/integration/test_backends.py); the self-metrics stay empty until something is wrong.
EMPTY_HERE = (
    "chatobs_label_rejections_total",
    "chatobs_recording_errors_total",
    "chatobs_export_failures_total",
    "chatobs_spans_dropped_total",
    "redis_operation_seconds",
    "kafka_operation_seconds",
    "postgres_operation_seconds",
    "http_client_request_duration_seconds",
)


def exposed(families):
    """{exposed name: family} (the parsers drop a counter's `_total`)."""
    return {(f"{f.name}_total" if f.type == "counter" else f.name): f for f in families}


@pytest.mark.parametrize("role", SERVICES)
def test_every_owned_metric_has_its_exact_name_type_and_buckets(start_service, role):
    service = start_service({"CHATOBS_SERVICE": role, "CHATOBS_LLM_MODELS": "sim-large"})
    assert service.scrape(path="/exercise").status_code == 405  # the route exists; GET is not it
    httpx.post(service.base_url + "/exercise", timeout=10).raise_for_status()

    response = service.scrape()
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = exposed(parse_text(response.text))
    owned = catalogue.for_service(role)
    assert {m.name for m in owned} <= set(families), "owned metrics missing from /metrics"
    for metric in owned:
        family = families[metric.name]
        assert family.type == metric.prometheus_type, metric.name
        if metric.buckets and family.samples:
            bounds = sorted({float(s.labels["le"]) for s in family.samples if s.name.endswith("_bucket")})
            assert bounds == [*metric.buckets, math.inf], metric.name
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == set(metric.label_names), sample
    empty = {m.name for m in owned if not families[m.name].samples}
    assert empty <= set(EMPTY_HERE), empty - set(EMPTY_HERE)
    # Nothing uncatalogued leaks out (SDK self-metrics, the legacy route's text).
    assert set(families) - {m.name for m in catalogue.CATALOGUE} == {"target_info"}
    assert "legacy_route_still_served" not in response.text


def test_openmetrics_is_negotiated_and_parses(start_service):
    service = start_service({"CHATOBS_SERVICE": "worker"})
    httpx.post(service.base_url + "/exercise", timeout=10).raise_for_status()
    response = service.scrape(accept=OPENMETRICS)
    assert response.headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    assert response.text.endswith("# EOF\n")
    families = exposed(parse_openmetrics(response.text))
    assert families["llm_requests_total"].samples[0].value == 1
    assert {m.name for m in catalogue.for_service("worker")} <= set(families)


def test_promtool_accepts_the_exposition(start_service, promtool):
    service = start_service({"CHATOBS_SERVICE": "gateway"})
    httpx.post(service.base_url + "/exercise", timeout=10).raise_for_status()
    result = subprocess.run(
        [promtool, "check", "metrics"], input=service.scrape().text, capture_output=True, text=True, timeout=30
    )
    problems = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    # The roadmap's own name: the one lint line the spec accepts.
    assert problems == ["sse_clients_gauge metric name should not include type 'gauge'"]


def test_label_value_outside_the_allowed_set_becomes_other_and_is_counted(start_service):
    service = start_service({"CHATOBS_SERVICE": "worker"})
    response = httpx.post(service.base_url + "/bad-labels", timeout=10)
    assert response.status_code == 200, "a bad label must not break the request"
    text = service.scrape().text
    assert 'somabrain_calls_total{result="other"} 1' in text
    assert 'chatobs_label_rejections_total{metric="somabrain_calls_total",label="result"} 1' in text
    assert 'chatobs_recording_errors_total{metric="llm_latency_seconds"} 1' in text


def test_gzip_when_asked(start_service):
    service = start_service({"CHATOBS_SERVICE": "gateway"})
    response = httpx.get(service.base_url + "/metrics", headers={"Accept-Encoding": "gzip"}, timeout=10)
    assert response.headers["content-encoding"] == "gzip"
    assert "# TYPE chat_messages_in_total counter" in response.text  # httpx decodes it


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"CHATOBS_METRICS_PORT": "abc"}, "CHATOBS_METRICS_PORT"),
        ({"OTEL_METRICS_EXPORTER": "prometheus,carrier-pigeon"}, "OTEL_METRICS_EXPORTER"),
        ({"OTEL_METRIC_EXPORT_INTERVAL": "soon"}, "OTEL_METRIC_EXPORT_INTERVAL"),
        ({"CHATOBS_SERVICE": "billing"}, "CHATOBS_SERVICE"),
        ({"CHATOBS_SCRAPE_TIMEOUT_SECOND": "3"}, "CHATOBS_SCRAPE_TIMEOUT_SECOND"),
    ],
)
def test_a_malformed_setting_stops_start_up_naming_the_variable(env, variable):
    env = {"CHATOBS_SERVICE": "gateway", **env}
    result = subprocess.run(
        [sys.executable, "-m", "uvicorn", "tests.apps.env_app:app", "--port", str(free_port())],
        env=clean_env(env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "ConfigError" in result.stderr and variable in result.stderr, result.stderr[-2000:]
