"""Auto-instrumentation of the pipeline's libraries, wired to one Telemetry's providers.

One instrumentor per library from opentelemetry-python-contrib (httpx, redis, asyncpg,
aiokafka), chatobs's Kafka delivery, asyncpg connect and asyncpg pool-reset instrumentors, and for the
inbound side of a FastAPI app chatobs's lean :class:`ServerMiddleware` (the contrib
FastAPI instrumentation costs more than half the throughput; see docs/performance.md).
Any of them can be switched off with the standard ``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS`` (names: fastapi, httpx,
redis, asyncpg, aiokafka). Calling again is harmless: an instrumentor already
in place is left alone.

Example::

    names = instrument_libraries(telemetry.tracer_provider, disabled=())
    instrument_app(app, telemetry.tracer_provider, telemetry.meter_provider, excluded_urls=["/metrics", "/health"])
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Iterable
from typing import Any

from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.trace import Tracer

from chatobs.cells import CellStore
from chatobs.instrumentation.asyncpg_connect import AsyncpgConnectInstrumentor, AsyncpgResetInstrumentor
from chatobs.instrumentation.http_server import ServerMiddleware
from chatobs.instrumentation.kafka import KafkaDeliveryInstrumentor, consumer_span
from chatobs.instrumentation.spanmetrics import BackendSpanMetrics, RecordClientSpans

__all__ = [
    "LIBRARIES",
    "AsyncpgConnectInstrumentor",
    "AsyncpgResetInstrumentor",
    "BackendSpanMetrics",
    "KafkaDeliveryInstrumentor",
    "RecordClientSpans",
    "ServerMiddleware",
    "consumer_span",
    "instrument_app",
    "instrument_libraries",
    "uninstrument_libraries",
]

_logger = logging.getLogger("chatobs")

#: Libraries instrumented by :func:`instrument_libraries` (fastapi: per app, :func:`instrument_app`).
LIBRARIES = ("fastapi", "httpx", "redis", "asyncpg", "aiokafka")


def _opt_in_to_stable_http_semconv() -> None:
    # The catalogue names the stable HTTP metrics (seconds, `http.route`); the contrib
    # instrumentations emit the old ones (milliseconds, `http.target`) unless opted in.
    # They read this variable once, at their first use, so it must be set before that.
    current = [part.strip() for part in os.environ.get("OTEL_SEMCONV_STABILITY_OPT_IN", "").split(",") if part.strip()]
    if not {"http", "http/dup"} & set(current):
        os.environ["OTEL_SEMCONV_STABILITY_OPT_IN"] = ",".join([*current, "http"])


def _instrumentors(disabled: Collection[str]) -> list[tuple[str, Any]]:
    """(library name, instrumentor) for each enabled library."""
    found: list[tuple[str, Any]] = []
    if "httpx" not in disabled:
        from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

        found.append(("httpx", HTTPXClientInstrumentor()))
    if "redis" not in disabled:
        from opentelemetry.instrumentation.redis import RedisInstrumentor

        found.append(("redis", RedisInstrumentor()))
    if "asyncpg" not in disabled:
        from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor

        found.append(("asyncpg", AsyncPGInstrumentor()))
        found.append(("asyncpg", AsyncpgConnectInstrumentor()))
        found.append(("asyncpg", AsyncpgResetInstrumentor()))
    if "aiokafka" not in disabled:
        from opentelemetry.instrumentation.aiokafka import AIOKafkaInstrumentor

        found.append(("aiokafka", AIOKafkaInstrumentor()))
        found.append(("aiokafka", KafkaDeliveryInstrumentor()))
    return found


def instrument_libraries(tracer_provider: Any, disabled: Collection[str] = ()) -> list[str]:
    """Instrument httpx, redis, asyncpg and aiokafka; return the names now instrumented."""
    _opt_in_to_stable_http_semconv()
    names = []
    for name, instrumentor in _instrumentors(disabled):
        if not instrumentor.is_instrumented_by_opentelemetry:
            # No instrumentor gets the real meter provider: their synchronous SDK instruments are
            # what costs; the durations and errors come from their spans (BackendSpanMetrics).
            instrumentor.instrument(tracer_provider=tracer_provider, meter_provider=NoOpMeterProvider())
        names.append(name)
    return sorted(set(names))


def uninstrument_libraries() -> None:
    """Undo :func:`instrument_libraries` (for tests that build several pipelines)."""
    for _, instrumentor in _instrumentors(()):
        if instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.uninstrument()


def instrument_app(app: Any, tracer: Tracer, cells: CellStore, excluded_paths: Iterable[str]) -> bool:
    """Add :class:`ServerMiddleware` to a FastAPI/Starlette app (one span and one duration
    observation per request, route templates only); False if it already has it."""
    if getattr(app, "_chatobs_http_instrumented", False):
        return False
    _turn_off_native_fastapi_telemetry(app)
    app.add_middleware(ServerMiddleware, tracer=tracer, cells=cells, excluded_paths=frozenset(excluded_paths))
    app._chatobs_http_instrumented = True
    return True


def _turn_off_native_fastapi_telemetry(app: Any) -> None:
    """FastAPI 0.16x traces and meters requests itself once global providers exist: a second
    SERVER span and five synchronous instruments per request (~250 us each on the benchmark
    machine). chatobs owns HTTP server telemetry on the apps it instruments, so that is turned
    off here. FastAPI offers the switch only as `FastAPI(telemetry={...})` at construction;
    this edits that same configuration afterwards, and does nothing on FastAPI versions without it."""
    config = getattr(app, "_telemetry", None)
    if isinstance(config, dict) and "tracing" in config:
        config.update(tracing=False, metrics=False, logs=False)
