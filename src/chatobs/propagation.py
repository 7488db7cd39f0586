"""A trace carried in stored data: the current trace as one W3C ``traceparent`` string, and
the context that continues it where the data is read back.

The outbox keeps each message's ``traceparent`` with the row, so the publisher, reading the
row later in another process, continues the request's trace. A row has one column for it,
whatever propagators the services' headers use (``OTEL_PROPAGATORS``), so both ends speak
W3C Trace Context here, through OpenTelemetry's own propagator: with ``b3`` headers the trace
still crosses the outbox, and neither end walks the other configured propagators for it.

Example::

    row["traceparent"] = traceparent()          # in the request that stores the row
    with tracer.start_as_current_span("outbox publish", context=continued(row["traceparent"])):
        ...                                     # in the process that reads it back
"""

from __future__ import annotations

from opentelemetry.context import Context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = ["continued", "traceparent"]

_W3C = TraceContextTextMapPropagator()


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
    context = _W3C.extract({"traceparent": value})
    return context if context else None
