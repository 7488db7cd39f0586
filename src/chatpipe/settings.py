"""The pipeline's settings, from environment variables, validated at start-up.

Backends use their conventional names (``REDIS_URL``, ``DATABASE_URL``,
``KAFKA_BOOTSTRAP_SERVERS``); everything else is under ``CHATPIPE_``. Telemetry
settings (``OTEL_*``, ``CHATOBS_*``, including ``CHATOBS_WAL_TOPIC``) belong to chatobs.

Each service asks for what it needs with :meth:`PipelineSettings.require`, so a
worker without ``CHATPIPE_LLM_BASE_URL`` stops with an error naming it.

Example::

    settings = load_pipeline_settings()
    settings.require("llm_base_url", "somabrain_url")
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import SplitResult, unquote, urlsplit

from pydantic import AnyHttpUrl, Field, field_validator
from pydantic_settings import SettingsConfigDict

from chatobs.settings import (
    BindHost,
    ConfigError,
    CsvList,
    KafkaTopic,
    MappingSettings,
    NonEmptyPath,
    load_model,
    parse_key_values,
)

__all__ = ["BackendSettings", "PipelineSettings", "load_backend_settings", "load_pipeline_settings"]

#: The longest time-to-live a setting may give a Redis key: ten years. Redis refuses an expiry
#: past a signed 64-bit count of milliseconds, and that refusal would fail every message, not the start.
_LONGEST_TTL_SECONDS = 10 * 365 * 86_400


@functools.lru_cache(maxsize=16)
def _allowances(value: str) -> dict[str, int]:
    """``tenant=allowance,...`` as a dict, parsed once per value (it is asked on every message)."""
    return {tenant: int(allowance) for tenant, allowance in parse_key_values(value).items()}


def _check_port(text: str, where: str) -> None:
    # Port 0 parses everywhere and connects nowhere: the service would start and report its backend down.
    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= 65535):
        raise ValueError(f"port of {where!r} must be 1-65535, got {text!r}")


def _check_host_port(member: str, *, port_required: bool) -> None:
    """``host:port``, ``[v6]:port`` or (``port_required=False``) a bare host or ``host:`` (the
    client's default port); empty hosts pass (libpq's default: the local socket) unless a port
    is required."""
    if member.startswith("["):
        host, bracket, rest = member[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"{member!r} is not [address]:port")
        port = rest[1:] if rest else None
    else:
        host, colon, port_text = member.rpartition(":")
        host, port = (host, port_text) if colon else (member, None)
    if port is None and port_required:
        raise ValueError(f"{member!r} has no port: give host:port")
    if port_required and not host:
        raise ValueError(f"{member!r} has no host")
    if port is not None and (port or port_required):
        _check_port(port, member)


def _credentials_cut(url: SplitResult) -> bool:
    """Whether an `@` after the authority ends credentials that a `/`, `?` or `#` cut short. In
    the query or fragment, an `@` after a `=` is a value's (`?user=a@b`) in a URL with a path
    and a port that is a number; without a path (`u:1234?x=y@host/db`: the path is after the
    `@`), or with a port that is no number (`u:pa?x=y@host`), it is a password's."""
    if "@" in url.path:
        return True
    ats = [part for part in (url.query, url.fragment) if "@" in part]
    if not ats:
        return False
    if not url.path or any("=" not in part.partition("@")[0] for part in ats):
        return True
    _, colon, port = url.netloc.rpartition(":")
    return bool(colon and port) and not url.netloc.endswith("]") and not (port.isascii() and port.isdigit())


def _url_of(value: str, *schemes: str) -> tuple[SplitResult, str]:
    """``value`` split, and its hosts (what follows the credentials), when its scheme is one of ``schemes``."""
    url = urlsplit(value)
    if url.scheme not in schemes:
        raise ValueError(f"must start with {' or '.join(f'{scheme}://' for scheme in schemes)}")
    if "@" not in url.netloc and _credentials_cut(url):
        # `user:pa/ss@host`: the credentials end at the `/` (or `?`, `#`), and the clients read
        # the password as a port. Said without quoting the value, which is the password.
        raise ValueError("has a '/', '?' or '#' before its '@': percent-encode them in the user and password")
    return url, url.netloc.rpartition("@")[2]


class BackendSettings(MappingSettings):
    """Where the backends are (``chatobs stack up`` prints these).

    Each is checked as its client reads it, so a typo stops the service at start with the
    variable's name rather than at its first connection in the library's words.
    """

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", frozen=True)

    redis_url: str = Field(
        ..., description="Redis, `redis[s]://[user:password@]host[:port][/db]` (a port is 1-65535, a db a number)."
    )
    database_url: str = Field(
        ..., description="PostgreSQL connection URL, `postgres[ql]://[user:password@][host[:port][,...]][/db]` "
        "(no host: the local socket).",
    )  # fmt: skip
    kafka_bootstrap_servers: str = Field(..., description="Kafka-protocol brokers, `host:port,...` (port 1-65535).")

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        url, host = _url_of(value, "redis", "rediss")
        if not url.hostname:  # redis-py would quietly take localhost: `redis://${HOST}` with HOST unset
            raise ValueError("names no host")
        _check_host_port(host, port_required=False)
        # redis-py reads `/x` as database 0 and `/0/1` as 1: refuse what it would misread.
        database = url.path[1:].removesuffix("/")
        if database and not (database.isascii() and database.isdigit()):
            raise ValueError(f"database must be a number such as /0, got {url.path!r}")
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        _, hosts = _url_of(value, "postgres", "postgresql")
        if hosts:  # empty: libpq's default, the local socket (or `?host=`)
            members = hosts.split(",")
            if len(members) > 1 and not all(members):  # asyncpg fails on `h1,` with an IndexError
                raise ValueError(f"has an empty host in its host list {hosts!r}")
            for member in members:
                _check_host_port(member, port_required=False)
        return value

    @field_validator("kafka_bootstrap_servers")
    @classmethod
    def _bootstrap_servers(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("names no broker: give host:port,...")
        for member in value.split(","):
            if not member.strip():
                raise ValueError(f"has an empty member in {value!r}")
            _check_host_port(member.strip(), port_required=True)
        return value


class PipelineSettings(MappingSettings):
    """Every ``CHATPIPE_`` variable."""

    model_config = SettingsConfigDict(env_prefix="CHATPIPE_", extra="ignore", frozen=True)

    # --- LLM provider (worker, tool executor) --------------------------------
    llm_base_url: AnyHttpUrl | None = Field(
        None, description="OpenAI-compatible API base, e.g. `http://host/v1`; required by the worker and tool executor."
    )
    llm_api_key: str = Field("", description="Bearer token for the LLM API (none for the simulator).")
    llm_model: str = Field("sim-large", description="Model name sent to the provider.")
    llm_provider: str = Field("simulator", description="Provider name, the `provider` label.")
    llm_timeout_seconds: float = Field(
        30.0, gt=0, description="Whole-request timeout of an LLM call (the whole stream, not each read)."
    )
    # --- Somabrain (worker) ----------------------------------------------------
    somabrain_url: AnyHttpUrl | None = Field(None, description="Somabrain base URL; required by the worker.")
    somabrain_timeout_seconds: float = Field(0.5, gt=0, description="Timeout of one Somabrain call.")
    breaker_failure_threshold: int = Field(3, ge=1, description="Consecutive failures that open the circuit.")
    breaker_reset_seconds: float = Field(5.0, gt=0, description="Open time before a half-open trial call.")
    degraded_replay_seconds: float = Field(2.0, gt=0, description="How often buffered memory writes are retried.")
    answered_ttl_seconds: int = Field(
        86_400, ge=1, le=_LONGEST_TTL_SECONDS, description="How long the worker remembers a turn it answered (a "
        "record delivered again within it is not answered twice); a message older than this is not answered.",
    )  # fmt: skip
    # --- Budgets (worker) --------------------------------------------------------
    budget_window_seconds: int = Field(
        3600, ge=1, le=_LONGEST_TTL_SECONDS, description="Length of a tenant's budget window."
    )
    token_budget: int = Field(50_000, ge=0, description="Tokens per tenant per window (default allowance).")
    message_budget: int = Field(500, ge=0, description="Messages per tenant per window (default allowance).")
    tenant_token_budgets: str = Field("", description="Per-tenant token allowances, `acme=100000,globex=500`.")
    tenant_message_budgets: str = Field("", description="Per-tenant message allowances, `acme=1000`.")
    # --- Gateway -----------------------------------------------------------------------
    gateway_host: BindHost = Field("0.0.0.0", description="Bind address of `python -m chatpipe.gateway`.")
    gateway_port: int = Field(
        8000,
        ge=0,
        le=65535,
        description="Port of `python -m chatpipe.gateway` (refused at start if `CHATOBS_METRICS_PORT` binds it too).",
    )
    gateway_graceful_shutdown_seconds: float = Field(
        10.0, gt=0, description="On SIGTERM, how long open requests (SSE streams) may go on before they are cut "
        "(`python -m chatpipe.gateway`; under `uvicorn` directly, its `--timeout-graceful-shutdown`).",
    )  # fmt: skip
    attachment_dir: NonEmptyPath = Field(Path("attachments"), description="Where uploaded attachments are stored.")
    attachment_max_bytes: int = Field(5 * 1024 * 1024, ge=1, description="Largest attachment accepted (413 above).")
    attachment_types: CsvList = Field(
        ("text/plain", "application/pdf", "image/png", "image/jpeg"),
        description="Content types accepted for attachments, in any case (415 otherwise).",
    )
    # At most 100,000: the outbox row, at up to 6 bytes a character (`\u0001` as PostgreSQL's
    # jsonb writes a control character), must fit one Kafka record (aiokafka's 1 MiB).
    message_max_chars: int = Field(
        8000, ge=1, le=100_000, description="Longest chat message accepted (at most 100000: one Kafka record)."
    )
    request_max_bytes: int = Field(
        262_144,
        ge=1024,
        description="Largest JSON request body accepted, in bytes (413 above, before it is read; attachments "
        "have `CHATPIPE_ATTACHMENT_MAX_BYTES`).",
    )
    sse_timeout_seconds: float = Field(300.0, gt=0, description="An SSE stream with no event for this long ends.")
    sse_max_streams: int = Field(
        1000,
        ge=1,
        description="Most SSE streams the gateway holds open at once (each holds a Redis connection); "
        "one more is refused with 503 and `Retry-After`.",
    )
    # --- Messaging and backlogs ------------------------------------------------------------
    tool_topic: KafkaTopic = Field("chat.tools", description="Kafka topic of tool-call requests.")
    consumer_group_prefix: str = Field(
        "", max_length=100, pattern=r"^[A-Za-z0-9._-]*$",
        description="Put before the Kafka consumer groups' names (`worker`, `replicator`, `tool_executor`). "
        "Pipelines that share a broker need one each: in one group, each member's join or leave rebalances "
        "every other's.",
    )  # fmt: skip
    tool_timeout_seconds: float = Field(
        10.0,
        gt=0,
        description="How long the worker waits for a tool result; the tool executor bounds each tool "
        "by it too (a `summarize`'s LLM call by 0.9 of it).",
    )
    publisher_batch_size: int = Field(100, ge=1, le=10_000, description="Outbox rows published per round.")
    publisher_idle_seconds: float = Field(
        1.0, gt=0, description="Longest pause between outbox rounds with nothing to send: a new row's notification "
        "(LISTEN/NOTIFY) ends it at once, so this bounds only what a lost notification can delay.",
    )  # fmt: skip
    outbox_redeliver_seconds: float = Field(
        30.0, gt=0, description="A WAL record the replicator has not confirmed this long after it was sent is sent "
        "again (the broker lost it); the wait doubles per send.",
    )  # fmt: skip
    outbox_retention_seconds: float = Field(
        7 * 24 * 3600.0, ge=0, description="How long an outbox row is kept once the replicator confirmed it (0: for "
        "good). A message's `Idempotency-Key` is remembered as long as its row.",
    )  # fmt: skip
    outbox_sweep_seconds: float = Field(
        300.0, gt=0, description="How often the publisher deletes the outbox rows past their retention."
    )
    shutdown_grace_seconds: float = Field(
        5.0, gt=0, description="On SIGTERM, how long work in flight may take to finish; what is left is cancelled "
        "unacknowledged, and comes again to the next instance.",
    )  # fmt: skip
    backlog_poll_seconds: float = Field(2.0, gt=0, description="How often backlog gauges are measured.")
    backlog_query_timeout_seconds: float = Field(1.0, gt=0, description="Time bound of one backlog measurement.")
    health_probe_seconds: float = Field(
        15.0, gt=0, description="How often the services without HTTP probe their backends (`health_checks_total`)."
    )
    health_probe_timeout_seconds: float = Field(
        2.0, gt=0, description="Time bound of one backend's probe by those services (the gateway's `/health`: 1 s)."
    )
    db_pool_size: int = Field(
        10, ge=1, le=1000, description="Most PostgreSQL connections one service process holds (its pool's size)."
    )
    db_command_timeout_seconds: float = Field(
        10.0, gt=0, description="Longest a PostgreSQL statement may take before it is cancelled (503 at the gateway)."
    )

    @field_validator("attachment_types", mode="before")
    @classmethod
    def _csv(cls, value: object) -> object:
        # Lower case, as the gateway compares an upload's type: media types are case-insensitive.
        if not isinstance(value, str):
            return value
        return tuple(part.strip().lower() for part in value.split(",") if part.strip())

    @field_validator("tenant_token_budgets", "tenant_message_budgets")
    @classmethod
    def _allowances(cls, value: str) -> str:
        allowances = parse_key_values(value)
        named = [unquote(member.partition("=")[0].strip()) for member in value.split(",") if member.strip()]
        if len(named) != len(allowances):  # `acme=100,acme=5`: which one was meant?
            twice = sorted({tenant for tenant in named if named.count(tenant) > 1})
            raise ValueError(f"{', '.join(map(repr, twice))} given more than one allowance")
        for tenant, allowance in allowances.items():
            # ASCII digits only: `str.isdigit` also takes `²`, which `int()` then refuses on every message.
            if not re.fullmatch(r"[0-9]+", allowance):
                raise ValueError(f"allowance of {tenant!r} must be a whole number, got {allowance!r}")
        return value

    def token_allowance(self, tenant: str) -> int:
        return _allowances(self.tenant_token_budgets).get(tenant, self.token_budget)

    def message_allowance(self, tenant: str) -> int:
        return _allowances(self.tenant_message_budgets).get(tenant, self.message_budget)

    def consumer_group(self, role: str) -> str:
        """The Kafka consumer group of the service in ``role``: its name after the prefix.

        Example::

            PipelineSettings(consumer_group_prefix="staging.").consumer_group("worker")  # "staging.worker"
        """
        return f"{self.consumer_group_prefix}{role}"

    def require(self, *fields: str) -> PipelineSettings:
        """Raise :class:`ConfigError` naming each of ``fields`` that is unset."""
        missing = {
            f"CHATPIPE_{name.upper()}": ": required by this service" for name in fields if not getattr(self, name)
        }
        if missing:
            raise ConfigError(missing)
        return self


def load_pipeline_settings(env: Mapping[str, str] | None = None) -> PipelineSettings:
    return load_model(PipelineSettings, env)


def load_backend_settings(env: Mapping[str, str] | None = None) -> BackendSettings:
    return load_model(BackendSettings, env, reject_unknown=False)
