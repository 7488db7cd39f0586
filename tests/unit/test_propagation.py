"""A trace carried in stored data (the outbox row's ``traceparent``) crosses whatever
propagators the services' headers use."""

from __future__ import annotations

from opentelemetry import propagate
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.trace import TracerProvider

from chatobs.propagation import continued, traceparent


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
