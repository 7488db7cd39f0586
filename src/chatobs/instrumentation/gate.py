"""Whether a client call is worth a span: only when a span processor would receive it.

A client span (a statement, a Redis command, an HTTP call, a Kafka send) costs the contrib
instrumentation's attribute building plus a span's start and end: as much Python as the
client library runs for the call itself, or more (docs/performance-history.md). It is worth that
when something will read it, which is when the tracer provider has a span processor (an
exporter, ``OTEL_TRACES_EXPORTER``) and the sampler would record a child of the current
span. Otherwise the client instrumentors call the library directly and record only their
metrics, which never depend on the span (:mod:`chatobs.instrumentation.dispatch`).

Example::

    wants_span = SpanGate(telemetry.tracer_provider)
    if wants_span():
        ...  # through the contrib instrumentation: a span, exported
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind

__all__ = ["SAYS_IT_HAS_PROCESSORS", "SpanGate"]


#: What stands for a tracer provider that does not say whether it has span processors (one
#: not chatobs's, say): taken to have some.
SAYS_IT_HAS_PROCESSORS = SimpleNamespace(has_span_processors=True)


class SpanGate:
    """``gate()``: would a client span started now be recorded (so a processor receives it)?

    A provider that does not say whether it has span processors (``has_span_processors``, as
    chatobs's providers do) is taken to have some. Under a valid parent, the sampler is asked,
    or its table read when it offers one (``parent_decision``,
    :class:`chatobs.tracing.ParentDecided`); a root's decision depends on the trace id it has
    not drawn yet, so a root always gets its span, and the sampler decides at its start.
    """

    __slots__ = ("_decide", "_sampler", "flagged")

    def __init__(self, tracer_provider: Any):
        #: Whose ``has_span_processors`` (a plain attribute chatobs's providers keep up to date)
        #: says whether any span can be recorded: the tracer provider's, or, for a provider that
        #: does not say, :data:`SAYS_IT_HAS_PROCESSORS`'s. A dispatcher reads it itself before
        #: calling the gate: with no processor, the answer is no, and asking costs a frame on
        #: every client call.
        self.flagged = tracer_provider if hasattr(tracer_provider, "has_span_processors") else SAYS_IT_HAS_PROCESSORS
        self._sampler = getattr(tracer_provider, "sampler", None)
        self._decide = getattr(self._sampler, "parent_decision", None)

    def __call__(self) -> bool:
        if not self.flagged.has_span_processors:
            return False
        parent = trace.get_current_span().get_span_context()
        if not parent.is_valid or self._sampler is None:
            return True
        if self._decide is not None:
            decided = self._decide(parent, SpanKind.CLIENT)
            if decided is not None:
                return decided[0]
        result = self._sampler.should_sample(None, parent.trace_id, "client", SpanKind.CLIENT)
        return result.decision.is_recording()
