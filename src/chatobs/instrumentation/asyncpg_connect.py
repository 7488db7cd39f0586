"""What the contrib asyncpg instrumentation gets wrong about connections, fixed.

* :class:`AsyncpgConnectInstrumentor`: the contrib instrumentation traces statements on an
  open connection, not ``asyncpg.connect`` (which pools call too), so a database that
  refuses connections would fail outside any span and ``postgres_errors_total`` would not
  see it. This adds one ``connect`` span per attempt.
* :class:`AsyncpgResetInstrumentor`: a pool resets every connection it takes back with one
  statement (``SELECT pg_advisory_unlock_all(); CLOSE ALL; ...``). Traced, that is a
  ``select`` the application never ran, on every request that used the pool: a second
  client span per request, and ``postgres_operation_seconds{operation="select"}``
  counting housekeeping. The reset runs with instrumentation suppressed; one that fails
  is still handled by asyncpg (the connection is closed, and the next one's ``connect``
  span is traced).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from opentelemetry import trace
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor
from opentelemetry.instrumentation.utils import suppress_instrumentation, unwrap
from opentelemetry.trace import SpanKind
from wrapt import wrap_function_wrapper

__all__ = ["ASYNCPG_CONNECT_SCOPE", "AsyncpgConnectInstrumentor", "AsyncpgResetInstrumentor"]

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


class AsyncpgResetInstrumentor(BaseInstrumentor):
    """``Connection.reset`` (what a pool runs on release) untraced; idempotent.

    Example::

        AsyncpgResetInstrumentor().instrument()
        async with pool.acquire() as connection:  # one span: the fetch, not the reset
            await connection.fetchval("select 1")
    """

    def instrumentation_dependencies(self) -> Collection[str]:
        return ("asyncpg >= 0.27",)

    def _instrument(self, **kwargs: Any) -> None:
        async def reset(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            with suppress_instrumentation():
                return await wrapped(*args, **kwargs)

        wrap_function_wrapper("asyncpg.connection", "Connection.reset", reset)

    def _uninstrument(self, **kwargs: Any) -> None:
        import asyncpg.connection

        unwrap(asyncpg.connection.Connection, "reset")
