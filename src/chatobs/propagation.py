"""Trace context read from and written to carriers, cheaply in the common case.

Two uses:

* **A trace carried in stored data.** The outbox keeps each message's ``traceparent`` with
  the row, so the publisher, reading the row later in another process, continues the
  request's trace. A row has one column for it, whatever propagators the services' headers
  use (``OTEL_PROPAGATORS``), so both ends speak W3C Trace Context here
  (:func:`traceparent`, :func:`continued`): with ``b3`` headers the trace still crosses the
  outbox, and neither end walks the other configured propagators for it.
* **A trace carried in message headers** (:func:`extract_pairs`, for Kafka records): what
  ``propagate.extract`` gives, but read directly when the configured propagators are W3C
  Trace Context and Baggage (the default) and a record carries only a ``traceparent``. Every
  consumed record is extracted, and the general path (the composite propagator asking each
  propagator, each asking the getter) cost more than twice the direct one.

The direct read parses a ``traceparent`` as OpenTelemetry's propagator does (the same pattern,
the same refusals: version ``ff``, all-zero ids, extra fields in version ``00``), so both
paths give the same context; a test compares them on valid and malformed values.

Example::

    row["traceparent"] = traceparent()          # in the request that stores the row
    with tracer.start_as_current_span("outbox publish", context=continued(row["traceparent"])):
        ...                                     # in the process that reads it back
    parent = extract_pairs(record.headers)      # a consumed Kafka record's producer span
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = ["continued", "extract_pairs", "traceparent"]

_W3C = TraceContextTextMapPropagator()
#: ``version-traceid-parentid-flags`` (W3C Trace Context, section 3.2), with what a later
#: version may append, and surrounding blanks: the pattern ``TraceContextTextMapPropagator`` reads.
_TRACEPARENT = re.compile(r"^[ \t]*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?[ \t]*$")
_ZERO_TRACE_ID = "0" * 32
_ZERO_SPAN_ID = "0" * 16
#: The fields of the propagators the direct read stands in for: W3C Trace Context and Baggage.
_W3C_FIELDS = frozenset({"traceparent", "tracestate", "baggage"})
#: Headers that, present, need the propagators themselves (a trace state, baggage).
_GENERAL = frozenset({"tracestate", "baggage"})


def traceparent(context: Context | None = None) -> str | None:
    """The current (or ``context``'s) span as a ``traceparent`` value; None without a valid span."""
    carrier: dict[str, str] = {}
    _W3C.inject(carrier, context=context)
    return carrier.get("traceparent")


def continued(value: str | None) -> Context | None:
    """A context whose span is the remote parent ``value`` names; None for no or a malformed value
    (the caller's span is then a root)."""
    if not value:
        return None
    match = _TRACEPARENT.search(value)
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest) or trace_id == _ZERO_TRACE_ID or span_id == _ZERO_SPAN_ID:
        return None
    remote = SpanContext(int(trace_id, 16), int(span_id, 16), is_remote=True, trace_flags=TraceFlags(int(flags, 16)))
    return trace.set_span_in_context(NonRecordingSpan(remote))


class _Propagators:
    """Whether the global propagators are W3C's alone, decided once per global propagator object."""

    def __init__(self) -> None:
        self._seen: object = None
        self._w3c = False

    def w3c_only(self) -> bool:
        current = propagate.get_global_textmap()
        if current is not self._seen:
            fields = set(current.fields)
            self._w3c, self._seen = "traceparent" in fields and fields <= _W3C_FIELDS, current
        return self._w3c


_PROPAGATORS = _Propagators()


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
