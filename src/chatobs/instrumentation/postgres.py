"""PostgreSQL through asyncpg: every statement measured, traced when the span would be recorded.

:class:`PostgresClientInstrumentor` puts a dispatcher (:mod:`chatobs.instrumentation.dispatch`)
over each statement method the contrib asyncpg instrumentation wraps (``Connection.execute``,
``fetch``, ``fetchval``, ``fetchrow``, ``executemany``, the cursor and prepared-statement
methods, and ``Connection.fetchmany``, which it does not) and over ``asyncpg.connect``:

* every call is one ``postgres_operation_seconds{operation}`` observation and, when it
  raised, one ``postgres_errors_total{operation}`` (0 on success, so the series exists
  before the first failure); the operation is the statement's first word, lower case
  (``select``, ``insert``, ``begin``, ...), or ``connect``;
* the contrib instrumentation's span is made only when :class:`~chatobs.instrumentation.gate.SpanGate`
  says a span processor would receive it; a connection attempt gets chatobs's own ``connect``
  span then (the contrib instrumentation has none, so a refused connection would fail outside
  any span);
* ``Connection.reset``, the statement a pool runs on every connection it takes back, is
  neither measured nor traced: it is housekeeping, not a statement the application ran
  (traced, it was a third span per request and a ``select`` counted in every request).

Example::

    AsyncPGInstrumentor().instrument(tracer_provider=telemetry.tracer_provider)  # the contrib spans
    PostgresClientInstrumentor().instrument(clients=telemetry.clients, tracer_provider=telemetry.tracer_provider,
                                            traced=True)
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Collection, Iterable
from contextvars import ContextVar
from typing import Any

from opentelemetry import trace
from opentelemetry.semconv.attributes.db_attributes import DB_OPERATION_NAME, DB_SYSTEM_NAME

from chatobs.instrumentation.dispatch import (
    BackendOperation,
    ClientInstrumentor,
    PatchSpec,
    Wiring,
    dispatcher,
    dispatching,
    instrumentation_enabled_unless,
    spanned,
)
from chatobs.recorders.clients import BoundOperation

__all__ = ["CONNECT_SCOPE", "PostgresClientInstrumentor", "statement_operation"]

#: Instrumentation scope of chatobs's ``connect`` spans.
CONNECT_SCOPE = "chatobs.instrumentation.asyncpg"

# (module, class, methods, where the statement is: the first argument or the object's `_query`)
_STATEMENTS = (
    ("asyncpg.connection", "Connection", ("execute", "executemany", "fetch", "fetchval", "fetchrow", "fetchmany"),
     "argument"),
    ("asyncpg.cursor", "Cursor", ("fetch", "forward", "fetchrow"), "attribute"),
    ("asyncpg.cursor", "CursorIterator", ("__anext__",), "attribute"),
    ("asyncpg.prepared_stmt", "PreparedStatement", ("fetch", "fetchval", "fetchrow", "executemany", "fetchmany"),
     "attribute"),
)  # fmt: skip
# Set while a pool resets a connection (a ContextVar of its own: the OpenTelemetry context's
# suppression costs a context copy on entry and several lookups per statement).
_RESETTING: ContextVar[bool] = ContextVar("chatobs_asyncpg_resetting", default=False)
_LEADING_COMMENTS = re.compile(r"\s*(?:(?:/\*.*?\*/|--[^\n]*)\s*)*", re.DOTALL)


@functools.lru_cache(maxsize=512)
def statement_operation(statement: str) -> str:
    """The operation label of a statement: its first word, lower case, after any comments.

    Example::

        statement_operation("/* report */ SELECT 1")  # 'select'
    """
    words = statement[_LEADING_COMMENTS.match(statement).end() :].split(None, 1)  # type: ignore[union-attr]
    return words[0].rstrip(";").lower() if words else "other"


def _operation_of(statement: Any) -> str:
    return statement_operation(statement) if statement.__class__ is str else "other"


class _Statement(BackendOperation):
    """A statement passed as the method's first argument (``Connection.fetch(query, ...)``)."""

    backend = "postgres"

    # One check for both: not while a pool resets the connection, nor under suppression.
    enabled = staticmethod(instrumentation_enabled_unless(_RESETTING))

    def describe(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> BoundOperation:
        # By keyword it is `query`, but `command` for `executemany`.
        statement = args[1] if len(args) > 1 else kwargs.get("query", kwargs.get("command"))
        if statement.__class__ is not str:
            return self._bound.get("other") or self.bind("other")
        # An application runs a few statement texts over and over: each text's series kept.
        found = self._kept.get(statement)
        if found is not None:
            return found
        operation = statement_operation(statement)
        return self.keep(statement, self._bound.get(operation) or self.bind(operation))


class _BoundStatement(_Statement):
    """A statement the object holds (a cursor, a prepared statement); the end of a cursor's
    rows is an outcome, not a failure."""

    benign = (StopAsyncIteration,)

    def describe(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> BoundOperation:
        operation = _operation_of(getattr(args[0], "_query", None))
        return self._bound.get(operation) or self.bind(operation)


class _Connect(_Statement):
    def describe(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> BoundOperation:
        return self._bound.get("connect") or self.bind("connect")


def _untraced_reset(original: Any, traced: Any) -> Any:
    async def reset(*args: Any, **kwargs: Any) -> Any:
        token = _RESETTING.set(True)
        try:
            return await original(*args, **kwargs)
        finally:
            _RESETTING.reset(token)

    return reset


class PostgresClientInstrumentor(ClientInstrumentor):
    """asyncpg's statements and connection attempts, measured into a
    :class:`~chatobs.recorders.ClientRecorder` and traced when a span would be recorded
    (see :class:`~chatobs.instrumentation.dispatch.ClientInstrumentor`)."""

    def instrumentation_dependencies(self) -> Collection[str]:
        return ("asyncpg >= 0.27",)

    def _specs(self, wiring: Wiring) -> Iterable[PatchSpec]:
        import asyncpg
        import asyncpg.connection

        gate = wiring.gate
        for module_name, class_name, methods, where in _STATEMENTS:
            owner = getattr(importlib.import_module(module_name), class_name)
            operation = _Statement(wiring.clients) if where == "argument" else _BoundStatement(wiring.clients)
            for method in methods:
                if hasattr(owner, method):
                    yield owner, method, dispatcher(gate, operation), True
        tracer = trace.get_tracer(CONNECT_SCOPE, tracer_provider=wiring.tracer_provider)
        connect = _Connect(wiring.clients)

        attributes = {DB_SYSTEM_NAME: "postgresql", DB_OPERATION_NAME: "connect"}

        def build_connect(original: Any, _: Any) -> Any:
            return dispatching(original, spanned(original, tracer, "connect", attributes), gate, connect)

        # `asyncpg.connect` is a re-export; pools call `asyncpg.connection.connect`.
        yield asyncpg.connection, "connect", build_connect, False
        yield asyncpg, "connect", build_connect, False
        yield asyncpg.connection.Connection, "reset", _untraced_reset, False
