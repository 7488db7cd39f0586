"""A trace carried in stored data (the outbox row's ``traceparent``) crosses whatever
propagators the services' headers use."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from opentelemetry import propagate
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from chatobs.instrumentation.kafka import consumer_span
from chatobs.propagation import continued, traceparent
from chatobs.tracing import LeanTracerProvider


def test_a_stored_traceparent_continues_the_trace_even_without_w3c_headers():
    tracer = TracerProvider().get_tracer("t")
    configured = propagate.get_global_textmap()
    propagate.set_global_textmap(CompositePropagator([]))  # headers carry no W3C trace context
    try:
        with tracer.start_as_current_span("request") as request:
            stored = traceparent()
        own = request.get_span_context()
        assert stored == f"00-{own.trace_id:032x}-{own.span_id:016x}-{own.trace_flags:02x}"
        with tracer.start_as_current_span("publish", context=continued(stored)) as publish:
            assert publish.get_span_context().trace_id == own.trace_id
            assert publish.parent is not None and publish.parent.span_id == own.span_id
    finally:
        propagate.set_global_textmap(configured)


def test_no_span_or_a_malformed_value_continues_nothing():
    assert traceparent() is None
    assert continued(None) is None
    assert continued("") is None
    assert continued("not-a-traceparent") is None
    root = TracerProvider().get_tracer("t").start_span("root", context=continued("00-zz-yy-01"))
    assert root.parent is None
    for odd in (12, ["00"], b"00-\xff\xfe-not-utf8", memoryview(b"junk")):
        assert continued(odd) is None, odd  # type: ignore[arg-type]


def test_a_traceparent_read_back_as_bytes_continues_the_trace():
    value = f"00-{_TRACE}-{_SPAN}-01"
    for stored in (value.encode(), bytearray(value.encode()), memoryview(value.encode())):
        assert _seen(continued(stored)) == _seen(continued(value)) != _seen(None), stored


_TRACE = "0af7651916cd43dd8448eb211c80319c"
_SPAN = "b7ad6b7169203331"
TRACEPARENTS = [
    f"00-{_TRACE}-{_SPAN}-01",
    f"00-{_TRACE}-{_SPAN}-00",
    f" \t00-{_TRACE}-{_SPAN}-01 ",
    f"00-{_TRACE}-{_SPAN}-01\n",
    f"01-{_TRACE}-{_SPAN}-01-later-fields",
    f"00-{_TRACE}-{_SPAN}-01-extra",
    f"ff-{_TRACE}-{_SPAN}-01",
    f"00-{'0' * 32}-{_SPAN}-01",
    f"00-{_TRACE}-{'0' * 16}-01",
    f"00-{_TRACE.upper()}-{_SPAN}-01",
    f"00-{_TRACE}-{_SPAN}-1",
    f"00-{_TRACE}x-{_SPAN}-01",
    "",
    "garbage",
]


def _seen(context) -> tuple[object, dict[str, object]]:
    from opentelemetry import baggage
    from opentelemetry import trace as trace_api

    return trace_api.get_current_span(context).get_span_context(), dict(baggage.get_all(context))


@pytest.mark.parametrize("value", TRACEPARENTS)
def test_continued_reads_a_traceparent_as_the_propagator_does(value):
    expected = _seen(TraceContextTextMapPropagator().extract({"traceparent": value}))
    assert _seen(continued(value)) == expected


class _OtherHeader(TextMapPropagator):
    """Stands in for a non-W3C propagator (b3, jaeger): a field of its own."""

    def extract(self, carrier, context=None, getter=None):
        return context if context is not None else Context()

    def inject(self, carrier, context=None, setter=None):
        pass

    @property
    def fields(self):
        return {"x-other-trace"}


#: The propagator configurations both direct paths are held to: the default, Trace Context
#: alone, another propagator first, and Baggage alone (no ``traceparent``: the general path).
_EACH_PROPAGATOR_CONFIG = pytest.mark.parametrize(
    "propagators",
    [
        [TraceContextTextMapPropagator(), W3CBaggagePropagator()],
        [TraceContextTextMapPropagator()],
        [_OtherHeader(), TraceContextTextMapPropagator()],
        [W3CBaggagePropagator()],
    ],
    ids=["default", "tracecontext", "other-first", "baggage-only"],
)


@pytest.mark.parametrize(
    "headers",
    [
        [("traceparent", f"00-{_TRACE}-{_SPAN}-01".encode())],
        [("other", b"x"), ("traceparent", f"00-{_TRACE}-{_SPAN}-00".encode())],
        [("traceparent", b"garbage")],
        [("traceparent", f"00-{_TRACE}-{_SPAN}-01".encode()), ("tracestate", b"vendor=v1")],
        [("traceparent", f"00-{_TRACE}-{_SPAN}-01".encode()), ("baggage", b"tenant=acme")],
        [("baggage", b"tenant=acme")],
        [("traceparent", f"00-{_TRACE}-{_SPAN}-01".encode()), ("traceparent", f"00-{_TRACE}-{'1' * 16}-01".encode())],
        [("traceparent", None)],
        [],
        None,
    ],
)
@_EACH_PROPAGATOR_CONFIG
def test_extract_pairs_gives_what_the_propagators_give(headers, propagators):
    """The direct read of Kafka record headers against ``propagate.extract`` with the
    configured propagators, for headers it reads itself and headers it hands on."""
    from chatobs.instrumentation.kafka import _GETTER
    from chatobs.propagation import extract_pairs

    previous = propagate.get_global_textmap()
    propagate.set_global_textmap(CompositePropagator(propagators))
    try:
        expected = _seen(propagate.extract(headers, getter=_GETTER))
        assert _seen(extract_pairs(headers, _GETTER)) == expected
    finally:
        propagate.set_global_textmap(previous)


def _contexts():
    """Current contexts an outbound call may run in: none, spans with and without a trace
    state or the sampled flag, baggage with and without a span, a span context with invalid ids."""
    from opentelemetry import baggage
    from opentelemetry import trace as trace_api
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

    def span(flags=1, state=None, remote=False, trace_id=int(_TRACE, 16), span_id=int(_SPAN, 16)):
        context = SpanContext(trace_id, span_id, is_remote=remote, trace_flags=TraceFlags(flags), trace_state=state)
        return trace_api.set_span_in_context(NonRecordingSpan(context))

    return {
        "none": Context(),
        "sampled": span(),
        "unsampled": span(flags=0),
        "remote": span(remote=True),
        "trace-state": span(state=TraceState([("vendor", "v1")])),
        "baggage": baggage.set_baggage("tenant", "acme", span()),
        "baggage-only": baggage.set_baggage("tenant", "acme"),
        "invalid-ids": span(trace_id=0, span_id=0, remote=True),
        "other-span": span(span_id=int("1" * 16, 16)),
    }


@pytest.mark.parametrize("context_name", list(_contexts()))
@_EACH_PROPAGATOR_CONFIG
def test_inject_writes_what_the_propagators_write(context_name, propagators):
    """The direct write against ``propagate.inject`` with the configured propagators, into a
    mapping (httpx's headers) and into Kafka's ``(name, bytes)`` pairs, one span after another
    (the last span's value is kept: a different span must not get it)."""
    from opentelemetry import context as context_api

    from chatobs.instrumentation.kafka import _SETTER
    from chatobs.propagation import inject

    previous = propagate.get_global_textmap()
    propagate.set_global_textmap(CompositePropagator(propagators))
    try:
        for name in ("sampled", context_name, "other-span", context_name):
            token = context_api.attach(_contexts()[name])
            try:
                expected_mapping: dict[str, str] = {}
                propagate.inject(expected_mapping)
                expected_pairs: list[tuple[str, bytes]] = []
                propagate.inject(expected_pairs, setter=_SETTER)
                mapping: dict[str, str] = {}
                inject(mapping)
                pairs: list[tuple[str, bytes]] = [("kept", b"as it was")]
                inject(pairs, setter=_SETTER)
            finally:
                context_api.detach(token)
            assert mapping == expected_mapping, name
            assert pairs == [("kept", b"as it was"), *expected_pairs], name
    finally:
        propagate.set_global_textmap(previous)


def test_a_record_whose_baggage_is_past_w3cs_limit_is_continued_without_the_baggage_in_the_log(caplog):
    from opentelemetry import baggage
    from opentelemetry import trace as trace_api

    from chatobs.instrumentation.kafka import _GETTER
    from chatobs.propagation import extract_pairs

    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    headers = [("traceparent", parent.encode()), ("baggage", b"k=" + b"v" * 400_000)]
    with caplog.at_level("DEBUG"):
        context = extract_pairs(headers, _GETTER)
    assert trace_api.get_current_span(context).get_span_context().trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    assert baggage.get_all(context) == {}
    assert max((len(record.getMessage()) for record in caplog.records), default=0) < 1_000


@pytest.mark.parametrize("exported", [False, True], ids=["no span processor", "spans exported"])
def test_a_consumed_records_baggage_goes_on_with_what_its_handler_sends(exported):
    provider = LeanTracerProvider(sampler=ALWAYS_ON, resource=Resource.create({}))
    if exported:
        provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    producer = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    record = SimpleNamespace(topic="chat.wal", partition=0, offset=7,
                             headers=[("traceparent", producer.encode()), ("baggage", b"tenant=acme")])  # fmt: skip
    sent: dict[str, str] = {}
    with consumer_span(provider.get_tracer("t"), record):
        propagate.inject(sent)  # what the handler's next request or record carries
    assert sent["baggage"] == "tenant=acme"
    assert sent["traceparent"].split("-")[1] == "0af7651916cd43dd8448eb211c80319c"
    assert (sent["traceparent"] == producer) is not exported, "no span of its own unless exported"
    after: dict[str, str] = {}
    propagate.inject(after)
    assert after == {}, "the record's context ends with the block"
