"""Auto-instrumentation of the pipeline's libraries, wired to one Telemetry's providers.

For each client library (httpx, redis, asyncpg, aiokafka) two instrumentors, in order: the
contrib one from opentelemetry-python-contrib, for its spans, then chatobs's over it
(:class:`HttpClientInstrumentor`, :class:`RedisClientInstrumentor`,
:class:`PostgresClientInstrumentor`, :class:`KafkaClientInstrumentor`), which measures every
call into the client metrics and goes through the contrib wrapper only when its span would be
recorded (see :mod:`chatobs.instrumentation.dispatch`). For the inbound side of a FastAPI app,
chatobs's lean :class:`ServerMiddleware` (the contrib FastAPI instrumentation costs more than
half the throughput; see docs/performance.md). Any library can be switched off with the
standard ``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS`` (names: fastapi, httpx, redis, asyncpg,
aiokafka). Calling again is harmless: an instrumentor already in place is left alone. The
instrumentors are process-wide, so a library records into one Telemetry's recorder at a
time: the one that instrumented it, until it shuts down (:meth:`Telemetry.shutdown
<chatobs.Telemetry.shutdown>` undoes its instrumentation).

Example::

    names = instrument_libraries(telemetry.tracer_provider, telemetry.clients, disabled=())
    instrument_app(app, telemetry.tracer, telemetry.cells, excluded_paths=["/metrics", "/health"])
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Collection, Iterable
from typing import Any

from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.trace import Tracer
from starlette.middleware import Middleware

from chatobs.cells import CellStore
from chatobs.instrumentation.dispatch import ClientInstrumentor
from chatobs.instrumentation.gate import SpanGate
from chatobs.instrumentation.http_client import HttpClientInstrumentor
from chatobs.instrumentation.http_server import ServerMiddleware
from chatobs.instrumentation.kafka import KafkaClientInstrumentor, consumer_span
from chatobs.instrumentation.postgres import PostgresClientInstrumentor
from chatobs.instrumentation.redis import RedisClientInstrumentor
from chatobs.recorders.clients import ClientRecorder
from chatobs.settings import LIBRARIES  # instrumented by instrument_libraries (fastapi: per app, instrument_app)

__all__ = [
    "LIBRARIES",
    "HttpClientInstrumentor",
    "KafkaClientInstrumentor",
    "PostgresClientInstrumentor",
    "RedisClientInstrumentor",
    "ServerMiddleware",
    "SpanGate",
    "consumer_span",
    "instrument_app",
    "instrument_libraries",
    "uninstrument_app",
    "uninstrument_libraries",
]

_logger = logging.getLogger("chatobs")


def _opt_in_to_stable_http_semconv() -> None:
    # The contrib instrumentations emit the old HTTP conventions (`http.method`, `http.url`)
    # unless opted in. They read this variable once, at their first use, so it must be set before that.
    current = [part.strip() for part in os.environ.get("OTEL_SEMCONV_STABILITY_OPT_IN", "").split(",") if part.strip()]
    if not {"http", "http/dup"} & set(current):
        os.environ["OTEL_SEMCONV_STABILITY_OPT_IN"] = ",".join([*current, "http"])


#: library name -> (the contrib instrumentor, for spans: module and class; chatobs's, over it)
_CLIENTS: dict[str, tuple[str, str, type[ClientInstrumentor]]] = {
    "httpx": ("opentelemetry.instrumentation.httpx", "HTTPXClientInstrumentor", HttpClientInstrumentor),
    "redis": ("opentelemetry.instrumentation.redis", "RedisInstrumentor", RedisClientInstrumentor),
    "asyncpg": ("opentelemetry.instrumentation.asyncpg", "AsyncPGInstrumentor", PostgresClientInstrumentor),
    "aiokafka": ("opentelemetry.instrumentation.aiokafka", "AIOKafkaInstrumentor", KafkaClientInstrumentor),
}


#: The contrib instrumentors chatobs turned on, by library: only these does it turn off again
#: (one the application had instrumented itself stays as it was).
_contrib_turned_on: set[str] = set()
#: The client recorder each library instrumented by chatobs records into.
_recording_into: dict[str, ClientRecorder] = {}


def _contrib(module: str, name: str) -> Any:
    """The contrib instrumentor (a singleton, as every ``BaseInstrumentor``), imported when needed."""
    return getattr(importlib.import_module(module), name)()


def instrument_libraries(tracer_provider: Any, clients: ClientRecorder, disabled: Collection[str] = ()) -> list[str]:
    """Instrument httpx, redis, asyncpg and aiokafka, metrics into ``clients``; return the names
    now instrumented into ``clients``. A library already instrumented into another recorder (a
    second Telemetry while the first runs) stays with that one, with a warning, and is not named.
    A library whose instrumentation fails (a version that moved a method, say) is logged, left
    as it was, and not named: the service starts, the other libraries measured."""
    _opt_in_to_stable_http_semconv()
    names = []
    for name, (module, contrib_name, ours_class) in _CLIENTS.items():
        if name in disabled:
            continue
        ours = ours_class()
        if ours.is_instrumented_by_opentelemetry:
            if _recording_into.get(name) is not clients:
                _logger.warning("chatobs: %s is already instrumented for another Telemetry; its calls are "
                                "measured there until that one shuts down", name)  # fmt: skip
                continue
        elif not _instrumented(name, module, contrib_name, ours, tracer_provider, clients):
            continue
        names.append(name)
    return names


def _instrumented(name: str, module: str, contrib_name: str, ours: ClientInstrumentor, tracer_provider: Any,
                  clients: ClientRecorder) -> bool:  # fmt: skip
    """Put the contrib instrumentor (when not on already) and chatobs's in place for one library;
    False, with nothing of this call left in place, when either fails."""
    contrib: Any = None
    turned_on = contrib_raised = False
    try:
        contrib = _contrib(module, contrib_name)
        if not contrib.is_instrumented_by_opentelemetry:
            try:
                # No contrib instrumentor gets the real meter provider: their synchronous SDK
                # instruments are what costs, and chatobs's instrumentors measure the calls.
                contrib.instrument(tracer_provider=tracer_provider, meter_provider=NoOpMeterProvider())
            except Exception:
                contrib_raised = True
                raise
            turned_on = contrib.is_instrumented_by_opentelemetry
        ours.instrument(tracer_provider=tracer_provider, clients=clients,
                        traced=contrib.is_instrumented_by_opentelemetry)  # fmt: skip
        # Not raising, it may still have declined: BaseInstrumentor logs a version it does not support.
        done = ours.is_instrumented_by_opentelemetry
    except Exception:  # a library left uninstrumented must not stop the service
        _logger.exception("chatobs: %s not instrumented (its calls are not measured or traced)", name)
        done = False
    if not done:
        if turned_on or contrib_raised:
            _turn_contrib_off(name, contrib, half_done=contrib_raised)
        return False
    if turned_on:
        _contrib_turned_on.add(name)
    _recording_into[name] = clients
    return True


def _turn_contrib_off(name: str, contrib: Any, half_done: bool) -> None:
    """Undo what this call turned on of a contrib instrumentor; logged if it cannot be,
    and then left for :func:`uninstrument_libraries` to try again."""
    try:
        if half_done:
            # BaseInstrumentor counts an instrument() that raised as never done, so uninstrument()
            # would do nothing; the instrumentor's own undo unwraps whatever it had wrapped.
            contrib._uninstrument()
        else:
            contrib.uninstrument()
    except Exception:
        _logger.exception("chatobs: the contrib %s instrumentation could not be turned off again", name)
        if contrib.is_instrumented_by_opentelemetry:
            _contrib_turned_on.add(name)


def uninstrument_libraries(clients: ClientRecorder | None = None) -> None:
    """Undo :func:`instrument_libraries` (of those recording into ``clients`` alone, if given):
    chatobs's instrumentors first, then the contrib ones it turned on beneath them (not those
    the application had turned on itself)."""
    for name, (module, contrib_name, ours_class) in _CLIENTS.items():
        if clients is not None and _recording_into.get(name) is not clients:
            continue
        _recording_into.pop(name, None)
        ours = ours_class()
        if ours.is_instrumented_by_opentelemetry:
            ours.uninstrument()
        if name in _contrib_turned_on:
            _contrib_turned_on.discard(name)
            contrib = _contrib(module, contrib_name)
            if contrib.is_instrumented_by_opentelemetry:
                contrib.uninstrument()


def instrument_app(app: Any, tracer: Tracer, cells: CellStore, excluded_paths: Iterable[str],
                   on_error: Callable[[str, BaseException], None] | None = None) -> bool:  # fmt: skip
    """Add :class:`ServerMiddleware` to a FastAPI/Starlette app (one span and one duration
    observation per request, route templates only); False if it already has it. A failure of
    the instrumentation goes to ``on_error`` (default: logged once), never to the request.

    An app that has started (instrumented from its lifespan, say) is measured from its next
    request on.

    Example::

        instrument_app(app, telemetry.tracer, telemetry.cells, excluded_paths=["/metrics", "/health"])
    """
    if getattr(app, "_chatobs_http_instrumented", False):
        return False
    _turn_off_native_fastapi_telemetry(app)
    options = {"tracer": tracer, "cells": cells, "excluded_paths": frozenset(excluded_paths), "on_error": on_error}
    if getattr(app, "middleware_stack", None) is None:
        app.add_middleware(ServerMiddleware, **options)
    else:
        # Started: Starlette's add_middleware refuses then, so the middleware goes where it would
        # have put it and the stack is built again (as the contrib FastAPI instrumentation's undo
        # does). Requests already in flight finish on the stack they entered.
        app.user_middleware.insert(0, Middleware(ServerMiddleware, **options))
        app.middleware_stack = app.build_middleware_stack()
    app._chatobs_http_instrumented = True
    return True


def uninstrument_app(app: Any) -> bool:
    """Take away the :class:`ServerMiddleware` :func:`instrument_app` added; False if it had none.

    Example::

        uninstrument_app(app)  # its handle shut down: the app's next handle instruments it afresh
    """
    if not getattr(app, "_chatobs_http_instrumented", False):
        return False
    app.user_middleware = [entry for entry in app.user_middleware if entry.cls is not ServerMiddleware]
    if getattr(app, "middleware_stack", None) is not None:  # started: its stack is built again without it
        app.middleware_stack = app.build_middleware_stack()
    app._chatobs_http_instrumented = False
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
