"""Auto-instrumentation of the pipeline's libraries, wired to one Telemetry's providers.

One instrumentor per library, each from opentelemetry-python-contrib, plus
chatobs's Kafka delivery instrumentor. Any of them can be switched off with the
standard ``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS`` (names: fastapi, httpx,
redis, asyncpg, aiokafka). Calling again is harmless: an instrumentor already
in place is left alone.

Example::

    names = instrument_libraries(telemetry.tracer_provider, telemetry.meter_provider, disabled=())
    instrument_app(app, telemetry.tracer_provider, telemetry.meter_provider, excluded_urls=["/metrics", "/health"])
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Iterable
from typing import Any

from chatobs.instrumentation.asyncpg_connect import AsyncpgConnectInstrumentor
from chatobs.instrumentation.kafka import KafkaDeliveryInstrumentor, consumer_span
from chatobs.instrumentation.spanmetrics import BackendSpanMetrics, RecordClientSpans

__all__ = [
    "LIBRARIES",
    "AsyncpgConnectInstrumentor",
    "BackendSpanMetrics",
    "KafkaDeliveryInstrumentor",
    "RecordClientSpans",
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


def _instrumentors(disabled: Collection[str]) -> list[tuple[str, Any, dict[str, bool]]]:
    """(name, instrumentor, which providers it takes) for each enabled library."""
    found: list[tuple[str, Any, dict[str, bool]]] = []
    if "httpx" not in disabled:
        from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

        found.append(("httpx", HTTPXClientInstrumentor(), {"meter": True}))
    if "redis" not in disabled:
        from opentelemetry.instrumentation.redis import RedisInstrumentor

        found.append(("redis", RedisInstrumentor(), {}))
    if "asyncpg" not in disabled:
        from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor

        found.append(("asyncpg", AsyncPGInstrumentor(), {}))
        found.append(("asyncpg", AsyncpgConnectInstrumentor(), {}))
    if "aiokafka" not in disabled:
        from opentelemetry.instrumentation.aiokafka import AIOKafkaInstrumentor

        found.append(("aiokafka", AIOKafkaInstrumentor(), {}))
        found.append(("aiokafka", KafkaDeliveryInstrumentor(), {}))
    return found


def instrument_libraries(tracer_provider: Any, meter_provider: Any, disabled: Collection[str] = ()) -> list[str]:
    """Instrument httpx, redis, asyncpg and aiokafka; return the names now instrumented."""
    _opt_in_to_stable_http_semconv()
    names = []
    for name, instrumentor, takes in _instrumentors(disabled):
        if not instrumentor.is_instrumented_by_opentelemetry:
            options: dict[str, Any] = {"tracer_provider": tracer_provider}
            if takes.get("meter"):
                options["meter_provider"] = meter_provider
            instrumentor.instrument(**options)
        names.append(name)
    return sorted(set(names))


def uninstrument_libraries() -> None:
    """Undo :func:`instrument_libraries` (for tests that build several pipelines)."""
    for _, instrumentor, _ in _instrumentors(()):
        if instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.uninstrument()


def instrument_app(app: Any, tracer_provider: Any, meter_provider: Any, excluded_urls: Iterable[str]) -> bool:
    """Instrument one FastAPI app (route templates, never raw paths); False if already done."""
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    _opt_in_to_stable_http_semconv()
    if getattr(app, "_is_instrumented_by_opentelemetry", False):
        return False
    FastAPIInstrumentor.instrument_app(
        app,
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        excluded_urls=",".join(excluded_urls),
    )
    return True
