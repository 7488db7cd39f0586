"""PostgreSQL connection attempts as client spans.

The contrib asyncpg instrumentation traces statements on an open connection,
not ``asyncpg.connect`` (which pools call too), so a database that refuses
connections would fail outside any span and ``postgres_errors_total`` would not
see it. This instrumentor adds one ``connect`` span per attempt.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from opentelemetry import trace
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor
from opentelemetry.instrumentation.utils import unwrap
from opentelemetry.trace import SpanKind
from wrapt import wrap_function_wrapper

__all__ = ["ASYNCPG_CONNECT_SCOPE", "AsyncpgConnectInstrumentor"]

ASYNCPG_CONNECT_SCOPE = "chatobs.instrumentation.asyncpg"


class AsyncpgConnectInstrumentor(BaseInstrumentor):
    """``instrument(tracer_provider=...)``; idempotent, as every ``BaseInstrumentor``."""

    def instrumentation_dependencies(self) -> Collection[str]:
        return ("asyncpg >= 0.27",)

    def _instrument(self, **kwargs: Any) -> None:
        tracer = trace.get_tracer(ASYNCPG_CONNECT_SCOPE, tracer_provider=kwargs.get("tracer_provider"))

        async def connect(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            attributes = {"db.system": "postgresql", "db.operation.name": "connect"}
            with tracer.start_as_current_span("connect", kind=SpanKind.CLIENT, attributes=attributes):
                return await wrapped(*args, **kwargs)

        # `asyncpg.connect` is a re-export; pools call `asyncpg.connection.connect`.
        wrap_function_wrapper("asyncpg.connection", "connect", connect)
        wrap_function_wrapper("asyncpg", "connect", connect)

    def _uninstrument(self, **kwargs: Any) -> None:
        import asyncpg
        import asyncpg.connection

        unwrap(asyncpg.connection, "connect")
        unwrap(asyncpg, "connect")
