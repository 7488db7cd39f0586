"""Configuration from environment variables, validated at start-up.

Two models, read by pydantic-settings (chosen over hand-written ``os.environ``
parsing because it gives typed fields, defaults and per-field errors, and it
documents itself for the README's configuration table):

* :class:`OtelSettings`: the standard ``OTEL_*`` variables the SDK specification
  defines, with the same names and meanings;
* :class:`ChatobsSettings`: this project's own settings, all under ``CHATOBS_``.

:func:`load_settings` reads both from a mapping (``os.environ`` by default) and
turns every validation problem into one :class:`ConfigError` that names the
variables at fault, so a service stops with a message an operator can act on.

Example::

    >>> settings = load_settings({"CHATOBS_METRICS_PORT": "9464"})
    >>> settings.chatobs.metrics_port
    9464
    >>> load_settings({"CHATOBS_METRICS_PORT": "abc"})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    chatobs.settings.ConfigError: CHATOBS_METRICS_PORT='abc': Input should be a valid integer, ...
"""

from __future__ import annotations

import difflib
import functools
import ipaddress
import logging
import os
import re
import typing
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, TypeVar
from urllib.parse import unquote

from pydantic import (
    AfterValidator,
    AnyHttpUrl,
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from chatobs.catalogue import OVERFLOW_VALUE, SERVICES

__all__ = [
    "CHATOBS_PREFIX",
    "BindHost",
    "ChatobsSettings",
    "ConfigError",
    "CsvList",
    "KafkaTopic",
    "MappingSettings",
    "NonEmptyPath",
    "OtelSettings",
    "Settings",
    "load_model",
    "load_settings",
    "parse_key_values",
    "read_secret_file",
    "settings_table",
]

_logger = logging.getLogger("chatobs")

CHATOBS_PREFIX = "CHATOBS_"
#: The libraries chatobs instruments (``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS`` may name them).
LIBRARIES = ("fastapi", "httpx", "redis", "asyncpg", "aiokafka")
#: RFC 1123 host names: dot-separated labels of letters, digits and inner hyphens.
_HOST_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_NAME = re.compile(rf"(?=.{{1,253}}$){_HOST_LABEL}(?:\.{_HOST_LABEL})*\.?")
#: A Kafka topic name as the broker accepts it (its `Topic.validate`).
_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")
#: An HTTP header name (RFC 9110's token): gRPC metadata keys are a subset.
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_PLAIN_PATH = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,;=:@%/]*")
M = TypeVar("M", bound=BaseSettings)

MetricsExporter = Literal["prometheus", "otlp", "console", "none"]
TracesExporter = Literal["otlp", "console", "none"]
OtlpProtocol = Literal["grpc", "http/protobuf"]
ExemplarFilter = Literal["always_on", "always_off", "trace_based"]
TracerKind = Literal["lean", "sdk"]
TracesSampler = Literal[
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
]


class ConfigError(ValueError):
    """A setting is missing or malformed. ``variables`` lists the variable names at fault.

    ``problems`` maps a variable name (or ``"A, B"`` for settings wrong only together) to its problem.

    Example::

        try:
            load_settings({"CHATOBS_METRICS_PORT": "abc"})
        except ConfigError as error:
            error.variables  # ("CHATOBS_METRICS_PORT",); str(error) says what is wrong with it
    """

    def __init__(self, problems: Mapping[str, str]):
        self.variables = tuple(name for key in problems for name in key.split(", "))
        super().__init__("; ".join(f"{name}{problem}" for name, problem in problems.items()))


def _split_csv(value: object) -> object:
    """``"a, b,,c"`` -> ``("a", "b", "c")``; other types pass through to pydantic."""
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


CsvList = Annotated[tuple[str, ...], NoDecode]


#: The longest OTLP interval, delay or timeout accepted, in milliseconds: a day. The SDK's
#: threads wait on these, and a wait past the platform's `time_t` kills the thread (no more
#: pushes, no error at start).
_DAY_MS = 86_400_000
#: The specification's default of ``OTEL_BSP_MAX_EXPORT_BATCH_SIZE``.
_DEFAULT_SPAN_BATCH = 512
#: The most spans a batch processor may queue (the SDK's queue is a C-sized deque).
_MOST_QUEUED_SPANS = 1_000_000


def _not_blank(value: object) -> object:
    # pydantic reads "" as Path("."): a compose file's `${X:-}` would quietly mean the working directory.
    if isinstance(value, str) and not value.strip():
        raise ValueError("is empty: give a path, or unset the variable")
    return value


#: A path setting; an empty value is refused rather than read as the working directory.
NonEmptyPath = Annotated[Path, BeforeValidator(_not_blank)]


@dataclass(frozen=True)
class _Allowed:
    """What a checked type accepts, in the settings table's words (pydantic ignores it)."""

    words: str


def _bind_host(value: str) -> str:
    host = value[1:-1] if value.startswith("[") and value.endswith("]") else value  # `[::1]` as in a URL
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOST_NAME.fullmatch(host):
            raise ValueError(f"must be an IP address or a host name, got {value!r}") from None
    return host


#: A bind address: an IP address (``[::1]``, as in a URL, reads as ``::1``) or an RFC 1123 host
#: name. Anything else would pass start-up and fail at ``bind``, in the server's own words.
BindHost = Annotated[str, AfterValidator(_bind_host), _Allowed("an IP address or a host name")]


def _kafka_topic(value: str) -> str:
    if not _TOPIC_NAME.fullmatch(value) or value in (".", ".."):
        # The broker refuses it on every send: the service would start and then lose each record.
        raise ValueError(f"must be 1-249 of the characters A-Z a-z 0-9 . _ - (and not . or ..), got {value!r}")
    return value


#: A Kafka topic name, checked against the broker's own rule.
KafkaTopic = Annotated[str, AfterValidator(_kafka_topic), _Allowed("1-249 of `A-Za-z0-9._-`")]


def read_secret_file(path: Path) -> str:
    """The secret held in ``path``, surrounding whitespace removed (as Prometheus reads its
    ``credentials_file`` and ``password_file``, so one file can serve both sides).

    Raises ``ValueError`` when it cannot be read or is empty; the message never holds the content.
    """
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as error:
        raise ValueError(f"cannot be read: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise ValueError("is not UTF-8 text") from None
    if not text:
        raise ValueError("is empty")
    return text


def _is_token(token: str) -> bool:
    # A bearer token goes verbatim into an HTTP header: no spaces or control characters
    # (RFC 6750's token68 is stricter still, but opaque tokens vary).
    return bool(token) and not any(char.isspace() or not char.isprintable() for char in token)


def _conflict(message: str, *variables: str) -> PydanticCustomError:
    """A problem of several settings together; :func:`_errors` reports it under each variable."""
    return PydanticCustomError("chatobs_conflict", message, {"variables": ",".join(variables)})


def parse_key_values(text: str) -> dict[str, str]:
    """Parse the ``key1=value1,key2=value2`` format of ``OTEL_RESOURCE_ATTRIBUTES`` and
    ``OTEL_EXPORTER_OTLP_HEADERS`` (values percent-decoded). Raises ``ValueError`` on a
    member without ``=`` or with an empty key."""
    pairs: dict[str, str] = {}
    for member in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = member.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected key=value pairs separated by commas, got {member!r}")
        pairs[unquote(key.strip())] = unquote(value.strip())
    return pairs


class MappingSettings(BaseSettings):
    """Settings whose values come only from the mapping :func:`load_model` passes.

    pydantic-settings would also read ``os.environ`` while validating; a test's mapping must be
    the whole truth (``load_settings({})`` means defaults, whatever the shell exports). Base a
    model read with :func:`load_model` on it.

    Example::

        class WorkerSettings(MappingSettings):
            model_config = SettingsConfigDict(env_prefix="MYAPP_")
            batch_size: int = 10

        load_model(WorkerSettings, {"MYAPP_BATCH_SIZE": "20"}).batch_size  # 20, whatever os.environ says
    """

    # `inf` or `nan` is no duration, size or ratio: refused with the variable's name rather than
    # handed to a timer, a Redis timeout or a sampler.
    model_config = SettingsConfigDict(allow_inf_nan=False)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


class OtelSettings(MappingSettings):
    """Standard OpenTelemetry SDK variables (see the OpenTelemetry specification)."""

    model_config = SettingsConfigDict(env_prefix="OTEL_", extra="ignore", frozen=True)

    sdk_disabled: bool = Field(False, description="`true` turns every signal into a no-op.")
    service_name: str | None = Field(None, description="`service.name` resource attribute; default: the service role.")
    resource_attributes: str = Field("", description="Extra resource attributes, `key=value,key2=value2`.")
    metrics_exporter: CsvList = Field(
        ("prometheus",),
        description="Comma list of `prometheus` (serve `/metrics`), `otlp` (push), `console`, or `none`.",
    )
    traces_exporter: CsvList = Field(
        ("none",),
        description="Comma list of `otlp`, `console`, or `none`. Default `none`: spans carry the trace context "
        "(exemplars, log correlation, downstream services) but record nothing, and client calls get no span, "
        "until an exporter is configured.",
    )
    exporter_otlp_endpoint: AnyHttpUrl | None = Field(
        None,
        description="Base URL of the OTLP receiver; over HTTP, `/v1/<signal>` goes after its path, before its query.",
    )
    exporter_otlp_protocol: OtlpProtocol = Field("http/protobuf", description="`http/protobuf` or `grpc`.")
    exporter_otlp_headers: str = Field(
        "", description="Headers sent with OTLP requests, `key=value,...`.", json_schema_extra={"secret": True}
    )  # often credentials: a malformed value is never echoed
    exporter_otlp_metrics_headers: str = Field(
        "", description="Headers for metrics instead of the generic ones.", json_schema_extra={"secret": True}
    )
    exporter_otlp_traces_headers: str = Field(
        "", description="Headers for traces instead of the generic ones.", json_schema_extra={"secret": True}
    )
    exporter_otlp_metrics_endpoint: AnyHttpUrl | None = Field(None, description="Full OTLP metrics URL (overrides).")
    exporter_otlp_metrics_protocol: OtlpProtocol | None = Field(None, description="Protocol for metrics (overrides).")
    exporter_otlp_traces_endpoint: AnyHttpUrl | None = Field(None, description="Full OTLP traces URL (overrides).")
    exporter_otlp_traces_protocol: OtlpProtocol | None = Field(None, description="Protocol for traces (overrides).")
    exporter_otlp_timeout: int = Field(
        10_000, gt=0, le=_DAY_MS, description="Milliseconds one OTLP export may take, retries included (the "
        "specification's unit; chatobs hands the Python exporters seconds, which is what they expect).",
    )  # fmt: skip
    exporter_otlp_metrics_timeout: int | None = Field(
        None, gt=0, le=_DAY_MS, description="Timeout for metrics (overrides)."
    )
    exporter_otlp_traces_timeout: int | None = Field(
        None, gt=0, le=_DAY_MS, description="Timeout for traces (overrides)."
    )
    bsp_schedule_delay: int = Field(5_000, gt=0, le=_DAY_MS, description="Milliseconds between two span batch exports.")
    bsp_max_queue_size: int = Field(
        2048, gt=0, le=_MOST_QUEUED_SPANS, description="Spans waiting for export; beyond it new spans are "
        "dropped and counted in `chatobs_spans_dropped_total{reason=\"queue_full\"}`.",
    )  # fmt: skip
    bsp_max_export_batch_size: int | None = Field(
        None,
        gt=0,
        le=_MOST_QUEUED_SPANS,
        description="Most spans sent in one export, at most `OTEL_BSP_MAX_QUEUE_SIZE` (unset: 512, or the queue "
        "size when that is smaller).",
    )
    metric_export_interval: int = Field(
        60_000, gt=0, le=_DAY_MS, description="Milliseconds between OTLP metric pushes."
    )
    metric_export_timeout: int = Field(
        30_000, gt=0, le=_DAY_MS, description="Milliseconds allowed for one OTLP metric push."
    )
    traces_sampler: TracesSampler = Field(
        "parentbased_always_on",
        description="Sampler: `always_on`, `always_off`, `traceidratio` or `parentbased_*` of them.",
    )
    traces_sampler_arg: float = Field(1.0, ge=0, le=1, description="Ratio for the `*traceidratio` samplers.")
    python_disabled_instrumentations: CsvList = Field(
        (), description="Instrumentations not to enable: any of fastapi, httpx, redis, asyncpg, aiokafka."
    )
    metrics_exemplar_filter: ExemplarFilter = Field(
        "trace_based", description="Which measurements may become exemplars: `trace_based`, `always_on`, `always_off`."
    )

    @field_validator("metrics_exporter", "traces_exporter", "python_disabled_instrumentations", mode="before")
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator(
        "exporter_otlp_protocol", "exporter_otlp_metrics_protocol", "exporter_otlp_traces_protocol",
        "traces_sampler", "metrics_exemplar_filter", mode="before",
    )  # fmt: skip
    @classmethod
    def _case_blind(cls, value: object) -> object:
        # The specification: enum values SHOULD be case-insensitive (`ALWAYS_ON`, `GRPC`).
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("sdk_disabled", mode="before")
    @classmethod
    def _true_or_false(cls, value: object) -> object:
        # The specification's booleans: only `true` (any case) is true, no other true value may
        # be added (pydantic would take `1`, `yes` or `on`), and anything else is false, with a
        # warning when it is not `false`: `OTEL_SDK_DISABLED=0` keeps the SDK on, as elsewhere.
        if isinstance(value, str):
            word = value.strip().lower()
            if word not in ("true", "false"):
                _logger.warning("OTEL_SDK_DISABLED=%r is not true or false: taken as false (the SDK stays on)", value)
            return word == "true"
        return value

    @field_validator("metrics_exporter")
    @classmethod
    def _known_metrics_exporters(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _check_exporters(value, ("prometheus", "otlp", "console", "none"))

    @field_validator("traces_exporter")
    @classmethod
    def _known_traces_exporters(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _check_exporters(value, ("otlp", "console", "none"))

    @field_validator("bsp_max_export_batch_size")
    @classmethod
    def _batch_fits_queue(cls, value: int | None, info: ValidationInfo) -> int | None:
        queue = info.data.get("bsp_max_queue_size")
        if value is not None and queue is not None and value > queue:
            raise ValueError(f"must not exceed OTEL_BSP_MAX_QUEUE_SIZE ({queue})")
        return value

    @field_validator("resource_attributes")
    @classmethod
    def _key_values(cls, value: str) -> str:
        parse_key_values(value)
        return value

    @field_validator("exporter_otlp_headers", "exporter_otlp_metrics_headers", "exporter_otlp_traces_headers")
    @classmethod
    def _headers(cls, value: str) -> str:
        try:
            headers = parse_key_values(value)
        except ValueError:  # its message quotes the bad member, which may be a token
            raise ValueError("expected key=value pairs separated by commas (the value is not shown)") from None
        for name, header_value in headers.items():
            # Either would fail every export (HTTP and gRPC refuse them), long after start-up.
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"header name {name!r} is not an HTTP token (letters, digits, - and the like)")
            if any(unicodedata.category(char) == "Cc" and char != "\t" for char in header_value):
                raise ValueError(f"the value of header {name!r} holds a control character such as a line break")
        return value

    @field_validator("python_disabled_instrumentations")
    @classmethod
    def _no_misspelt_library(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        # Other names are fine: with `opentelemetry-instrument` the variable also switches off
        # other distributions' instrumentations. A near miss of one of ours is a typo.
        for name in value:
            close = difflib.get_close_matches(name, LIBRARIES, n=1, cutoff=0.75)
            if name not in LIBRARIES and close:
                raise ValueError(f"{name!r} instruments nothing (did you mean {close[0]}?)")
        return value

    @property
    def bsp_batch_size(self) -> int:
        """The span batch processor's batch size: ``OTEL_BSP_MAX_EXPORT_BATCH_SIZE``, or the
        specification's 512 cut to the queue, so that a smaller queue alone is enough."""
        given = self.bsp_max_export_batch_size
        return given if given is not None else min(_DEFAULT_SPAN_BATCH, self.bsp_max_queue_size)

    @property
    def resource_attribute_map(self) -> dict[str, str]:
        return parse_key_values(self.resource_attributes)

    @property
    def otlp_headers(self) -> dict[str, str]:
        """``OTEL_EXPORTER_OTLP_HEADERS``, names in lower case: gRPC refuses metadata keys with
        capitals (every push would fail over ``Authorization=...``), and HTTP's are case-blind."""
        return _header_map(self.exporter_otlp_headers)

    def otlp_headers_for(self, signal: Literal["metrics", "traces"]) -> dict[str, str]:
        """The headers of ``signal``'s exports: its own variable's when set, in place of the
        generic ones (as the specification says), else :attr:`otlp_headers`."""
        own = getattr(self, f"exporter_otlp_{signal}_headers")
        return _header_map(own) if own.strip() else self.otlp_headers


def _header_map(text: str) -> dict[str, str]:
    return {name.lower(): value for name, value in parse_key_values(text).items()}


def _check_exporters(value: tuple[str, ...], known: tuple[str, ...]) -> tuple[str, ...]:
    names = tuple(name.lower() for name in value)
    if not names:  # `,` or `" , "`: a blank value is unset (the default), `none` says none
        raise ValueError("names no exporter; write `none` for none")
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(
            f"unknown exporter {', '.join(map(repr, unknown))}; expected a comma list of {', '.join(known)}"
        )
    if "none" in names and len(names) > 1:
        raise ValueError("`none` cannot be combined with other exporters")
    return () if names == ("none",) else names


class ChatobsSettings(MappingSettings):
    """This project's own settings, every variable prefixed ``CHATOBS_``."""

    model_config = SettingsConfigDict(env_prefix=CHATOBS_PREFIX, extra="ignore", frozen=True)

    service: str | None = Field(
        None,
        description=f"Service role ({', '.join(SERVICES)}): which catalogue metrics the service declares. "
        "`setup(service=...)` takes precedence; the zero-code path needs this variable.",
    )
    metrics_path: str = Field("/metrics", description="Path of the Prometheus scrape endpoint.")
    metrics_host: BindHost = Field("0.0.0.0", description="Bind address of the standalone metrics server.")
    metrics_port: int | None = Field(
        None, ge=0, le=65535,
        description="Port of the standalone metrics server, for services without an HTTP app (0: any free port).",
    )  # fmt: skip
    metrics_on_app: bool = Field(
        True,
        description="Serve the scrape on the service's own app too. `false`: only on the standalone server "
        "(`CHATOBS_METRICS_PORT`, e.g. an internal port), and the app's metrics path answers 404.",
    )
    metrics_bearer_token: SecretStr | None = Field(
        None, description="Scrapes must send `Authorization: Bearer <token>` (401 otherwise). Never printed."
    )
    metrics_bearer_token_file: NonEmptyPath | None = Field(
        None,
        description="File holding that token instead (re-read when it changes); Prometheus: "
        "`authorization.credentials_file`.",
    )
    metrics_basic_auth_user: str | None = Field(
        None, description="User name scrapes must send with HTTP basic auth (401 otherwise)."
    )
    metrics_basic_auth_password: SecretStr | None = Field(
        None, description="Password of `CHATOBS_METRICS_BASIC_AUTH_USER`. Never printed."
    )
    metrics_basic_auth_password_file: NonEmptyPath | None = Field(
        None,
        description="File holding that password instead (re-read when it changes); Prometheus: "
        "`basic_auth.password_file`.",
    )
    scrape_timeout_seconds: float = Field(5.0, gt=0, le=120, description="Longest time one scrape may collect for.")
    shutdown_timeout_seconds: float = Field(
        5.0, gt=0, le=120, description="Longest time shutdown waits for the last OTLP push: an unreachable "
        "collector cannot hold a stopping service up.",
    )  # fmt: skip
    tracer: TracerKind = Field(
        "lean",
        description="`lean`: chatobs's tracer (the SDK's samplers, processors and exporters at a fraction "
        "of the SDK span's cost; no `OTEL_SPAN_*_LIMIT`s); `sdk`: the OpenTelemetry SDK's `TracerProvider` "
        "(chatobs's own spans record an exception whose `str()` fails as `<exception str() failed>`; "
        "the SDK's `start_as_current_span` raises on one: open-telemetry/opentelemetry-python#2683).",
    )
    expose_target_info: bool = Field(
        True, description="Expose the `target_info` family carrying the resource attributes."
    )
    expose_scope_labels: bool = Field(
        False, description="Add `otel_scope_name`/`otel_scope_version` labels to every series."
    )
    expose_uncatalogued: bool = Field(
        False, description="Also expose instruments that are not in the catalogue (names translated)."
    )
    process_metrics: bool = Field(True, description="Report process CPU, memory, open fds and data-dir disk free.")
    data_dir: NonEmptyPath = Field(
        Path("."), description="Existing directory whose file system `data_dir_free_bytes` reports."
    )
    health_paths: CsvList = Field(
        ("/health",),
        description="Probe paths (each from `/`) kept out of HTTP metrics and traces, as the scrape path is.",
    )
    wal_topic: KafkaTopic = Field("chat.wal", description="Kafka topic of the WAL (for `wal_publish_*`).")
    # Before the label lists: their validator reads it. At least 64: every catalogue value
    # (fixed label values, and metric names in the self-metrics' labels) must fit.
    max_label_length: int = Field(
        256, ge=64, le=4096, description="Longest label value recorded; a longer one is recorded as `other`."
    )
    message_sources: CsvList = Field(
        ("web", "api", "cli"), description="Allowed values of the `source` label of `chat_messages_in_total`."
    )
    llm_models: CsvList = Field((), description="Allowed `model` label values (empty: first N seen).")
    llm_providers: CsvList = Field((), description="Allowed `provider` label values (empty: first N seen).")
    tools: CsvList = Field((), description="Allowed `tool` label values (empty: first N seen).")
    tenants: CsvList = Field((), description="Allowed `tenant` label values (empty: first N seen).")
    multiprocess_dir: NonEmptyPath | None = Field(
        None,
        description="Shared directory for several worker processes behind one `/metrics` (gunicorn `-w N`, "
        "uvicorn `--workers N`): each scrape combines every worker's values. Must exist and be writable; "
        "pull only (OTLP metric push would count each worker's view again), catalogue only "
        "(`CHATOBS_EXPOSE_UNCATALOGUED` is refused: those instruments are per process).",
    )
    max_label_values: int = Field(
        50, ge=1, le=10_000, description="N: distinct values admitted for a label whose allowed list is empty."
    )

    @field_validator(
        "message_sources", "llm_models", "llm_providers", "tools", "tenants", "health_paths", mode="before"
    )
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("service")
    @classmethod
    def _known_service(cls, value: str | None) -> str | None:
        if value is not None and value not in SERVICES:
            raise ValueError(f"unknown service role {value!r}; expected one of {', '.join(SERVICES)}")
        return value

    @field_validator("metrics_path")
    @classmethod
    def _absolute_path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"must start with '/', got {value!r}")
        # A plain URL path: `{name}` would be a Starlette path parameter (`{x:bogus}` fails to
        # mount), and a space, `?` or `#` could never be requested as it is written.
        if not _PLAIN_PATH.fullmatch(value):
            raise ValueError(f"must be a plain URL path (letters, digits and -._~!$&'()*+,;=:@%/), got {value!r}")
        return value

    @field_validator("health_paths")
    @classmethod
    def _absolute_paths(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for path in value:
            if not path.startswith("/"):  # a request path always does: this one would never match
                raise ValueError(f"each path must start with '/', got {path!r}")
        return value

    @field_validator("data_dir")
    @classmethod
    def _existing_directory(cls, value: Path) -> Path:
        if not value.is_dir():  # `data_dir_free_bytes` would be missing from every scrape
            raise ValueError(f"{str(value)!r} is not an existing directory")
        return value

    @field_validator("multiprocess_dir")
    @classmethod
    def _writable_directory(cls, value: Path | None) -> Path | None:
        if value is not None and not (value.is_dir() and os.access(value, os.W_OK | os.X_OK)):
            raise ValueError(f"{str(value)!r} is not an existing, writable directory")
        return value

    @field_validator("metrics_bearer_token")
    @classmethod
    def _bearer_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not _is_token(value.get_secret_value()):
            raise ValueError("must be a non-empty token without spaces or control characters")
        return value

    @field_validator("metrics_bearer_token_file")
    @classmethod
    def _bearer_token_file(cls, value: Path | None) -> Path | None:
        if value is not None:
            try:
                token = read_secret_file(value)
            except ValueError as error:
                raise ValueError(f"the file {error}") from None
            if not _is_token(token):  # what the file holds is never shown
                raise ValueError("the file must hold one token without spaces or control characters")
        return value

    @field_validator("metrics_basic_auth_user")
    @classmethod
    def _basic_user(cls, value: str | None) -> str | None:
        # RFC 7617: the user-id cannot contain a colon, and neither part control characters.
        if value is not None and (not value or ":" in value or not value.isprintable()):
            raise ValueError("must be a non-empty name without ':' or control characters")
        return value

    @field_validator("metrics_basic_auth_password")
    @classmethod
    def _basic_password(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and (not value.get_secret_value() or not value.get_secret_value().isprintable()):
            raise ValueError("must be a non-empty password without control characters")
        return value

    @field_validator("metrics_basic_auth_password_file")
    @classmethod
    def _basic_password_file(cls, value: Path | None) -> Path | None:
        if value is not None:
            try:
                read_secret_file(value)
            except ValueError as error:
                raise ValueError(f"the file {error}") from None
        return value

    @model_validator(mode="after")
    def _scrape_protection(self) -> ChatobsSettings:
        def env(*fields: str) -> list[str]:
            return [_env_name(ChatobsSettings, name) for name in fields if getattr(self, name) is not None]

        bearer = env("metrics_bearer_token", "metrics_bearer_token_file")
        password = env("metrics_basic_auth_password", "metrics_basic_auth_password_file")
        user = env("metrics_basic_auth_user")
        if len(bearer) > 1:
            raise _conflict("set one of these, not both", *bearer)
        if len(password) > 1:
            raise _conflict("set one of these, not both", *password)
        if bearer and (user or password):
            raise _conflict(
                "scrapes are protected by a bearer token or basic auth, not both", *bearer, *user, *password
            )
        if user and not password:
            raise _conflict("needs a password too: CHATOBS_METRICS_BASIC_AUTH_PASSWORD or _PASSWORD_FILE", *user)
        if password and not user:
            raise _conflict("needs CHATOBS_METRICS_BASIC_AUTH_USER too", *password)
        if self.metrics_path in self.health_paths:  # the probe's route would be replaced by the scrape
            raise _conflict("the scrape path cannot be a probe path", "CHATOBS_METRICS_PATH", "CHATOBS_HEALTH_PATHS")
        if not self.metrics_on_app and self.metrics_port is None:
            raise _conflict(
                "ON_APP=false needs the port set: the standalone server is then the only one serving the scrape",
                "CHATOBS_METRICS_ON_APP",
                "CHATOBS_METRICS_PORT",
            )
        return self

    @field_validator("message_sources", "llm_models", "llm_providers", "tools", "tenants")
    @classmethod
    def _valid_label_values(cls, value: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        # `other` is the overflow value: allowing it explicitly would hide overflow.
        if OVERFLOW_VALUE in value:
            raise ValueError(f"{OVERFLOW_VALUE!r} is reserved for values outside the list")
        # A listed value that no recording could match (recordings outside these rules become `other`).
        max_length = info.data.get("max_label_length", cls.model_fields["max_label_length"].default)
        for item in value:
            if len(item) > max_length:
                raise ValueError(f"{item[:40]!r}... is longer than CHATOBS_MAX_LABEL_LENGTH={max_length}")
            try:
                item.encode()
            except UnicodeEncodeError:
                raise ValueError(f"{item!r} is not valid UTF-8") from None
        return value


@dataclass(frozen=True)
class Settings:
    """Both settings models, as :func:`load_settings` returns them.

    Example::

        settings = load_settings({"OTEL_SERVICE_NAME": "chat-gateway"})
        settings.otel.service_name, settings.chatobs.metrics_path  # ("chat-gateway", "/metrics")
    """

    otel: OtelSettings
    chatobs: ChatobsSettings

    def with_service(self, service: str) -> Settings:
        """A copy whose service role is ``service`` (validated like ``CHATOBS_SERVICE``)."""
        if service not in SERVICES:
            raise ConfigError({"service": f"={service!r}: unknown service role; expected one of {', '.join(SERVICES)}"})
        return Settings(self.otel, self.chatobs.model_copy(update={"service": service}))


def _env_name(model: type[BaseSettings], field: str) -> str:
    return f"{model.model_config.get('env_prefix', '')}{field}".upper()


def _is_secret(model: type[BaseSettings], field: str) -> bool:
    info = model.model_fields[field]
    if isinstance(info.json_schema_extra, dict) and info.json_schema_extra.get("secret"):
        return True
    return info.annotation is SecretStr or SecretStr in typing.get_args(info.annotation)


#: Up to the last `@`: a user or password may hold an unencoded `/`, `?` or `#` (the very mistake echoed).
_URL_PASSWORD = re.compile(r"(://[^@:\s]*):[^@\s]*@")


def _without_password(value: str) -> str:
    """``value`` with any URL's password hidden: a malformed ``DATABASE_URL`` is echoed in the
    error, and its password must not reach the logs with it."""
    return _URL_PASSWORD.sub(r"\1:<hidden>@", value)


def _errors(model: type[BaseSettings], env: Mapping[str, str], exc: ValidationError) -> dict[str, str]:
    problems: dict[str, str] = {}
    for error in exc.errors():
        context = error.get("ctx") or {}
        if error["type"] == "chatobs_conflict":
            problems[str(context["variables"]).replace(",", ", ")] = f": {error['msg']}"
            continue
        field = str(error["loc"][0]) if error["loc"] else ""
        name = _env_name(model, field) if field in model.model_fields else model.__name__
        if name not in env:
            shown = ""
        elif field in model.model_fields and _is_secret(model, field):
            shown = "=<hidden>"  # a malformed secret is still a secret: never echo it
        else:
            shown = f"={_without_password(env[name])!r}"
        problems[name] = f"{shown}: {error['msg']}"
    return problems


def _unknown_variables(env: Mapping[str, str], model: type[BaseSettings]) -> dict[str, str]:
    """Catch typos such as ``CHATOBS_METRIC_PORT``: a prefixed variable that nothing reads."""
    prefix = str(model.model_config.get("env_prefix", ""))
    known = {_env_name(model, field) for field in model.model_fields}
    problems = {}
    for name in env:
        if prefix and name.startswith(prefix) and name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems[name] = f": unknown variable{hint}"
    return problems


@functools.cache
def _mapping_only(model: type[M]) -> type[M]:
    """``model`` reading only what it is given. A plain ``BaseSettings`` model (one not based on
    :class:`MappingSettings`) would fill a field missing from the mapping from ``os.environ``,
    so it is validated through a subclass with :class:`MappingSettings`'s sources: its
    instances are of that subclass (an ``isinstance`` of ``model``, but not ``type(...) is``)."""
    if issubclass(model, MappingSettings):
        return model
    sources = MappingSettings.__dict__["settings_customise_sources"]
    namespace = {"__module__": model.__module__, "__qualname__": model.__qualname__, "__doc__": model.__doc__,
                 "settings_customise_sources": sources}  # fmt: skip
    return type(model.__name__, (model,), namespace)  # type: ignore[return-value]


def _validate(model: type[M], env: Mapping[str, str]) -> tuple[M | None, dict[str, str]]:
    values = {field: env[_env_name(model, field)] for field in model.model_fields if _env_name(model, field) in env}
    if model is OtelSettings:
        # The specification: an empty value is treated as unset (compose files write `${X:-}`),
        # so `OTEL_METRICS_EXPORTER=` keeps `/metrics` rather than turning every exporter off.
        values = {field: value for field, value in values.items() if value.strip()}
    try:
        # Pass values explicitly (not via the env source) so a test's mapping is
        # the whole truth and os.environ cannot leak in.
        return _mapping_only(model).model_validate(values), {}
    except ValidationError as exc:
        return None, _errors(model, env, exc)


def load_model(model: type[M], env: Mapping[str, str] | None = None, *, reject_unknown: bool = True) -> M:
    """Validate one settings model from ``env`` (default ``os.environ``), the way :func:`load_settings`
    does: every problem reported at once in a :class:`ConfigError` naming the variables, and
    (``reject_unknown``) a variable with the model's prefix that no field reads is a problem too.

    Example::

        class WorkerSettings(MappingSettings):
            model_config = SettingsConfigDict(env_prefix="MYAPP_")
            batch_size: int = 10

        settings = load_model(WorkerSettings)
    """
    env = dict(os.environ if env is None else env)
    problems = _unknown_variables(env, model) if reject_unknown else {}
    instance, errors = _validate(model, env)
    problems.update(errors)
    if problems or instance is None:
        raise ConfigError(problems)
    return instance


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read and validate every setting from ``env`` (default ``os.environ``).

    Raises :class:`ConfigError` naming each bad variable, all at once.

    Example::

        settings = load_settings()  # os.environ; or a mapping, as tests do
        Telemetry(settings, service="worker")
    """
    env = dict(os.environ if env is None else env)
    problems = _unknown_variables(env, ChatobsSettings)
    otel, otel_errors = _validate(OtelSettings, env)
    chatobs, chatobs_errors = _validate(ChatobsSettings, env)
    problems.update(otel_errors)
    problems.update(chatobs_errors)
    if otel and chatobs and chatobs.multiprocess_dir and "otlp" in otel.metrics_exporter:
        # Every worker would push the combined values: the collector would count them N times.
        problems["OTEL_METRICS_EXPORTER, CHATOBS_MULTIPROCESS_DIR"] = (
            ": otlp metric push is per process, but the directory combines the workers for the scrape; "
            "scrape /metrics (e.g. with the collector's prometheus receiver) instead"
        )
    if chatobs and chatobs.multiprocess_dir and chatobs.expose_uncatalogued:
        # Only the catalogue's cells are shared: the SDK's other instruments are the answering
        # worker's alone, and a counter that jumps between workers' values reads as resets.
        problems["CHATOBS_EXPOSE_UNCATALOGUED, CHATOBS_MULTIPROCESS_DIR"] = (
            ": instruments outside the catalogue are per process, but the directory combines the workers "
            "for the scrape (the answering worker's values would be shown); add them to the catalogue instead"
        )
    if problems or otel is None or chatobs is None:
        raise ConfigError(problems)
    return Settings(otel, chatobs)


#: How a field's bounds read in the settings table: its constraint's attribute, then the words.
_LIMIT_WORDS = (
    ("gt", "> {}"), ("ge", "≥ {}"), ("lt", "< {}"), ("le", "≤ {}"), ("min_length", "at least {} characters"),
    ("max_length", "at most {} characters"), ("pattern", "matching `{}`"),
)  # fmt: skip


def _limits(info: FieldInfo) -> str:
    """A field's bounds as the table shows them, ``≥ 64, ≤ 4096`` (a value outside is refused at start)."""
    shown = []
    for constraint in info.metadata:
        if isinstance(constraint, _Allowed):
            shown.append(constraint.words)
        for attribute, words in _LIMIT_WORDS:
            bound = getattr(constraint, attribute, None)
            if bound is not None:
                shown.append("not empty" if (attribute, bound) == ("min_length", 1) else words.format(bound))
    return ", ".join(shown)


def settings_table(models: Sequence[type[BaseSettings]] = (OtelSettings, ChatobsSettings)) -> str:
    """A Markdown table of every variable of ``models``: its default, the values allowed (others
    stop the start with a :class:`ConfigError` naming it) and its meaning (for the README)."""
    rows = ["| variable | default | allowed | meaning |", "|---|---|---|---|"]
    for model in models:
        for field, info in model.model_fields.items():
            default = info.default
            if isinstance(default, tuple):
                default = ",".join(default)
            elif isinstance(default, bool):
                default = str(default).lower()
            shown = "" if default in (None, "", ()) or str(default) == "PydanticUndefined" else f"`{default}`"
            if info.is_required():
                shown = "required"
            rows.append(f"| `{_env_name(model, field)}` | {shown} | {_limits(info)} | {info.description or ''} |")
    return "\n".join(rows) + "\n"
