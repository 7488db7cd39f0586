"""The metric catalogue: every metric of the chat pipeline, as data.

This module is the single source of truth. Instruments, Views, histogram buckets,
the exposition renderer, ``docs/metrics.md``, ``chatobs check`` and the tests
all read it; adding a metric is adding one :class:`Metric` entry to
:data:`CATALOGUE`.

It imports nothing from the rest of the project so that every other layer can
depend on it.

Example::

    >>> from chatobs.catalogue import get
    >>> get("llm_requests_total").label_names
    ('model', 'provider', 'mode')
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = [
    "ALL_SERVICES",
    "CATALOGUE",
    "CATALOGUE_NAMES",
    "LATENCY_BUCKETS",
    "OVERFLOW_VALUE",
    "PROCESS_LABEL",
    "SERVICES",
    "TOKEN_BUCKETS",
    "Combine",
    "Kind",
    "Label",
    "Metric",
    "allowed_fixed_values",
    "for_service",
    "get",
    "to_json",
    "to_markdown",
]

#: Roles of the chat-pipeline services. A metric's ``owners`` name these.
SERVICES: tuple[str, ...] = ("gateway", "worker", "publisher", "replicator", "tool_executor")

#: Owner wildcard: the metric is emitted by every service.
ALL_SERVICES = "*"

#: The value recorded in place of a label value outside the allowed set.
OVERFLOW_VALUE = "other"

#: Stands for "any catalogue name" in the self-metrics' label values.
CATALOGUE_NAMES = "*catalogue*"

#: The label a per-process metric carries when several worker processes share one scrape.
PROCESS_LABEL = "pid"

#: Roadmap latency buckets, in seconds.
LATENCY_BUCKETS: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0)

#: Roadmap token-count buckets.
TOKEN_BUCKETS: tuple[float, ...] = (64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0)


class Kind(enum.Enum):
    """How a metric is recorded (the OpenTelemetry instrument) and exposed.

    Example::

        [metric.name for metric in CATALOGUE if metric.kind is Kind.HISTOGRAM]
    """

    COUNTER = "counter"
    HISTOGRAM = "histogram"
    #: Synchronous gauge set to the last value (OpenTelemetry ``Gauge``).
    GAUGE = "gauge"
    #: Gauge moved by increments (OpenTelemetry ``UpDownCounter``).
    UP_DOWN = "up_down_counter"
    #: Gauge read by a callback at collection time.
    OBSERVABLE_GAUGE = "observable_gauge"
    #: Monotonic total read by a callback at collection time.
    OBSERVABLE_COUNTER = "observable_counter"

    @property
    def prometheus_type(self) -> str:
        """The ``# TYPE`` a Prometheus scrape shows for this kind."""
        if self in (Kind.COUNTER, Kind.OBSERVABLE_COUNTER):
            return "counter"
        if self is Kind.HISTOGRAM:
            return "histogram"
        return "gauge"


class Combine(enum.Enum):
    """How one scrape combines the values of several worker processes of a service
    (``CHATOBS_MULTIPROCESS_DIR``, e.g. ``gunicorn -w 4``); single-process services ignore it."""

    #: Sum over every process that ever ran, exited or killed ones included (counters and
    #: histograms: a killed worker's requests still happened).
    SUM = "sum"
    #: Sum over the live processes only (gauges of things a process holds, such as connections).
    LIVE_SUM = "live_sum"
    #: Largest value among the live processes (states where the worst one matters).
    LIVE_MAX = "live_max"
    #: One series per live process, labelled ``pid`` (process CPU, memory, file descriptors).
    PER_PROCESS = "per_process"
    #: Measured at collection by the process that answers the scrape (a query of shared state).
    SERVING_PROCESS = "serving_process"

    @classmethod
    def default_for(cls, kind: Kind) -> Combine:
        if kind in (Kind.COUNTER, Kind.HISTOGRAM):
            return cls.SUM
        if kind is Kind.UP_DOWN:
            return cls.LIVE_SUM
        if kind is Kind.GAUGE:
            return cls.LIVE_MAX
        return cls.SERVING_PROCESS


@dataclass(frozen=True)
class Label:
    """A label key and the values it may take.

    ``values`` fixes the allowed set in the catalogue. ``setting`` instead names
    a field of :class:`chatobs.settings.ChatobsSettings` that lists the allowed
    values for a deployment (models, providers, tenants...). When that setting
    is empty, the first ``CHATOBS_MAX_LABEL_VALUES`` distinct values seen are
    admitted. Anything outside the set is recorded as :data:`OVERFLOW_VALUE`.
    ``bounded_by`` is for labels an instrumentation library sets: it says what
    bounds them (route templates, status codes), and their values are not checked.

    Example::

        Label("mode", values=("normal", "degraded"))  # anything else is recorded as `other`
        Label("model", setting="llm_models")  # CHATOBS_LLM_MODELS lists them, or the first N seen
    """

    name: str
    values: tuple[str, ...] = ()
    setting: str | None = None
    bounded_by: str | None = None

    def __post_init__(self) -> None:
        if sum(map(bool, (self.values, self.setting, self.bounded_by))) != 1:
            raise ValueError(f"label {self.name!r}: give exactly one of values=, setting= or bounded_by=")

    def describe(self) -> str:
        """Human-readable allowed values, for docs and CLI output."""
        if self.values:
            return ", ".join(self.values)
        if self.setting:
            return f"from `CHATOBS_{self.setting.upper()}`"
        return f"bounded by {self.bounded_by}"


@dataclass(frozen=True)
class Metric:
    """One metric exactly as Prometheus shows it.

    ``name`` is the exposed name (counters keep their ``_total``); the
    OpenTelemetry instrument carries the same name so that OTLP push and the
    ``/metrics`` scrape agree.

    Example::

        metric = next(m for m in CATALOGUE if m.name == "llm_requests_total")
        metric.kind, [label.name for label in metric.labels]  # (Kind.COUNTER, ["model", "provider", "mode"])
    """

    name: str
    kind: Kind
    unit: str
    description: str
    owners: frozenset[str]
    domain: str
    labels: tuple[Label, ...] = ()
    buckets: tuple[float, ...] | None = None
    bucket_set: str | None = None
    notes: str = ""
    #: How several worker processes combine (``None``: the default for the kind, see :class:`Combine`).
    combine: Combine | None = None
    _label_index: dict[str, Label] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if (self.kind is Kind.HISTOGRAM) != (self.buckets is not None):
            raise ValueError(f"{self.name}: histograms, and only histograms, have buckets")
        if self.kind.prometheus_type == "counter" and not self.name.endswith("_total"):
            raise ValueError(f"{self.name}: counter names end in _total")
        unknown = self.owners - set(SERVICES) - {ALL_SERVICES}
        if unknown:
            raise ValueError(f"{self.name}: unknown owners {sorted(unknown)}")
        self._label_index.update({label.name: label for label in self.labels})
        if self.combine is None:
            object.__setattr__(self, "combine", Combine.default_for(self.kind))
        if self.combine is Combine.PER_PROCESS and self.kind not in (Kind.OBSERVABLE_GAUGE, Kind.OBSERVABLE_COUNTER):
            raise ValueError(f"{self.name}: only callback-read metrics are measured per process")
        if self.combine is Combine.SUM and self.kind not in (Kind.COUNTER, Kind.HISTOGRAM):
            raise ValueError(f"{self.name}: only recorded counters and histograms sum over every process")

    @property
    def label_names(self) -> tuple[str, ...]:
        return tuple(label.name for label in self.labels)

    @property
    def prometheus_type(self) -> str:
        return self.kind.prometheus_type

    @property
    def family(self) -> str:
        """The OpenMetrics family name (a counter's name without ``_total``)."""
        if self.prometheus_type == "counter":
            return self.name[: -len("_total")]
        return self.name

    def label(self, name: str) -> Label:
        return self._label_index[name]

    def owned_by(self, service: str) -> bool:
        return ALL_SERVICES in self.owners or service in self.owners


_EVERY = frozenset({ALL_SERVICES})
_GATEWAY = frozenset({"gateway"})
_WORKER = frozenset({"worker"})
_PUBLISHER = frozenset({"publisher"})
_TOOL_EXECUTOR = frozenset({"tool_executor"})
_LLM_CALLERS = frozenset({"worker", "tool_executor"})

_MODEL = Label("model", setting="llm_models")
_PROVIDER = Label("provider", setting="llm_providers")
_LLM_ERROR_CODES = ("timeout", "rate_limited", "http_4xx", "http_5xx", "connection")
_TENANT = Label("tenant", setting="tenants")
_TOOL = Label("tool", setting="tools")
_LLM_MODE = Label("mode", values=("normal", "degraded_bypass_somabrain"))
_EMIT_MODE = Label("mode", values=("normal", "degraded"))
_DIRECTION = Label("direction", values=("in", "out"))
#: What a health check probes: each service its own backends (the gateway on `/health`).
_COMPONENT = Label("component", values=("somabrain", "llm", "redis", "postgres", "kafka"))
#: What has a circuit breaker: Somabrain's calls, in the worker.
_BREAKER = Label("component", values=("somabrain",))

# Redis commands the pipeline uses; anything else is counted under `other`.
_REDIS_OPERATIONS = (
    "get", "set", "setex", "del", "exists", "expire", "incr", "incrby", "decr", "decrby",
    "hget", "hset", "hincrby", "hgetall", "mget", "mset", "lpush", "rpush", "lpop", "rpop",
    "lrange", "llen", "sadd", "srem", "smembers", "scan", "eval", "evalsha", "publish",
    "subscribe", "unsubscribe", "xadd", "xread", "blpop", "ping", "pipeline",
)  # fmt: skip
_KAFKA_OPERATIONS = ("produce", "consume", "commit", "connect")
_REDIS_USERS = frozenset({"gateway", "worker", "tool_executor"})  # the executor hands results back through Redis
_KAFKA_USERS = frozenset({"worker", "publisher", "replicator", "tool_executor"})
_POSTGRES_USERS = frozenset({"gateway", "publisher", "replicator"})
_HTTP_METHOD = Label("http_request_method", bounded_by="known methods, else `_OTHER`")
_HTTP_STATUS = Label("http_response_status_code", bounded_by="status codes")
_POSTGRES_OPERATIONS = (
    "select", "insert", "update", "delete", "begin", "commit", "rollback", "execute", "listen", "connect",
    "create",  # the schema, applied at start
)  # fmt: skip


def counter(
    name: str, description: str, *, unit: str, owners: frozenset[str], domain: str, labels: tuple[Label, ...] = ()
) -> Metric:
    return Metric(name, Kind.COUNTER, unit, description, owners, domain, labels)


def gauge(
    name: str,
    description: str,
    *,
    unit: str,
    owners: frozenset[str],
    domain: str,
    labels: tuple[Label, ...] = (),
    kind: Kind = Kind.GAUGE,
    notes: str = "",
    combine: Combine | None = None,
) -> Metric:
    return Metric(name, kind, unit, description, owners, domain, labels, notes=notes, combine=combine)


def latency(
    name: str, description: str, *, owners: frozenset[str], domain: str, labels: tuple[Label, ...] = ()
) -> Metric:
    """A duration histogram in seconds with the roadmap's latency buckets."""
    return Metric(
        name, Kind.HISTOGRAM, "s", description, owners, domain, labels, buckets=LATENCY_BUCKETS, bucket_set="latency"
    )


def backend_errors(backend: str, title: str, *, owners: frozenset[str], operations: tuple[str, ...]) -> Metric:
    return counter(
        f"{backend}_errors_total",
        f"Failed {title} client operations, measured by chatobs's client instrumentation.",
        unit="{error}",
        owners=owners,
        domain="backends",
        labels=(Label("operation", values=operations),),
    )


def backend_latency(backend: str, title: str, *, owners: frozenset[str], operations: tuple[str, ...]) -> Metric:
    return latency(
        f"{backend}_operation_seconds",
        f"{title} client operation duration, measured by chatobs's client instrumentation.",
        owners=owners,
        domain="backends",
        labels=(Label("operation", values=operations),),
    )


#: Every metric of the pipeline, in documentation (and exposition) order.
CATALOGUE: tuple[Metric, ...] = (
    # --- Traffic (gateway) -------------------------------------------------------
    counter(
        "chat_messages_in_total",
        "Chat messages accepted by the gateway.",
        unit="{message}",
        owners=_GATEWAY,
        domain="traffic",
        labels=(
            Label("role", values=("user", "assistant", "system", "tool")),
            Label("source", setting="message_sources"),
        ),
    ),
    counter("sessions_created_total", "Chat sessions created.", unit="{session}", owners=_GATEWAY, domain="traffic"),
    counter("sessions_deleted_total", "Chat sessions deleted.", unit="{session}", owners=_GATEWAY, domain="traffic"),
    counter(
        "attachments_uploaded_total",
        "Attachments stored successfully.",
        unit="{attachment}",
        owners=_GATEWAY,
        domain="traffic",
    ),
    latency(
        "attachment_upload_seconds", "Time to receive and store one attachment.", owners=_GATEWAY, domain="traffic"
    ),
    gauge(
        "sse_clients_gauge",
        "Server-Sent Events clients currently connected.",
        unit="{client}",
        owners=_GATEWAY,
        domain="traffic",
        kind=Kind.UP_DOWN,
        notes="The roadmap's name; `promtool check metrics` flags the `_gauge` suffix, which is accepted.",
    ),
    counter(
        "sse_stream_errors_total",
        "Server-Sent Events stream errors: a stream ended by one (client_disconnect: the client left mid-reply; "
        "timeout: no event within the idle timeout; backend_error: Redis went away), or a worker event it could "
        "not read and skipped, the stream going on (encode_error, once per event).",
        unit="{error}",
        owners=_GATEWAY,
        domain="traffic",
        labels=(Label("reason", values=("client_disconnect", "timeout", "backend_error", "encode_error")),),
    ),
    # --- Latency -------------------------------------------------------------------
    latency(
        "chat_enqueue_seconds",
        "Gateway enqueue: from request to the message stored durably in the outbox.",
        owners=_GATEWAY,
        domain="latency",
    ),
    latency(
        "context_build_seconds", "Worker prompt build, Somabrain recall included.", owners=_WORKER, domain="latency"
    ),
    latency(
        "llm_latency_seconds",
        "LLM call duration, request sent to last token received (the time spent handing tokens on excluded); "
        "a failed call's too, up to its failure (a timeout: its whole wait).",
        owners=_LLM_CALLERS,
        domain="llm",
        labels=(_MODEL, _PROVIDER, _LLM_MODE),
    ),
    latency(
        "llm_time_to_first_token_seconds",
        "Streaming LLM calls: request sent to first token received.",
        owners=_WORKER,
        domain="llm",
        labels=(_MODEL, _PROVIDER),
    ),
    latency(
        "event_to_response_seconds",
        "User event accepted to assistant reply emitted.",
        owners=_WORKER,
        domain="latency",
        labels=(_EMIT_MODE,),
    ),
    latency("wal_publish_seconds", "Publishing one record to the WAL topic.", owners=_PUBLISHER, domain="backlog"),
    latency(
        "wal_consume_seconds",
        "Handling one consumed WAL record, received to done with: answered (worker), stored and committed "
        "with its batch (replicator). An attempt that failed and comes again is not counted.",
        owners=frozenset({"worker", "replicator"}),
        domain="backlog",
    ),
    # --- LLM usage -------------------------------------------------------------------
    counter(
        "llm_requests_total",
        "LLM requests sent.",
        unit="{request}",
        owners=_LLM_CALLERS,
        domain="llm",
        labels=(_MODEL, _PROVIDER, _LLM_MODE),
    ),
    counter(
        "llm_tokens_total",
        "LLM tokens as reported by the provider's usage.",
        unit="{token}",
        owners=_LLM_CALLERS,
        domain="llm",
        labels=(_MODEL, _PROVIDER, _DIRECTION),
    ),
    Metric(
        "llm_request_tokens",
        Kind.HISTOGRAM,
        "{token}",
        "Tokens per LLM request, by direction.",
        _LLM_CALLERS,
        "llm",
        (_MODEL, _PROVIDER, _DIRECTION),
        buckets=TOKEN_BUCKETS,
        bucket_set="tokens",
    ),
    counter(
        "llm_errors_total",
        "Failed LLM requests.",
        unit="{error}",
        owners=_LLM_CALLERS,
        domain="llm",
        # `other` is declared: the spec's code of an unclassified failure, not only the overflow.
        labels=(_PROVIDER, Label("code", values=(*_LLM_ERROR_CODES, OVERFLOW_VALUE))),
    ),
    # --- Somabrain / degradation -------------------------------------------------------
    counter(
        "somabrain_calls_total",
        "Somabrain recall/remember calls by outcome.",
        unit="{call}",
        owners=_WORKER,
        domain="somabrain",
        labels=(Label("result", values=("success", "timeout", "circuit_open", "skipped", "error")),),
    ),
    counter(
        "somabrain_bypass_total",
        "Replies produced without Somabrain (degraded bypass).",
        unit="{reply}",
        owners=_WORKER,
        domain="somabrain",
    ),
    counter(
        "assistant_emitted_total",
        "Assistant replies emitted to the client.",
        unit="{reply}",
        owners=_WORKER,
        domain="somabrain",
        labels=(_EMIT_MODE,),
    ),
    gauge(
        "circuit_state",
        "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
        unit="1",
        owners=_WORKER,
        domain="somabrain",
        labels=(_BREAKER,),
    ),
    # --- Backlog / reliability -----------------------------------------------------------
    gauge(
        "degraded_buffer_size",
        "Memory writes buffered in Redis `degraded:*` keys during a Somabrain outage.",
        unit="{key}",
        owners=_WORKER,
        domain="backlog",
        kind=Kind.OBSERVABLE_GAUGE,
    ),
    gauge(
        "outbox_pending",
        "Outbox rows not yet published to the WAL.",
        unit="{row}",
        owners=_PUBLISHER,
        domain="backlog",
        kind=Kind.OBSERVABLE_GAUGE,
    ),
    counter(
        "outbox_rows_parked_total",
        "Outbox rows too large to be sent (the producer refuses them), set aside unsent: their messages "
        "get no reply until an operator clears `parked_at`.",
        unit="{row}",
        owners=_PUBLISHER,
        domain="backlog",
    ),
    counter(
        "wal_publish_errors_total",
        "Failed publishes to the WAL topic.",
        unit="{error}",
        owners=_PUBLISHER,
        domain="backlog",
        labels=(Label("operation", values=("produce",)),),
    ),
    backend_errors("redis", "Redis", owners=_REDIS_USERS, operations=_REDIS_OPERATIONS),
    backend_errors("kafka", "Kafka", owners=_KAFKA_USERS, operations=_KAFKA_OPERATIONS),
    backend_errors("postgres", "PostgreSQL", owners=_POSTGRES_USERS, operations=_POSTGRES_OPERATIONS),
    # --- Backends and HTTP (from the instrumentation libraries) ------------------------------
    backend_latency("redis", "Redis", owners=_REDIS_USERS, operations=_REDIS_OPERATIONS),
    backend_latency("kafka", "Kafka", owners=_KAFKA_USERS, operations=_KAFKA_OPERATIONS),
    backend_latency("postgres", "PostgreSQL", owners=_POSTGRES_USERS, operations=_POSTGRES_OPERATIONS),
    latency(
        "http_server_request_duration_seconds",
        "Inbound HTTP request duration, by route template (the scrape and health paths excluded).",
        owners=_GATEWAY,
        domain="http",
        labels=(
            _HTTP_METHOD,
            Label("http_route", bounded_by="the app's route templates"),
            _HTTP_STATUS,
        ),
    ),
    latency(
        "http_client_request_duration_seconds",
        "Outbound HTTP request duration (LLM provider, Somabrain), by server, measured on the httpx client.",
        owners=_LLM_CALLERS,
        domain="http",
        labels=(
            _HTTP_METHOD,
            Label("server_address", bounded_by="the configured upstream hosts"),
            _HTTP_STATUS,
        ),
    ),
    # --- Budgets / quotas ------------------------------------------------------------------
    gauge(
        "tenant_budget_tokens_allowed",
        "Token allowance of the tenant's current budget window.",
        unit="{token}",
        owners=_WORKER,
        domain="budgets",
        labels=(_TENANT,),
    ),
    gauge(
        "tenant_budget_tokens_used",
        "Tokens used in the tenant's current budget window.",
        unit="{token}",
        owners=_WORKER,
        domain="budgets",
        labels=(_TENANT,),
    ),
    counter(
        "tenant_budget_tokens_overruns_total",
        "Requests refused because the tenant's token budget was spent.",
        unit="{request}",
        owners=_WORKER,
        domain="budgets",
        labels=(_TENANT,),
    ),
    gauge(
        "tenant_budget_messages_allowed",
        "Message allowance of the tenant's current budget window.",
        unit="{message}",
        owners=_WORKER,
        domain="budgets",
        labels=(_TENANT,),
    ),
    gauge(
        "tenant_budget_messages_used",
        "Messages used in the tenant's current budget window.",
        unit="{message}",
        owners=_WORKER,
        domain="budgets",
        labels=(_TENANT,),
    ),
    counter(
        "tenant_budget_messages_overruns_total",
        "Requests refused because the tenant's message budget was spent.",
        unit="{request}",
        owners=_WORKER,
        domain="budgets",
        labels=(_TENANT,),
    ),
    # --- Tools -------------------------------------------------------------------------------
    counter(
        "tool_calls_total",
        "Tool requests by outcome: `abandoned` is one not run because the worker had stopped waiting for "
        "its result (a backlog after an outage); the others were executed.",
        unit="{call}",
        owners=_TOOL_EXECUTOR,
        domain="tools",
        labels=(_TOOL, Label("result", values=("success", "error", "timeout", "rejected", "abandoned"))),
    ),
    latency("tool_call_seconds", "Tool call duration.", owners=_TOOL_EXECUTOR, domain="tools", labels=(_TOOL,)),
    # --- Ops / health --------------------------------------------------------------------------
    counter(
        "health_checks_total",
        "Dependency health checks by outcome: the gateway's when its health endpoint is asked, the other "
        "services' own probes every `CHATPIPE_HEALTH_PROBE_SECONDS`.",
        unit="{check}",
        owners=_EVERY,
        domain="health",
        labels=(_COMPONENT, Label("result", values=("ok", "fail"))),
    ),
    Metric(
        "process_cpu_seconds_total",
        Kind.OBSERVABLE_COUNTER,
        "s",
        "User and system CPU time of the process.",
        _EVERY,
        "process",
        combine=Combine.PER_PROCESS,
    ),
    gauge(
        "process_resident_memory_bytes",
        "Resident memory of the process.",
        unit="By",
        owners=_EVERY,
        domain="process",
        kind=Kind.OBSERVABLE_GAUGE,
        combine=Combine.PER_PROCESS,
    ),
    gauge(
        "process_open_fds",
        "Open file descriptors of the process.",
        unit="{fd}",
        owners=_EVERY,
        domain="process",
        kind=Kind.OBSERVABLE_GAUGE,
        combine=Combine.PER_PROCESS,
    ),
    gauge(
        "data_dir_free_bytes",
        "Free disk space where `CHATOBS_DATA_DIR` lives.",
        unit="By",
        owners=_EVERY,
        domain="process",
        kind=Kind.OBSERVABLE_GAUGE,
    ),
    # --- chatobs itself --------------------------------------------------------------------------
    Metric(
        "chatobs_label_rejections_total",
        Kind.COUNTER,
        "{value}",
        "Label values outside the allowed set, recorded as `other` instead.",
        _EVERY,
        "self",
        (Label("metric", values=(CATALOGUE_NAMES,)), Label("label", values=(CATALOGUE_NAMES,))),
        notes="`metric` and `label` take catalogue names only, so the series count is bounded.",
    ),
    counter(
        "chatobs_recording_errors_total",
        "Recording calls that failed inside chatobs and were swallowed.",
        unit="{error}",
        owners=_EVERY,
        domain="self",
        labels=(Label("metric", values=(CATALOGUE_NAMES,)),),
    ),
    counter(
        "chatobs_scrapes_refused_total",
        "Scrapes of `/metrics` answered 401: missing or wrong credentials (`CHATOBS_METRICS_BEARER_TOKEN*`, "
        "`CHATOBS_METRICS_BASIC_AUTH_*`).",
        unit="{scrape}",
        owners=_EVERY,
        domain="self",
    ),
    counter(
        "chatobs_export_failures_total",
        "OTLP pushes that did not reach the collector: failed after the exporter's retries (refused, silent, "
        "erroring), or skipped while it is known to be down (backoff from 1 s to 30 s). A lost metric push is made "
        "good by the next one (cumulative values); a lost span push loses its spans.",
        unit="{export}",
        owners=_EVERY,
        domain="self",
        labels=(Label("signal", values=("metrics", "traces")),),
    ),
    counter(
        "chatobs_spans_dropped_total",
        "Sampled spans that never reached the collector: the export queue (`OTEL_BSP_MAX_QUEUE_SIZE`) was full, "
        "or their export failed.",
        unit="{span}",
        owners=_EVERY,
        domain="self",
        labels=(Label("reason", values=("queue_full", "export_failed")),),
    ),
)

_BY_NAME: dict[str, Metric] = {metric.name: metric for metric in CATALOGUE}
if len(_BY_NAME) != len(CATALOGUE):  # pragma: no cover - guards edits to the table above
    raise ValueError("duplicate metric names in CATALOGUE")


def allowed_fixed_values(metric: Metric, label: Label) -> frozenset[str]:
    """Fixed allowed values of ``label``, with the self-metrics' placeholder expanded."""
    if label.values == (CATALOGUE_NAMES,):
        if label.name == "metric":
            return frozenset(_BY_NAME)
        return frozenset(lbl.name for m in CATALOGUE for lbl in m.labels)
    return frozenset(label.values)


def get(name: str) -> Metric:
    """Return the catalogue entry called ``name`` (the exposed Prometheus name).

    Raises ``KeyError`` naming the metric when it is not catalogued.
    """
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"{name!r} is not in the metric catalogue") from None


def for_service(service: str) -> tuple[Metric, ...]:
    """The metrics ``service`` emits, in catalogue order."""
    return tuple(metric for metric in CATALOGUE if metric.owned_by(service))


def _owners_text(metric: Metric) -> str:
    return "every service" if ALL_SERVICES in metric.owners else ", ".join(sorted(metric.owners))


def to_markdown(metrics: Iterable[Metric] = CATALOGUE) -> str:
    """The catalogue as a Markdown document (what ``docs/metrics.md`` holds)."""
    lines = [
        "# Metric catalogue",
        "",
        "Generated from `src/chatobs/catalogue.py` by `chatobs catalogue --format md`; do not edit by hand.",
        "",
        f"Label values outside the allowed set are recorded as `{OVERFLOW_VALUE}` and counted in "
        f"`chatobs_label_rejections_total`, except where a label lists `{OVERFLOW_VALUE}` among its values "
        "(an unclassified LLM failure): there it is a value of its own.",
        "",
        f"Buckets: latency `{', '.join(f'{b:g}' for b in LATENCY_BUCKETS)}` seconds; "
        f"tokens `{', '.join(f'{b:g}' for b in TOKEN_BUCKETS)}`.",
        "",
        "Several worker processes (`CHATOBS_MULTIPROCESS_DIR`) combine as the *workers* column says: "
        "`sum` over every process that ran (killed ones too), `live_sum` or `live_max` over the live ones, "
        f"`per_process` one series per live process labelled `{PROCESS_LABEL}`, `serving_process` measured "
        "by the process answering the scrape.",
        "",
        "| name | type | unit | labels (allowed values) | buckets | emitted by | workers | description |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for metric in metrics:
        labels = "; ".join(f"`{lbl.name}`: {lbl.describe()}" for lbl in metric.labels)
        labels = labels.replace(CATALOGUE_NAMES, "catalogue names")
        description = metric.description + (f" {metric.notes}" if metric.notes else "")
        lines.append(
            f"| `{metric.name}` | {metric.prometheus_type} | `{metric.unit}` | {labels} | "
            f"{metric.bucket_set or ''} | {_owners_text(metric)} | {metric.combine.value} | {description} |"  # type: ignore[union-attr]
        )
    return "\n".join(lines) + "\n"


def to_json(metrics: Iterable[Metric] = CATALOGUE) -> str:
    """The catalogue as JSON, for tools and dashboards generators."""
    return json.dumps(
        [
            {
                "name": metric.name,
                "type": metric.prometheus_type,
                "instrument": metric.kind.value,
                "unit": metric.unit,
                "description": metric.description,
                "labels": {
                    lbl.name: (sorted(allowed_fixed_values(metric, lbl)) if lbl.values else {"setting": lbl.setting})
                    for lbl in metric.labels
                },
                "buckets": list(metric.buckets) if metric.buckets else None,
                "owners": sorted(metric.owners),
                "domain": metric.domain,
            }
            for metric in metrics
        ],
        indent=2,
    )
