"""Trace context read from and written to carriers, cheaply in the common case.

Two uses:

* **A trace carried in stored data.** The outbox keeps each message's ``traceparent`` with
  the row, so the publisher, reading the row later in another process, continues the
  request's trace. A row has one column for it, whatever propagators the services' headers
  use (``OTEL_PROPAGATORS``), so both ends speak W3C Trace Context here
  (:func:`traceparent`, :func:`continued`): with ``b3`` headers the trace still crosses the
  outbox, and neither end walks the other configured propagators for it.
* **A trace carried in message headers** (:func:`extract_pairs`, for Kafka records; and
  :func:`inject`, for Kafka records and HTTP requests): what ``propagate.extract`` reads and
  ``propagate.inject`` writes, but done directly when the configured propagators are W3C
  Trace Context and Baggage (the default) and the trace is a ``traceparent`` alone: no
  trace state, no baggage. Every consumed record is extracted and every sent record and
  outbound request injected, and the general path (the composite propagator asking each
  propagator, each asking the getter or setter, each finding the current context again)
  cost more than twice the direct one.

The direct read parses a ``traceparent`` as OpenTelemetry's propagator does (the same pattern,
the same refusals: version ``ff``, all-zero ids, extra fields in version ``00``), so both
paths give the same context; a test compares them on valid and malformed values.

Example::

    row["traceparent"] = traceparent()          # in the request that stores the row
    with tracer.start_as_current_span("outbox publish", context=continued(row["traceparent"])):
        ...                                     # in the process that reads it back
    inject(request.headers)                     # an outbound request carries the current span
    parent = extract_pairs(record.headers)      # a consumed Kafka record's producer span
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TypeVar

from opentelemetry import baggage, propagate, trace
from opentelemetry.context import Context, get_current
from opentelemetry.propagators.textmap import Getter, Setter, TextMapPropagator, default_setter
from opentelemetry.trace import INVALID_SPAN_CONTEXT, NonRecordingSpan, SpanContext, TraceFlags

__all__ = ["continued", "extract_pairs", "fields", "header_values", "inject", "traceparent"]

_Carrier = TypeVar("_Carrier")

#: ``version-traceid-parentid-flags`` (W3C Trace Context, section 3.2), with what a later
#: version may append, and surrounding blanks: the pattern ``TraceContextTextMapPropagator`` reads.
_TRACEPARENT = re.compile(r"^[ \t]*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?[ \t]*$")
_ZERO_TRACE_ID = "0" * 32
_ZERO_SPAN_ID = "0" * 16
#: The fields of the propagators the direct read stands in for: W3C Trace Context and Baggage.
_W3C_FIELDS = frozenset({"traceparent", "tracestate", "baggage"})
#: Headers that, present, need the propagators themselves (a trace state, baggage).
_GENERAL = frozenset({"tracestate", "baggage"})
#: W3C Baggage's limit on a header, the one ``W3CBaggagePropagator`` applies.
_BAGGAGE_MAX_BYTES = 8192


def header_values(key: str, values: list[str]) -> list[str] | None:
    """What a carrier's getter hands the propagators for header ``key``: ``values``, or none.

    None for a ``baggage`` header past W3C's 8,192 bytes. The baggage propagator ignores such
    a header too, but only after logging a warning with all of it: any client could write
    as much to the service's log as it may send in each request.

    Example::

        def get(self, carrier, key):
            return header_values(key, [value.decode("latin-1") for name, value in carrier if name == key])
    """
    if not values:
        return None
    # The propagator reads the first value, and measures it as UTF-8.
    if key == "baggage" and len(values[0].encode()) > _BAGGAGE_MAX_BYTES:
        return None
    return values


def traceparent(context: Context | None = None) -> str | None:
    """The current (or ``context``'s) span as a ``traceparent`` value, as
    ``TraceContextTextMapPropagator`` writes it; None without a valid span."""
    span_context = trace.get_current_span(context).get_span_context()
    if span_context == INVALID_SPAN_CONTEXT:  # the propagator's test: equal, not `is_valid`
        return None
    return _traceparent_of(span_context)


def _traceparent_of(span_context: SpanContext) -> str:
    # One span usually writes several carriers (each outbound call while it is current): the
    # last span context's value is kept, as one tuple replaced whole, so no thread sees half.
    global _last_traceparent
    last_context, last_value = _last_traceparent
    if span_context is last_context:
        return last_value
    value = f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-{span_context.trace_flags:02x}"
    _last_traceparent = (span_context, value)
    return value


_last_traceparent: tuple[object, str] = (None, "")


def continued(value: str | bytes | None) -> Context | None:
    """A context whose span is the remote parent ``value`` names; None for no or a malformed value
    (the caller's span is then a root). Bytes (a value read back from Redis, say) are read as
    Latin-1, as a header's are: any other byte than the pattern's makes it malformed, not an error.

    Example::

        with tracer.start_as_current_span("outbox publish", context=continued(row["traceparent"])):
            ...
    """
    if not value:
        return None
    if value.__class__ is not str:
        if not isinstance(value, bytes | bytearray | memoryview):
            return None
        value = bytes(value).decode("latin-1")
    match = _TRACEPARENT.search(value)  # type: ignore[arg-type]
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest) or trace_id == _ZERO_TRACE_ID or span_id == _ZERO_SPAN_ID:
        return None
    # Positional (trace id, span id, is_remote, flags): keywords cost a dict per record.
    remote = SpanContext(int(trace_id, 16), int(span_id, 16), True, TraceFlags(int(flags, 16)))
    return trace.set_span_in_context(NonRecordingSpan(remote))


class _Propagators:
    """Whether the global propagators are W3C's alone, decided once per global propagator object."""

    def __init__(self) -> None:
        self._seen: object = None
        self._w3c = False
        self._fields: frozenset[str] = frozenset()

    def w3c_only(self) -> bool:
        current = propagate.get_global_textmap()
        if current is not self._seen:  # inline, not shared with fields(): it runs on every event
            self._look_at(current)
        return self._w3c

    def fields(self) -> frozenset[str]:
        current = propagate.get_global_textmap()
        if current is not self._seen:
            self._look_at(current)
        return self._fields

    def _look_at(self, current: TextMapPropagator) -> None:
        fields = frozenset(current.fields)
        self._w3c, self._fields, self._seen = "traceparent" in fields and fields <= _W3C_FIELDS, fields, current


_PROPAGATORS = _Propagators()


def fields() -> frozenset[str]:
    """The header names the global propagators write (``traceparent``, ``tracestate``,
    ``baggage`` by default): what a carrier must lose before the current context goes in."""
    return _PROPAGATORS.fields()


def inject(carrier: _Carrier, setter: Setter[_Carrier] = default_setter) -> None:
    """Write the current trace context into ``carrier`` as ``propagate.inject(carrier,
    setter=setter)`` does, directly in the common case (see the module doc).

    Example::

        inject(request.headers)                          # httpx headers: a mapping
        inject(record_headers, setter=PAIRS_SETTER)      # a list of (name, bytes)
    """
    if _PROPAGATORS.w3c_only():
        current = get_current()
        span_context = trace.get_current_span(current).get_span_context()
        if not span_context.trace_state and not baggage.get_all(current):
            if span_context != INVALID_SPAN_CONTEXT:
                setter.set(carrier, "traceparent", _traceparent_of(span_context))
            return
    propagate.inject(carrier, setter=setter)


def extract_pairs(pairs: Iterable[tuple[str, bytes | None]] | None, getter: Getter[object]) -> Context:
    """The context ``propagate.extract(pairs, getter=getter)`` gives for ``(name, value)`` header
    pairs (aiokafka's record headers), read directly in the common case (see the module doc)."""
    if not _PROPAGATORS.w3c_only():
        return propagate.extract(pairs, getter=getter)
    found: bytes | None = None
    for name, value in pairs or ():
        if name == "traceparent" and value is not None:
            if found is not None:  # two of them: the propagator decides which counts
                return propagate.extract(pairs, getter=getter)
            found = value
        elif name in _GENERAL and value is not None:
            return propagate.extract(pairs, getter=getter)
    if found is None:
        return Context()
    return continued(found.decode("latin-1")) or Context()
