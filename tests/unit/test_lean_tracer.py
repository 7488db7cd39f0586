"""chatobs's lean tracer exports what the SDK's tracer exports for the same calls.

Each scenario runs once on the SDK's TracerProvider and once on LeanTracerProvider, both
with an in-memory exporter; the exported spans (and their OTLP encoding) must agree on
everything but ids and times.
"""

from __future__ import annotations

import asyncio
import enum
import json
import random
import uuid
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import context, propagate, trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased, Sampler
from opentelemetry.trace import SpanKind, Status, StatusCode

from chatobs.tracing import DecidedByParent, LeanTracerProvider

RESOURCE = Resource.create({"service.name": "lean-test"})


def _providers(sampler: Sampler) -> list[tuple[Any, InMemorySpanExporter]]:
    made = []
    for provider in (TracerProvider(resource=RESOURCE, sampler=sampler, shutdown_on_exit=False),
                     LeanTracerProvider(resource=RESOURCE, sampler=sampler)):  # fmt: skip
        exporter = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        made.append((provider, exporter))
    return made


def _without_stacktrace(attributes: Any) -> dict[str, Any]:
    return {key: value for key, value in (attributes or {}).items() if key != "exception.stacktrace"}


def _shape(span: ReadableSpan, ids: dict[int, str]) -> dict[str, Any]:
    """What a backend sees of a span, with ids replaced by their order of appearance."""

    def name_of(span_id: int | None) -> str | None:
        return None if span_id is None else ids.setdefault(span_id, f"span{len(ids)}")

    return {
        "name": span.name,
        "kind": span.kind,
        "id": name_of(span.context.span_id),
        "parent": name_of(span.parent.span_id) if span.parent else None,
        "sampled": span.context.trace_flags.sampled,
        "flags": int(span.context.trace_flags),
        "attributes": dict(span.attributes or {}),
        "status": (span.status.status_code, span.status.description),
        "events": [(e.name, _without_stacktrace(e.attributes)) for e in span.events],
        "links": [(name_of(link.context.span_id), dict(link.attributes or {})) for link in span.links],
        "scope": (span.instrumentation_scope.name, span.instrumentation_scope.version),
        "resource": dict(span.resource.attributes),
        "timed": span.start_time is not None and span.end_time is not None and span.end_time >= span.start_time,
    }


def _run(scenario: Callable[[trace.Tracer], None], sampler: Sampler = ALWAYS_ON) -> list[list[dict[str, Any]]]:
    shapes = []
    for provider, exporter in _providers(sampler):
        scenario(provider.get_tracer("test.scope", "1.2.3"))
        spans = exporter.get_finished_spans()
        encode_spans(spans)  # what the OTLP exporters do with them: must not raise
        # What the console exporter prints, read before anything else reads the spans.
        printed = {id(span): json.loads(span.to_json())["attributes"] for span in spans}
        ids: dict[int, str] = {}
        ordered = sorted(spans, key=lambda s: s.start_time or 0)
        shapes.append([{**_shape(span, ids), "printed": printed[id(span)]} for span in ordered])
    return shapes


def nested_request(tracer: trace.Tracer) -> None:
    with tracer.start_as_current_span("GET", kind=SpanKind.SERVER, attributes={"url.path": "/a"}) as server:
        server.update_name("GET /a/{id}")
        server.set_attributes({"http.route": "/a/{id}", "http.response.status_code": 200, "tags": ["x", "y"]})
        with tracer.start_as_current_span("GET", kind=SpanKind.CLIENT) as client:
            client.set_attribute("server.port", 6379)
            client.add_event("retry", {"attempt": 2})
        server.set_status(Status(StatusCode.OK))
        server.set_status(Status(StatusCode.ERROR, "ignored: OK is final"))


def failing_operation(tracer: trace.Tracer) -> None:
    with pytest.raises(ValueError), tracer.start_as_current_span("work") as span:
        span.set_attribute("db.operation.name", "select")
        raise ValueError("boom")


def manual_span(tracer: trace.Tracer) -> None:
    parent = tracer.start_span("publish", kind=SpanKind.PRODUCER, attributes={"messaging.system": "kafka"})
    token = context.attach(trace.set_span_in_context(parent))
    try:
        child = tracer.start_span("commit", kind=SpanKind.CLIENT)
        child.record_exception(TimeoutError("late"))
        child.set_status(StatusCode.ERROR, "TimeoutError")
        child.end()
    finally:
        context.detach(token)
    parent.set_attribute("after.end", "not kept")
    parent.end()
    parent.set_attribute("after.end", "not kept")  # ended: ignored
    parent.end()  # twice: exported once


def decorated(tracer: trace.Tracer) -> None:
    @tracer.start_as_current_span("sync", kind=SpanKind.CLIENT)
    def work(n: int) -> int:
        trace.get_current_span().set_attribute("n", n)
        return n

    @tracer.start_as_current_span("async")
    async def async_work() -> None:
        trace.get_current_span().set_attribute("awaited", True)
        assert work(3) == 3  # a child of this span

    assert work(1) == 1 and work(2) == 2  # a span per call
    asyncio.run(async_work())


#: The lean tracer asks a plain sampler per span, and reads a parent-decided one from its table.
SAMPLERS = {
    "always_on": ALWAYS_ON,
    "parentbased_always_on, parent-decided": DecidedByParent(ParentBased(ALWAYS_ON)),
}


@pytest.mark.parametrize("sampler", SAMPLERS.values(), ids=SAMPLERS.keys())
@pytest.mark.parametrize("scenario", [nested_request, failing_operation, manual_span, decorated])
def test_lean_spans_export_like_sdk_spans(scenario, sampler):
    sdk, lean = _run(scenario, sampler)
    assert lean == sdk
    assert lean, "the scenario produced spans"


@pytest.mark.parametrize("decided", [False, True], ids=["asked", "parent-decided"])
def test_sampling_decisions_are_the_samplers(decided):
    # A dropped root: nothing recorded under it either, on either provider (client metrics do
    # not need the spans: chatobs.instrumentation.dispatch measures the calls themselves).
    def scenario(tracer: trace.Tracer) -> None:
        with tracer.start_as_current_span("root", kind=SpanKind.SERVER) as root:
            assert not root.is_recording()
            with tracer.start_as_current_span("send", kind=SpanKind.PRODUCER) as client:
                assert not client.is_recording()
                assert client.get_span_context().trace_id == root.get_span_context().trace_id

    sampler = DecidedByParent(ParentBased(ALWAYS_OFF)) if decided else ParentBased(ALWAYS_OFF)
    assert _run(scenario, sampler) == [[], []], "nothing sampled, nothing exported"
    for provider, _ in _providers(sampler):
        ended: list[ReadableSpan] = []
        provider.add_span_processor(Collect(ended))
        scenario(provider.get_tracer("test.scope"))
        assert ended == [], type(provider).__name__


def test_without_a_span_processor_a_root_carries_fresh_context_and_a_child_hands_on_its_parents():
    # Nobody would receive a recorded span: the lean tracer's spans then record nothing. A
    # root keeps what exemplars, logs and downstream services use (fresh ids, the sampler's
    # decision); a child hands on its parent's context, as the API does without an SDK, so
    # what this service sends on names the upstream span, not one nobody records.
    provider = LeanTracerProvider(resource=RESOURCE, sampler=DecidedByParent(ParentBased(ALWAYS_ON)))
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span("request", kind=SpanKind.SERVER) as root:
        assert not root.is_recording()
        root.set_attribute("ignored", 1)  # harmless
        own = root.get_span_context()
        assert own.is_valid and own.trace_flags.sampled and not own.is_remote
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        assert carrier["traceparent"].split("-")[1:3] == [format(own.trace_id, "032x"), format(own.span_id, "016x")]
        child = tracer.start_span("statement", kind=SpanKind.CLIENT)
        assert child.get_span_context() is own and not child.is_recording()

    remote = trace.SpanContext(0xABC, 0xDEF, is_remote=True, trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED))
    parent = trace.set_span_in_context(trace.NonRecordingSpan(remote))
    with tracer.start_as_current_span("process", context=parent, kind=SpanKind.CONSUMER):
        carrier = {}
        propagate.inject(carrier)
        assert carrier["traceparent"] == f"00-{0xABC:032x}-{0xDEF:016x}-01"

    # A recording parent of another provider's is named, not taken over: ending the child
    # leaves it running.
    sdk = TracerProvider(resource=RESOURCE)
    sdk_exporter = InMemorySpanExporter()
    sdk.add_span_processor(SimpleSpanProcessor(sdk_exporter))
    with sdk.get_tracer("app").start_as_current_span("app work") as app_span:
        with tracer.start_as_current_span("inner") as inner:
            assert inner is not app_span and inner.get_span_context() == app_span.get_span_context()
        assert app_span.is_recording() and sdk_exporter.get_finished_spans() == ()

    # Once a processor is there, spans are recorded again, children with ids of their own.
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    assert provider.has_span_processors
    with tracer.start_as_current_span("process", context=parent) as span:
        assert span.is_recording() and span.get_span_context().span_id != 0xDEF
    assert [span.name for span in exporter.get_finished_spans()] == ["process"]


STATIC = {"always_on": ALWAYS_ON, "always_off": ALWAYS_OFF, "parentbased_always_on": ParentBased(ALWAYS_ON),
          "parentbased_always_off": ParentBased(ALWAYS_OFF)}  # fmt: skip


@pytest.mark.parametrize("inner", STATIC.values(), ids=STATIC.keys())
def test_parent_decisions_are_what_the_sampler_says(inner):
    # Every kind under every kind of parent, remote or local, sampled or not, and with a
    # trace state: the table's answer is the sampler's, and so is the trace state the span gets.
    sampler = DecidedByParent(inner)
    state = trace.TraceState([("vendor", "x")])
    parents: list[trace.SpanContext | None] = [None]
    for remote in (False, True):
        for flags in (trace.TraceFlags(trace.TraceFlags.DEFAULT), trace.TraceFlags(trace.TraceFlags.SAMPLED)):
            parents.append(trace.SpanContext(7, 9, is_remote=remote, trace_flags=flags, trace_state=state))
    for parent in parents:
        ctx = trace.set_span_in_context(trace.NonRecordingSpan(parent)) if parent else None
        for kind in SpanKind:
            asked = sampler.should_sample(ctx, 7, "op", kind).decision
            assert sampler.parent_decision(parent, kind) == (asked.is_recording(), asked.is_sampled()), (parent, kind)
        for provider, exporter in _providers(sampler):
            token = context.attach(ctx) if ctx else None
            try:
                provider.get_tracer("t").start_span("child", kind=SpanKind.CLIENT).end()
            finally:
                if token:
                    context.detach(token)
            for span in exporter.get_finished_spans():
                assert span.context.trace_state == (state if parent else trace.TraceState()), type(provider)


class Collect(SpanProcessor):
    def __init__(self, ended: list[ReadableSpan]):
        self.ended = ended

    def on_end(self, span: ReadableSpan) -> None:
        self.ended.append(span)


class Odd(enum.IntEnum):
    A = 1


class PipelineError(Exception):
    pass


def odd_values(tracer: trace.Tracer) -> None:
    linked = trace.SpanContext(0x1234, 0x5678, is_remote=True, trace_flags=trace.TraceFlags(1))
    links = [trace.Link(linked, {"why": "batch"}), trace.Link(trace.INVALID_SPAN_CONTEXT),
             trace.Link(trace.INVALID_SPAN_CONTEXT, {"kept": "it has attributes"})]  # fmt: skip
    odd = {"mixed": [1, "a"], "nested": {"a": 1}, "id": uuid.UUID(int=7), "amount": Decimal("1.5"),
           "path": Path("/x"), "enums": [Odd.A], "fine": (1.5, 2.5), "none": None}  # fmt: skip
    # Start attributes are kept as given and cleaned when first read: the same values, and the
    # caller's later changes to its dict not seen.
    start = {"ok": 1, "": "no key", 7: "not a str key", "list": [1, 2], **odd}
    at_start = tracer.start_span("odd at start", attributes=start)
    start.update(ok=2, late="added after the start")
    at_start.set_attribute("none", "set after a dropped start value")
    at_start.end()
    span = tracer.start_span("odd", attributes={"ok": 1, "": "no key"}, links=links)
    for key, value in odd.items():
        span.set_attribute(key, value)
    span.add_event("at zero", {"n": 1}, timestamp=0)
    span.record_exception(PipelineError("boom"))
    span.end(end_time=span.start_time + 1 if span.start_time else None)


def test_values_links_and_exceptions_as_the_sdk_keeps_them():
    sdk, lean = _run(odd_values)
    assert lean == sdk
    at_start, span = lean
    assert span["events"][1][1]["exception.type"].endswith("test_lean_tracer.PipelineError")
    assert at_start["attributes"]["ok"] == 1 and "late" not in at_start["attributes"]
    assert at_start["attributes"]["7"] == "not a str key"  # as the SDK: str() of the key


def test_trace_context_headers_are_the_sdks():
    headers = []
    for provider, _ in _providers(ALWAYS_ON):
        with provider.get_tracer("t").start_as_current_span("outgoing"):
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
            headers.append(carrier["traceparent"].rsplit("-", 1)[1])
    assert headers[1] == headers[0], "the same trace flags (sampled, random trace id) go downstream"


def test_a_current_span_context_is_entered_once():
    provider, exporter = _providers(ALWAYS_ON)[1]
    current = provider.get_tracer("t").start_as_current_span("once")
    with current, pytest.raises(RuntimeError, match="entered once"), current:
        pass
    assert [span.name for span in exporter.get_finished_spans()] == ["once"]
    assert not trace.get_current_span().get_span_context().is_valid, "the context is restored"


class _CountingIds(RandomIdGenerator):
    """A subclass of the SDK's default generator that draws otherwise: its ids must be the spans'."""

    def __init__(self) -> None:
        self.drawn = 0

    def generate_trace_id(self) -> int:
        self.drawn += 1
        return 0xABC0 + self.drawn

    def generate_span_id(self) -> int:
        self.drawn += 1
        return 0xDEF0 + self.drawn


def test_an_id_generator_of_the_applications_gives_the_spans_ids():
    exporter = InMemorySpanExporter()
    provider = LeanTracerProvider(resource=RESOURCE, sampler=ALWAYS_ON, id_generator=_CountingIds())
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("test").start_as_current_span("root"):
        provider.get_tracer("test").start_span("child").end()
    child, root = exporter.get_finished_spans()
    assert (root.context.trace_id, root.context.span_id) == (0xABC1, 0xDEF2)
    assert (child.context.trace_id, child.context.span_id) == (0xABC1, 0xDEF3)


def test_the_default_generators_ids_are_drawn_from_random_as_the_sdk_draws_them():
    """Seeded alike, the lean tracer's default ids are those the SDK's generator draws."""
    provider = LeanTracerProvider(resource=RESOURCE, sampler=ALWAYS_ON)
    random.seed(7)
    span = provider.get_tracer("test").start_span("root")
    random.seed(7)
    expected = (RandomIdGenerator().generate_trace_id(), RandomIdGenerator().generate_span_id())
    assert (span.get_span_context().trace_id, span.get_span_context().span_id) == expected
    assert span.get_span_context().is_valid


def test_a_drawn_zero_is_drawn_again(monkeypatch):
    draws = iter([0, 5, 0, 9])  # trace id 0, then 5; span id 0, then 9: zero ids are invalid
    monkeypatch.setattr(random, "getrandbits", lambda bits: next(draws))
    context = (
        LeanTracerProvider(resource=RESOURCE, sampler=ALWAYS_ON).get_tracer("t").start_span("s").get_span_context()
    )
    assert (context.trace_id, context.span_id) == (5, 9)


class _UnprintableError(Exception):
    """An application's exception whose ``__str__`` fails (it reads what was never set)."""

    def __str__(self) -> str:
        return self.never_set  # type: ignore[attr-defined]


def test_an_exception_that_cannot_be_printed_passes_unchanged_and_fails_its_span():
    from chatobs.instrumentation.kafka import consumer_span

    provider = LeanTracerProvider(resource=RESOURCE, sampler=ALWAYS_ON)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("t")
    record = type("Record", (), {"topic": "chat.wal", "partition": 0, "offset": 7, "headers": []})()
    for scope in (lambda: tracer.start_as_current_span("handle"), lambda: consumer_span(tracer, record)):
        with pytest.raises(_UnprintableError), scope():
            raise _UnprintableError
    spans = exporter.get_finished_spans()
    assert [span.name for span in spans] == ["handle", "chat.wal process"]
    for span in spans:
        assert span.status.status_code is StatusCode.ERROR
        assert span.status.description == "_UnprintableError: <exception str() failed>"
        assert [event.attributes["exception.message"] for event in span.events] == ["<exception str() failed>"]


# With the SDK's tracer too: the spans chatobs makes itself (a request's, a consumed record's)
# record the exception without `str()` on it. (The SDK's own `start_as_current_span` still calls
# it: open-telemetry/opentelemetry-python#2683.)
@pytest.mark.parametrize("tracer", ["lean", "sdk"])
def test_an_exception_that_cannot_be_printed_passes_chatobs_spans_unchanged(tracer: str):
    import httpx
    from fastapi import FastAPI

    from chatobs import Telemetry, load_settings

    exporter = InMemorySpanExporter()
    settings = load_settings({"OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "httpx,redis,asyncpg,aiokafka",
                              "CHATOBS_TRACER": tracer})  # fmt: skip
    telemetry = Telemetry(settings, service="gateway", span_processors=[SimpleSpanProcessor(exporter)])
    app = FastAPI()

    @app.get("/boom")
    async def boom() -> None:
        raise _UnprintableError

    telemetry.instrument(app)

    async def request() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
            await client.get("/boom")

    with pytest.raises(_UnprintableError):
        asyncio.run(request())
    record = type("Record", (), {"topic": "chat.wal", "partition": 0, "offset": 7, "headers": []})()
    with pytest.raises(_UnprintableError), telemetry.consumer_span(record):
        raise _UnprintableError
    spans = {span.name: span for span in exporter.get_finished_spans()}
    assert set(spans) == {"GET /boom", "chat.wal process"}
    for span in spans.values():
        assert span.status.status_code is StatusCode.ERROR
        assert [event.attributes["exception.message"] for event in span.events] == ["<exception str() failed>"]
    assert spans["chat.wal process"].status.description == "_UnprintableError: <exception str() failed>"
    telemetry.shutdown()
