from __future__ import annotations

from pathlib import Path

from chatobs import catalogue
from chatobs.catalogue import LATENCY_BUCKETS, TOKEN_BUCKETS, Kind
from chatobs.cli import main

ROOT = Path(__file__).resolve().parents[2]

# Transcribed from ../shared/SPEC.md, independently of the catalogue code.
SPEC_METRICS = {
    "chat_messages_in_total": ("counter", {"role", "source"}),
    "sessions_created_total": ("counter", set()),
    "sessions_deleted_total": ("counter", set()),
    "attachments_uploaded_total": ("counter", set()),
    "attachment_upload_seconds": ("histogram", set()),
    "sse_clients_gauge": ("gauge", set()),
    "sse_stream_errors_total": ("counter", {"reason"}),
    "chat_enqueue_seconds": ("histogram", set()),
    "context_build_seconds": ("histogram", set()),
    "llm_latency_seconds": ("histogram", {"model", "provider", "mode"}),
    "llm_time_to_first_token_seconds": ("histogram", {"model", "provider"}),
    "event_to_response_seconds": ("histogram", {"mode"}),
    "wal_publish_seconds": ("histogram", set()),
    "wal_consume_seconds": ("histogram", set()),
    "llm_requests_total": ("counter", {"model", "provider", "mode"}),
    "llm_tokens_total": ("counter", {"model", "provider", "direction"}),
    "llm_request_tokens": ("histogram", {"model", "provider", "direction"}),
    "llm_errors_total": ("counter", {"provider", "code"}),
    "somabrain_calls_total": ("counter", {"result"}),
    "somabrain_bypass_total": ("counter", set()),
    "assistant_emitted_total": ("counter", {"mode"}),
    "circuit_state": ("gauge", {"component"}),
    "degraded_buffer_size": ("gauge", set()),
    "outbox_pending": ("gauge", set()),
    "wal_publish_errors_total": ("counter", {"operation"}),
    "redis_errors_total": ("counter", {"operation"}),
    "kafka_errors_total": ("counter", {"operation"}),
    "postgres_errors_total": ("counter", {"operation"}),
    "tenant_budget_tokens_allowed": ("gauge", {"tenant"}),
    "tenant_budget_tokens_used": ("gauge", {"tenant"}),
    "tenant_budget_tokens_overruns_total": ("counter", {"tenant"}),
    "tenant_budget_messages_allowed": ("gauge", {"tenant"}),
    "tenant_budget_messages_used": ("gauge", {"tenant"}),
    "tenant_budget_messages_overruns_total": ("counter", {"tenant"}),
    "health_checks_total": ("counter", {"component", "result"}),
    "tool_calls_total": ("counter", {"tool", "result"}),
    "tool_call_seconds": ("histogram", {"tool"}),
}


def test_the_catalogue_covers_the_spec():
    for name, (prom_type, labels) in SPEC_METRICS.items():
        metric = catalogue.get(name)
        assert metric.prometheus_type == prom_type, name
        assert set(metric.label_names) == labels, name


def test_fixed_label_values_match_the_spec():
    assert catalogue.get("llm_requests_total").label("mode").values == ("normal", "degraded_bypass_somabrain")
    assert catalogue.get("assistant_emitted_total").label("mode").values == ("normal", "degraded")
    assert catalogue.get("somabrain_calls_total").label("result").values == (
        "success",
        "timeout",
        "circuit_open",
        "skipped",
        "error",
    )
    assert catalogue.get("llm_errors_total").label("code").values == (
        "timeout",
        "rate_limited",
        "http_4xx",
        "http_5xx",
        "connection",
        "other",  # the spec's own value for an unclassified failure, not only the overflow
    )
    assert catalogue.get("chat_messages_in_total").label("role").values == ("user", "assistant", "system", "tool")


def test_buckets_are_the_roadmap_ones():
    assert LATENCY_BUCKETS == (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20)
    assert TOKEN_BUCKETS == (64, 128, 256, 512, 1024, 2048, 4096, 8192)
    for metric in catalogue.CATALOGUE:
        if metric.kind is Kind.HISTOGRAM:
            expected = TOKEN_BUCKETS if metric.name == "llm_request_tokens" else LATENCY_BUCKETS
            assert metric.buckets == expected, metric.name


def test_every_service_role_owns_something_and_every_metric_has_an_owner():
    for role in catalogue.SERVICES:
        assert catalogue.for_service(role)
    assert all(metric.owners for metric in catalogue.CATALOGUE)


def test_generated_docs_are_current(capsys):
    assert main(["docs", "--check", "--root", str(ROOT)]) == 0, capsys.readouterr().err
    assert (ROOT / "docs" / "metrics.md").read_text() == catalogue.to_markdown()


def test_catalogue_command_prints_json_and_markdown(capsys):
    import json

    assert main(["catalogue", "--format", "json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert {entry["name"] for entry in entries} == {metric.name for metric in catalogue.CATALOGUE}
    assert main(["catalogue"]) == 0
    assert "| `llm_tokens_total` | counter |" in capsys.readouterr().out
