"""Prometheus recording and alert rules for the chat pipeline, as data.

The quantile recording rules come from the catalogue (every histogram gets p50, p95 and
p99 by job); the alerts are written here, each with a severity, a summary and a runbook
paragraph. :func:`render` writes them for a :class:`Profile`: ``PRODUCTION`` (5-minute
windows, minutes of ``for``) is what ``otel/rules/`` holds; ``TEST`` keeps the same
rules with second-scale windows so an integration test can see each alert fire.

Example::

    from chatobs.rules import PRODUCTION, render
    recording_yaml, alerts_yaml = render(PRODUCTION)
"""

from __future__ import annotations

from dataclasses import dataclass

import yaml

from chatobs.catalogue import CATALOGUE, Kind

__all__ = [
    "ALERTS",
    "ALERT_CASES",
    "PRODUCTION",
    "TEST",
    "Alert",
    "AlertCase",
    "Profile",
    "promtool_tests",
    "recording_rules",
    "render",
]


@dataclass(frozen=True)
class Profile:
    """How long the windows are. ``{w}`` in expressions is the rate window, ``{long}`` the
    trend window; ``for_scale`` multiplies every alert's ``for`` (in seconds)."""

    name: str
    window: str
    long_window: str
    for_scale: float
    llm_latency_p95_seconds: float


PRODUCTION = Profile("production", window="5m", long_window="10m", for_scale=1.0, llm_latency_p95_seconds=10.0)
TEST = Profile("test", window="20s", long_window="30s", for_scale=0.0, llm_latency_p95_seconds=1.0)


@dataclass(frozen=True)
class Alert:
    name: str
    expr: str
    for_seconds: int
    severity: str
    summary: str
    runbook: str


def _backend_burst(backend: str, title: str) -> Alert:
    return Alert(
        f"{title.replace(' ', '')}ErrorBurst",
        f"sum by (job) (rate({backend}_errors_total[{{w}}])) > 0.1",
        120,
        "warning",
        f"{title} client errors above 6 a minute on {{{{ $labels.job }}}}",
        f"The {title} client in this service is failing (the counter counts every failed client "
        f"operation, measured by chatobs's client instrumentation whether or not the call has a span). "
        f"Look at `{backend}_errors_total` by `operation` to see "
        f"what fails, check the server's health and connection limits, and the service log for the error "
        f"type. A burst right after a deploy usually means a bad address or credentials.",
    )


ALERTS: tuple[Alert, ...] = (
    Alert(
        "ChatHTTP5xxRatioHigh",
        "job:http_server_errors:ratio_rate5m > 0.05",
        300,
        "page",
        "More than 5% of {{ $labels.job }} requests answer 5xx",
        "Users are getting server errors. Check which routes fail "
        "(`http_server_request_duration_seconds_count` by `http_route` and status), then the backends the "
        "gateway needs to accept a message: PostgreSQL (the outbox insert) and Redis (SSE). "
        "`postgres_errors_total` and `redis_errors_total` usually point at the cause.",
    ),
    Alert(
        "LLMLatencyP95High",
        "histogram_quantile(0.95, sum by (le, provider) (rate(llm_latency_seconds_bucket[{w}]))) > {llm_p95}",
        600,
        "warning",
        "LLM p95 latency of {{ $labels.provider }} above {llm_p95}s",
        "Replies are slow because the LLM provider is. Compare `llm_time_to_first_token_seconds` (queueing at "
        "the provider) with the full latency (long generations), check the provider's status page and rate "
        'limits (`llm_errors_total{code="rate_limited"}`), and consider a smaller model or a lower '
        "completion limit.",
    ),
    Alert(
        "LLMProviderDown",
        "sum by (provider) (rate(llm_errors_total[{w}])) / sum by (provider) (rate(llm_requests_total[{w}])) > 0.5",
        120,
        "critical",
        "Most requests to LLM provider {{ $labels.provider }} fail",
        "More than half of the LLM calls fail: users get an error instead of an answer. "
        "`llm_errors_total` by `code` tells whether it is timeouts, connection failures, rate limiting or "
        "5xx. Check the provider's status, the API key and quota; switch provider if it lasts.",
    ),
    Alert(
        "SomabrainCircuitOpen",
        'max by (job) (circuit_state{component="somabrain"}) == 2',
        60,
        "warning",
        "Somabrain circuit open on {{ $labels.job }}: replies run in degraded bypass",
        "The worker stopped calling Somabrain after repeated failures; replies are produced without "
        'memories (`assistant_emitted_total{mode="degraded"}`) and memory writes are buffered in Redis. '
        "Check Somabrain's health and latency (`somabrain_calls_total` by `result`). The circuit closes by "
        "itself once a trial call succeeds.",
    ),
    Alert(
        "DegradedBufferGrowing",
        "degraded_buffer_size > 0 and delta(degraded_buffer_size[{long}]) > 0",
        300,
        "warning",
        "Buffered Somabrain writes keep growing on {{ $labels.job }}",
        "Memory writes are piling up under Redis `degraded:*` keys because Somabrain is unavailable; they "
        "are replayed when it recovers. Fix Somabrain first; watch Redis memory if it lasts for hours.",
    ),
    Alert(
        "OutboxBacklogNotDraining",
        "min_over_time(outbox_pending[{long}]) > 0 and delta(outbox_pending[{long}]) >= 0",
        300,
        "critical",
        "Outbox backlog not draining on {{ $labels.job }}",
        "Accepted messages are not reaching the WAL topic: they are safe in the PostgreSQL outbox, but "
        "no reply will come until they are published. Check the broker (`kafka_errors_total`, "
        "`wal_publish_errors_total`) and that the publisher runs.",
    ),
    Alert(
        "OutboxRowsParked",
        "sum by (job) (increase(outbox_rows_parked_total[{w}])) > 0",
        0,
        "critical",
        "Outbox rows too large to be sent on {{ $labels.job }}",
        "Some accepted messages are larger than one Kafka request may be, so the publisher set them "
        "aside and their users get no reply. The publisher's log names each row. Lower "
        "`CHATPIPE_MESSAGE_MAX_CHARS` so no new one is accepted; to send them, raise the producer's "
        "and the broker's limits, then `update outbox set parked_at = null where parked_at is not null`.",
    ),
    Alert(
        "WALPublishErrors",
        "sum by (job) (increase(wal_publish_errors_total[{w}])) > 0",
        0,
        "warning",
        "Publishing to the WAL topic fails on {{ $labels.job }}",
        "The broker did not acknowledge WAL records. The outbox keeps them and retries, so nothing is lost, "
        "but replies are delayed. Check the broker's health and `kafka_errors_total` by `operation`.",
    ),
    Alert(
        "TenantBudgetOverrun",
        # `or`, not `+`: a tenant may have token overruns and no message-overrun series at all.
        "sum by (tenant) (increase(tenant_budget_tokens_overruns_total[{w}])) > 0 "
        "or sum by (tenant) (increase(tenant_budget_messages_overruns_total[{w}])) > 0",
        0,
        "info",
        "Tenant {{ $labels.tenant }} is over its budget: requests are refused",
        "The tenant spent its token or message allowance for the window and its users are told so. If "
        "this is expected growth, raise the allowance (`CHATPIPE_TENANT_TOKEN_BUDGETS`, "
        "`CHATPIPE_TENANT_MESSAGE_BUDGETS`); if not, look for a runaway client.",
    ),
    _backend_burst("redis", "Redis"),
    _backend_burst("kafka", "Kafka"),
    _backend_burst("postgres", "PostgreSQL"),
    Alert(
        "ScrapeTargetDown",
        "up == 0",
        120,
        "critical",
        "{{ $labels.job }} at {{ $labels.instance }} cannot be scraped",
        "Prometheus cannot reach the service's /metrics: the process is down, or its metrics port is "
        "wrong in the targets file. Check the process, then `CHATOBS_METRICS_PORT` against "
        "`otel/targets/<job>.json`.",
    ),
)


def recording_rules() -> list[dict[str, str]]:
    """Rates, ratios and quantiles (``{w}`` is filled in by :func:`render`)."""
    rules = [
        {"record": "job:http_server_requests:rate5m",
         "expr": "sum by (job) (rate(http_server_request_duration_seconds_count[{w}]))"},
        {"record": "job:http_server_errors:ratio_rate5m",
         "expr": "sum by (job) (rate(http_server_request_duration_seconds_count"
                 '{http_response_status_code=~"5.."}[{w}]))'
                 " / sum by (job) (rate(http_server_request_duration_seconds_count[{w}]))"},
        {"record": "provider:llm_errors:ratio_rate5m",
         "expr": "sum by (provider) (rate(llm_errors_total[{w}])) / sum by (provider) (rate(llm_requests_total[{w}]))"},
        {"record": "provider_direction:llm_tokens:rate5m",
         "expr": "sum by (provider, direction) (rate(llm_tokens_total[{w}]))"},
        {"record": "chat:assistant_emitted:degraded_ratio_rate5m",
         "expr": 'sum(rate(assistant_emitted_total{mode="degraded"}[{w}])) / sum(rate(assistant_emitted_total[{w}]))'},
        {"record": "job:chat_messages_in:rate5m", "expr": "sum by (job) (rate(chat_messages_in_total[{w}]))"},
    ]  # fmt: skip
    for metric in CATALOGUE:
        if metric.kind is Kind.HISTOGRAM:
            # By route where there are routes: a server-sent event stream's request lasts minutes,
            # and summed with the others it would make every quantile of the job its own.
            level, by = ("job_route", "job, http_route") if "http_route" in metric.label_names else ("job", "job")
            for quantile, suffix in ((0.5, "p50"), (0.95, "p95"), (0.99, "p99")):
                rules.append({
                    "record": f"{level}:{metric.name}:{suffix}_5m",
                    "expr": f"histogram_quantile({quantile}, sum by ({by}, le) (rate({metric.name}_bucket[{{w}}])))",
                })  # fmt: skip
    return rules


def _duration(seconds: float) -> str:
    return f"{int(seconds)}s" if seconds else "0s"


def _fill(text: str, profile: Profile) -> str:
    # Plain token replacement: PromQL and Go templates are full of braces that str.format would eat.
    for token, value in (("{w}", profile.window), ("{long}", profile.long_window),
                         ("{llm_p95}", f"{profile.llm_latency_p95_seconds:g}")):  # fmt: skip
        text = text.replace(token, value)
    return text


def render(profile: Profile) -> tuple[str, str]:
    """``(recording rules YAML, alert rules YAML)`` for ``profile``."""
    header = f"# Generated by `chatobs docs` from src/chatobs/rules.py ({profile.name} profile); do not edit.\n"
    recording = {"groups": [{"name": "chat-pipeline-recording", "rules": [
        {"record": rule["record"], "expr": _fill(rule["expr"], profile)} for rule in recording_rules()
    ]}]}  # fmt: skip
    alerts = {"groups": [{"name": "chat-pipeline-alerts", "rules": [
        {
            "alert": alert.name,
            "expr": _fill(alert.expr, profile),
            "for": _duration(alert.for_seconds * profile.for_scale),
            "labels": {"severity": alert.severity},
            "annotations": {"summary": _fill(alert.summary, profile),
                            "runbook": alert.runbook},
        }
        for alert in ALERTS
    ]}]}  # fmt: skip
    dump = {"sort_keys": False, "width": 120, "allow_unicode": True}
    return header + yaml.safe_dump(recording, **dump), header + yaml.safe_dump(alerts, **dump)


@dataclass(frozen=True)
class AlertCase:
    """One promtool unit test: series (1-minute steps, promtool's expanding notation) and the
    label sets of the alerts expected at ``eval_time`` (none: the alert must not fire)."""

    alert: str
    series: dict[str, str]
    eval_time: str
    fires: tuple[dict[str, str], ...] = ()


def _http(status: str) -> str:
    return ('http_server_request_duration_seconds_count{job="gateway",http_route="/v1/sessions/{session_id}/messages",'
            f'http_request_method="POST",http_response_status_code="{status}"}}')  # fmt: skip


def _latency_buckets(bucket: str) -> dict[str, str]:
    labels = 'provider="openai",model="m",mode="normal"'
    return {f'llm_latency_seconds_bucket{{{labels},le="{le}"}}': ("0+5x40" if float(le) >= float(bucket) else "0x40")
            for le in ("1", "10", "20", "+Inf")}  # fmt: skip


#: A firing and a quiet case for every alert (``promtool test rules`` runs them, in CI).
ALERT_CASES: tuple[AlertCase, ...] = (
    AlertCase("ChatHTTP5xxRatioHigh", {_http("500"): "0+10x30", _http("202"): "0+90x30"}, "20m", ({"job": "gateway"},)),
    AlertCase("ChatHTTP5xxRatioHigh", {_http("500"): "0+1x30", _http("202"): "0+99x30"}, "20m"),
    AlertCase("LLMLatencyP95High", _latency_buckets("20"), "25m", ({"provider": "openai"},)),
    AlertCase("LLMLatencyP95High", _latency_buckets("1"), "25m"),
    AlertCase("LLMProviderDown", {'llm_errors_total{provider="openai",code="http_5xx"}': "0+8x20",
                                  'llm_requests_total{provider="openai",model="m",mode="normal"}': "0+10x20"},
              "10m", ({"provider": "openai"},)),
    AlertCase("LLMProviderDown", {'llm_errors_total{provider="openai",code="http_5xx"}': "0+1x20",
                                  'llm_requests_total{provider="openai",model="m",mode="normal"}': "0+10x20"}, "10m"),
    AlertCase("SomabrainCircuitOpen", {'circuit_state{job="worker",component="somabrain"}': "2x10"}, "5m",
              ({"job": "worker"},)),
    AlertCase("SomabrainCircuitOpen", {'circuit_state{job="worker",component="somabrain"}': "1x10"}, "5m"),
    AlertCase("DegradedBufferGrowing", {'degraded_buffer_size{job="worker"}': "0+3x30"}, "20m", ({"job": "worker"},)),
    AlertCase("DegradedBufferGrowing", {'degraded_buffer_size{job="worker"}': "10-1x10 0x20"}, "20m"),
    AlertCase("OutboxBacklogNotDraining", {'outbox_pending{job="publisher"}': "5+1x30"}, "20m",
              ({"job": "publisher"},)),
    AlertCase("OutboxBacklogNotDraining", {'outbox_pending{job="publisher"}': "5-1x5 0x25"}, "20m"),
    AlertCase("OutboxRowsParked", {'outbox_rows_parked_total{job="publisher"}': "0 0 0 1 1 1"}, "5m",
              ({"job": "publisher"},)),
    AlertCase("OutboxRowsParked", {'outbox_rows_parked_total{job="publisher"}': "1x10"}, "8m"),
    AlertCase("WALPublishErrors", {'wal_publish_errors_total{job="publisher",operation="produce"}': "0 0 0 1 2 3 4 5"},
              "6m", ({"job": "publisher"},)),
    AlertCase("WALPublishErrors", {'wal_publish_errors_total{job="publisher",operation="produce"}': "3x10"}, "8m"),
    AlertCase("TenantBudgetOverrun", {'tenant_budget_tokens_overruns_total{job="worker",tenant="acme"}': "0+1x10"},
              "5m", ({"tenant": "acme"},)),
    AlertCase("TenantBudgetOverrun", {'tenant_budget_messages_overruns_total{job="worker",tenant="acme"}': "0+1x10",
                                      'tenant_budget_tokens_overruns_total{job="worker",tenant="beta"}': "4x10"},
              "5m", ({"tenant": "acme"},)),
    AlertCase("TenantBudgetOverrun", {'tenant_budget_tokens_overruns_total{job="worker",tenant="acme"}': "5x10"}, "8m"),
    *(
        case
        for backend, alert, job, operation in (("redis", "RedisErrorBurst", "worker", "get"),
                                               ("kafka", "KafkaErrorBurst", "worker", "connect"),
                                               ("postgres", "PostgreSQLErrorBurst", "publisher", "connect"))
        for case in (
            AlertCase(alert, {f'{backend}_errors_total{{job="{job}",operation="{operation}"}}': "0+10x20"}, "10m",
                      ({"job": job},)),
            AlertCase(alert, {f'{backend}_errors_total{{job="{job}",operation="{operation}"}}': "0+1x20"}, "10m"),
        )
    ),
    AlertCase("ScrapeTargetDown", {'up{job="worker",instance="127.0.0.1:9464"}': "0x10"}, "5m",
              ({"job": "worker", "instance": "127.0.0.1:9464"},)),
    AlertCase("ScrapeTargetDown", {'up{job="worker",instance="127.0.0.1:9464"}': "1x10"}, "5m"),
)  # fmt: skip


def _template(text: str, labels: dict[str, str]) -> str:
    for name, value in labels.items():
        text = text.replace(f"{{{{ $labels.{name} }}}}", value)
    return text


def promtool_tests(rule_files: tuple[str, ...] = ("../recording.yml", "../alerts.yml")) -> str:
    """The ``promtool test rules`` file for :data:`ALERT_CASES` against the production rules."""
    by_name = {alert.name: alert for alert in ALERTS}
    tests = []
    for case in ALERT_CASES:
        alert = by_name[case.alert]
        expected = [
            {
                "exp_labels": {**labels, "severity": alert.severity},
                "exp_annotations": {"summary": _template(_fill(alert.summary, PRODUCTION), labels),
                                    "runbook": alert.runbook},
            }
            for labels in case.fires
        ]  # fmt: skip
        tests.append({
            "interval": "1m",
            "input_series": [{"series": series, "values": values} for series, values in case.series.items()],
            "alert_rule_test": [{"eval_time": case.eval_time, "alertname": case.alert, "exp_alerts": expected}],
        })  # fmt: skip
    document = {"rule_files": list(rule_files), "evaluation_interval": "1m", "tests": tests}
    header = "# Generated by `chatobs docs` from ALERT_CASES in src/chatobs/rules.py; do not edit.\n"
    return header + yaml.safe_dump(document, sort_keys=False, width=120, allow_unicode=True)
