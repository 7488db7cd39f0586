"""What the instrumentation of one event costs a quiet service, on cold caches.

Under the demo's load the small services (publisher, replicator, tool executor) wake a few
times a second, and by then other processes have evicted their caches: each event's
instrumentation runs cold, and a cold Python call costs microseconds, not tens of
nanoseconds. Here each event is run once after 64 MB were written (as in
``bench/cold_scrape.py``), with the instrumentation and without it (the same call with
nothing around it), alternating, and the medians are compared. "Cold calls" divides the
instrumentation's part by the cost of one cold call of an empty Python function, timed the
same way (so it includes a cold read of the clock): how many such calls the instrumentation
of that event weighs, a unit that carries between machines better than microseconds do.

The events, with the tool executor's telemetry and the demo's tracing (every trace sampled,
no span processor):

* a statement: the dispatcher asyncpg's methods get, over a coroutine that returns at once,
  as the first call within a new span (both with it and without);
* a consumed record: ``consumer_span`` over a record carrying a ``traceparent``;
* an outbox row: ``continued`` and the publisher's ``outbox publish`` span;
* a sent record: the dispatcher aiokafka's ``send`` gets (the ``wal_publish`` metrics and the
  trace headers), over a coroutine that returns at once, within a new span;
* a request: the ASGI middleware over an app that answers at once.

The last line, ``cold_calls statement=<x> ...``, gives each event's figure.

    python bench/cold_event.py [rounds]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from cold_scrape import evict_caches

from chatobs import Telemetry, load_settings
from chatobs.instrumentation.dispatch import dispatching
from chatobs.instrumentation.gate import SpanGate
from chatobs.instrumentation.http_server import ServerMiddleware
from chatobs.instrumentation.kafka import _Produce, consumer_span  # _Produce: what aiokafka's send gets
from chatobs.instrumentation.postgres import _Statement  # the operation asyncpg's methods get
from chatobs.propagation import continued

_TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _run(coroutine: Any) -> None:
    try:
        coroutine.send(None)
    except StopIteration:
        return
    raise RuntimeError("the benchmark's coroutines never wait")


async def _statement(connection: object, query: str) -> None:
    return None


async def _send(producer: object, topic: str, value: bytes, key: bytes | None = None, headers: Any = None) -> None:
    return None  # aiokafka returns the delivery's future; None has the record made at once


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    scope["route"] = SimpleNamespace(path="/v1/sessions/{session_id}/messages")
    await send({"type": "http.response.start", "status": 202, "headers": []})
    await send({"type": "http.response.body", "body": b""})


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b""}


async def _respond(message: dict[str, Any]) -> None:
    return None


def _nothing() -> None:
    return None


def _events(telemetry: Telemetry) -> dict[str, tuple[Callable[[], object], Callable[[], object]]]:
    """Each event as (instrumented, bare)."""
    tracer = telemetry.tracer
    gate = SpanGate(telemetry.tracer_provider)  # no span processor: never through the traced path
    statement = dispatching(_statement, _statement, gate, _Statement(telemetry.clients))
    send = dispatching(_send, _send, gate, _Produce(telemetry.clients))
    record = SimpleNamespace(topic="chat.wal", partition=0, offset=7, headers=[("traceparent", _TRACEPARENT.encode())])
    middleware = ServerMiddleware(_app, tracer=tracer, cells=telemetry.cells, excluded_paths=frozenset({"/metrics"}))

    def request(app: Any) -> Callable[[], None]:
        def run() -> None:
            scope = {"type": "http", "method": "POST", "path": "/v1/sessions/s1/messages", "scheme": "http",
                     "headers": [(b"content-type", b"application/json")]}  # fmt: skip
            _run(app(scope, _receive, _respond))

        return run

    def consumed() -> None:
        with consumer_span(tracer, record):
            pass

    def outbox_row() -> None:
        with tracer.start_as_current_span("outbox publish", context=continued(_TRACEPARENT)):
            pass

    def in_a_span(call: Callable[[], object]) -> Callable[[], None]:
        # Statements and sends run within a request's or a record's span: a new context each
        # time, as each first call in a span sees it.
        def run() -> None:
            with tracer.start_as_current_span("parent"):
                call()

        return run

    return {
        "statement": (
            in_a_span(lambda: _run(statement(None, "select 1"))),
            in_a_span(lambda: _run(_statement(None, "select 1"))),
        ),
        "consumed record": (consumed, _nothing),
        "outbox row": (outbox_row, _nothing),
        "sent record": (
            in_a_span(lambda: _run(send(None, "chat.wal", b"{}", b"s1"))),
            in_a_span(lambda: _run(_send(None, "chat.wal", b"{}", b"s1"))),
        ),
        "request": (request(middleware), request(_app)),
    }


def _cold_medians(calls: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    measured: dict[str, list[float]] = {name: [] for name in calls}
    clock = time.perf_counter_ns
    for _ in range(rounds):
        for name, call in calls.items():
            evict_caches()
            started = clock()
            call()
            measured[name].append((clock() - started) / 1000)
    return {name: statistics.median(times) for name, times in measured.items()}


def main(rounds: int) -> None:
    telemetry = Telemetry(load_settings({}), service="tool_executor")
    try:
        events = _events(telemetry)
        calls: dict[str, Callable[[], object]] = {"empty call": _nothing}
        for name, (instrumented, bare) in events.items():
            instrumented(), bare()  # first calls (imports, caches) outside the timing
            calls[f"{name}|on"], calls[f"{name}|off"] = instrumented, bare
        medians = _cold_medians(calls, rounds)
    finally:
        telemetry.shutdown()
    unit = medians["empty call"]
    print(f"cold, median of {rounds}; one cold call of an empty function: {unit:.1f} µs")
    print(f"{'event':30s} {'on µs':>7s} {'off µs':>7s} {'+µs':>6s} {'cold calls':>10s}")
    cold_calls = []
    for name in events:
        on, off = medians[f"{name}|on"], medians[f"{name}|off"]
        print(f"{name:30s} {on:7.1f} {off:7.1f} {on - off:6.1f} {(on - off) / unit:10.1f}")
        cold_calls.append(f"{name.replace(' ', '_')}={(on - off) / unit:.1f}")
    print("cold_calls", *cold_calls)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a whole number of rounds, at least 1, not {text!r}")
    return int(text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "rounds", nargs="?", type=_positive, default=100, help="cold runs of each event, the median kept (default: 100)"
    )
    main(parser.parse_args().rounds)
