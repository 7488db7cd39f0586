"""A lean tracer: OpenTelemetry API spans at a fraction of the SDK's cost per span.

The Python SDK's span costs 10-30 microseconds from start to end on this project's
machine kind (a sampler call, bounded and re-validated attribute maps behind locks,
events lists, a resource lookup, two processor fan-outs). chatobs puts a SERVER span on
every request and instrumentations put a CLIENT span on every Redis command, statement
and broker call, so that cost was most of the instrumentation's share of CPU
(docs/performance.md). :class:`LeanTracerProvider` keeps what those spans are for:

* the sampler (``OTEL_TRACES_SAMPLER``, with chatobs's client-span recording), the
  trace/span ids of the SDK's :class:`RandomIdGenerator`, the resource;
* a span that *is* an SDK :class:`ReadableSpan`, so the SDK's span processors and
  exporters (batch, OTLP, console) and chatobs's span metrics take it as it is;
* the API's whole span surface: attributes, events, exceptions, status, names, links.

With no span processor at all (no exporter configured), a span has nobody to record for,
and the tracer records nothing; ``is_recording()`` says so, and instrumentations skip
building attributes. A root still gets fresh ids and the sampler's decision, so exemplars,
log lines and downstream services get a trace. A child hands on its parent's context, as
the OpenTelemetry API does without an SDK: a service that exports no spans is transparent
to the trace, and what it sends on, logs and attaches to exemplars names the nearest span
that may be recorded (upstream), not a span id nobody records. This is what client calls
already did (:mod:`chatobs.instrumentation.gate`); it saves a span id, a ``SpanContext``
and a span per consumed record, outbox row and internal span (docs/performance.md).

It leaves out the SDK's span limits (``OTEL_SPAN_*_LIMIT``: attribute values are cleaned
as the SDK cleans them, not counted), per-span locks (a span belongs to one task; ending
is still once only) and the SDK's experimental ``_on_ending`` processor hook. A span's
start attributes are cleaned when they are first read (by an exporter, a processor, or
``attributes``), not when the span starts: most spans' attributes are never read when no
span exporter is configured, and cleaning them was a tenth of the gateway's
instrumentation (docs/performance-history.md).
``CHATOBS_TRACER=sdk`` switches back to the SDK's ``TracerProvider``.

Example::

    provider = LeanTracerProvider(sampler=ParentBased(ALWAYS_ON), resource=Resource.create({}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    tracer = provider.get_tracer("my.library")
    with tracer.start_as_current_span("work", kind=SpanKind.CLIENT) as span:
        span.set_attribute("db.system.name", "redis")
"""

from __future__ import annotations

import functools
import inspect
import logging
import random
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Protocol

from opentelemetry import trace as trace_api
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.context import Context, attach, detach
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import (
    Event,
    ReadableSpan,
    SpanProcessor,
    SynchronousMultiSpanProcessor,
)
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.sdk.trace.sampling import Sampler
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.semconv.attributes.exception_attributes import (
    EXCEPTION_MESSAGE,
    EXCEPTION_STACKTRACE,
    EXCEPTION_TYPE,
)
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    set_span_in_context,
)
from opentelemetry.util import types

__all__ = [
    "DecidedByParent",
    "LeanSpan",
    "LeanTracer",
    "LeanTracerProvider",
    "ParentDecided",
    "error_status",
    "exception_event",
    "exception_message",
    "parent_decisions",
    "record_exception",
]

_logger = logging.getLogger("chatobs")


def exception_message(error: BaseException) -> str:
    """``str(error)``, or what ``traceback`` prints when the exception's ``__str__`` itself fails:
    recording the application's exception must not replace it with another.

    Example::

        event = {"exception.message": exception_message(error)}
    """
    try:
        return str(error)
    except Exception:  # noqa: BLE001 - any failure of the application's __str__
        return "<exception str() failed>"


def exception_event(
    exception: BaseException, attributes: types.Attributes = None, *, escaped: bool = False
) -> dict[str, Any]:
    """The attributes of a span's ``exception`` event, as the SDK's ``record_exception`` writes
    them, except that an exception whose ``__str__`` fails still gets its event
    (:func:`exception_message`).

    Example::

        span.add_event("exception", exception_event(error, escaped=True))
    """
    module, name = type(exception).__module__, type(exception).__qualname__
    event: dict[str, Any] = {
        EXCEPTION_TYPE: f"{module}.{name}" if module and module != "builtins" else name,
        EXCEPTION_MESSAGE: exception_message(exception),
        EXCEPTION_STACKTRACE: "".join(traceback.format_exception(exception)),
        "exception.escaped": str(escaped),  # deprecated in the conventions; the SDK still writes it
    }
    event.update(attributes or {})
    return event


def record_exception(span: trace_api.Span, error: BaseException) -> None:
    """``span.record_exception(error)`` for any span, the SDK's included: the SDK's own
    ``record_exception`` calls ``str(error)`` unguarded (open-telemetry/opentelemetry-python#2683),
    so an exception whose ``__str__`` fails would replace the application's exception.

    Example::

        except Exception as error:
            record_exception(span, error)
            raise
    """
    if span.is_recording():  # a stack trace formatted for nobody is the costly part
        span.add_event("exception", exception_event(error))


def error_status(error: BaseException) -> Status:
    """The ERROR status a span gets when ``error`` leaves its block, described as the SDK's
    span describes it (``ValueError: bad input``).

    Example::

        span.set_status(error_status(error))
    """
    return Status(StatusCode.ERROR, f"{type(error).__name__}: {exception_message(error)}")


_UNSET = Status(StatusCode.UNSET)
_SAMPLED = TraceFlags.SAMPLED
_PRIMITIVES = (str, bool, int, float)  # exact classes: the fast path
#: Trace flags by (sampled, random trace id), built once: spans take one of these four.
_FLAGS = {
    (sampled, random): TraceFlags((TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
                                  | (TraceFlags.RANDOM_TRACE_ID if random else 0))
    for sampled in (False, True)
    for random in (False, True)
}  # fmt: skip
_ENDING = threading.Lock()


def _cleaned(attributes: types.Attributes) -> dict[str, Any]:
    """The attributes as the SDK keeps them."""
    if not attributes:
        return {}
    cleaned = {}
    for key, value in attributes.items():
        if value.__class__ in _PRIMITIVES and key.__class__ is str and key:  # nearly every attribute
            cleaned[key] = value
        else:
            # Anything else the SDK's way (sequences to tuples, str() of other values and keys,
            # empty keys dropped), through its public attribute container, which logs what it drops.
            cleaned.update(BoundedAttributes(attributes={key: value}, immutable=False))
    return cleaned


def _valid_links(links: Sequence[Link] | None) -> tuple[Link, ...]:
    """The links the SDK would keep (a valid context, or attributes or a trace state), with
    their attributes copied and cleaned."""
    if not links:
        return ()
    return tuple(
        Link(link.context, _cleaned(link.attributes))
        for link in links or ()
        if link and link.context and (link.context.is_valid or link.attributes or link.context.trace_state)
    )


class ParentDecided(Protocol):
    """A sampler whose decision follows from the parent span's flags and the new span's kind
    alone may also offer it as ``parent_decision``: :class:`LeanTracer` then asks that instead
    of ``should_sample`` (no :class:`SamplingResult` per span, no context lookups). The span
    keeps its start attributes and the parent's trace state, as the SDK's ``ALWAYS_ON``,
    ``ALWAYS_OFF`` and ``ParentBased`` over them give them. Returning None means: ask
    ``should_sample``.
    """

    def parent_decision(self, parent: SpanContext | None, kind: SpanKind) -> tuple[bool, bool] | None:
        """``(recording, sampled)`` for a span of ``kind`` under ``parent`` (None: a root)."""
        ...


def parent_decisions(sampler: Sampler) -> Callable[[SpanContext | None, SpanKind], tuple[bool, bool] | None]:
    """A :meth:`ParentDecided.parent_decision` for ``sampler``, which the caller knows decides
    by the parent's remote and sampled flags and the span's kind alone: its answers for every
    such case, asked once, as a table.

    Example::

        decide = parent_decisions(ParentBased(ALWAYS_ON))
        decide(None, SpanKind.SERVER)  # (True, True): recording, sampled
    """
    # Keyed by id(kind): an Enum's hash is a Python call, on every span; SpanKind's members
    # live as long as the interpreter, so no other object has one of their ids.
    by_kind: dict[int, list[tuple[bool, bool]]] = {}
    # Index 0: a root; 1 + 2 * remote + sampled: a parent with those flags.
    parents: list[Context | None] = [None]
    for remote in (False, True):
        for sampled in (False, True):
            flags = TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
            span = NonRecordingSpan(SpanContext(1, 1, is_remote=remote, trace_flags=flags))
            parents.append(set_span_in_context(span))
    for kind in SpanKind:
        decisions = [sampler.should_sample(parent, 1, "probe", kind).decision for parent in parents]
        by_kind[id(kind)] = [(decision.is_recording(), decision.is_sampled()) for decision in decisions]

    def parent_decision(parent: SpanContext | None, kind: SpanKind) -> tuple[bool, bool] | None:
        decisions = by_kind.get(id(kind))
        if decisions is None:  # not a SpanKind: the sampler itself decides what that means
            return None
        if parent is None:
            return decisions[0]
        return decisions[1 + 2 * parent.is_remote + (parent.trace_flags & _SAMPLED)]

    return parent_decision


class DecidedByParent(Sampler):
    """``inner``, offering its decisions as a table (:class:`ParentDecided`): for a sampler the
    caller knows decides by the parent's flags and the span's kind alone (``ALWAYS_ON``,
    ``ALWAYS_OFF``, ``ParentBased`` over them), so :class:`LeanTracer` reads the decision
    instead of asking per span.

    Example::

        provider = LeanTracerProvider(sampler=DecidedByParent(ParentBased(ALWAYS_ON)), resource=resource)
    """

    def __init__(self, inner: Sampler):
        self._inner = inner
        self.parent_decision = parent_decisions(inner)

    def should_sample(self, *args: Any, **kwargs: Any) -> Any:
        return self._inner.should_sample(*args, **kwargs)

    def get_description(self) -> str:
        return self._inner.get_description()


class _Processors:
    """The provider's span processors, as each span reaches them: those with an ``on_start``
    of their own, and all of them for ``on_end``. Shared by the provider and its spans, so a
    processor added later still sees the end of a span already started (as with the SDK)."""

    __slots__ = ("_adding", "all", "ending", "starting")

    def __init__(self) -> None:
        self._adding = threading.Lock()
        self.all = SynchronousMultiSpanProcessor()  # flush and shutdown
        self.starting: tuple[SpanProcessor, ...] = ()
        self.ending: tuple[SpanProcessor, ...] = ()

    def add(self, processor: SpanProcessor) -> None:
        with self._adding:
            self.all.add_span_processor(processor)
            self.ending = (*self.ending, processor)
            # SpanProcessor.on_start does nothing: a call per span saved for each that keeps it.
            if type(processor).on_start is not SpanProcessor.on_start:
                self.starting = (*self.starting, processor)


class LeanSpan(trace_api.Span, ReadableSpan):
    """A recording span that is also the :class:`ReadableSpan` its processors receive.

    The fields are :class:`ReadableSpan`'s own, so every SDK exporter reads it unchanged.
    """

    def __init__(
        self,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: types.Attributes,
        links: Sequence[Link],
        scope: InstrumentationScope,
        resource: Resource,
        processors: _Processors,
        start_time: int,
        record_exception: bool,
        set_status_on_exception: bool,
    ):
        self._name = name
        self._context = context
        self._parent = parent
        self._kind = kind
        # A copy, cleaned when first read (see `attributes`): the caller may reuse its mapping.
        self._attributes: dict[Any, Any] = dict(attributes) if attributes else {}
        self._uncleaned = bool(attributes)
        self._events: list[Event] = []
        self._links = tuple(links)
        self._instrumentation_scope = scope
        self._instrumentation_info = None
        self._resource = resource
        self._status = _UNSET
        self._start_time = start_time
        self._end_time: int | None = None
        self._processors = processors
        self._record_exception = record_exception
        self._set_status_on_exception = set_status_on_exception

    # -- the API span --------------------------------------------------------------
    def get_span_context(self) -> SpanContext:
        return self._context

    def is_recording(self) -> bool:
        return self._end_time is None

    def set_attribute(self, key: str, value: types.AnyValue) -> None:
        if self._end_time is None:
            if value.__class__ in _PRIMITIVES and key.__class__ is str and key:
                self._attributes[key] = value
            else:
                self._attributes.update(_cleaned({key: value}))

    def set_attributes(self, attributes: Mapping[str, types.AnyValue]) -> None:
        # Cleaned now, unlike the start attributes: a value the SDK drops must not replace one set before.
        if self._end_time is None:
            self._attributes.update(_cleaned(attributes))

    # -- the ReadableSpan, for processors and exporters ------------------------------
    @property
    def attributes(self) -> types.Attributes:
        if self._uncleaned:
            # Cleaning twice (two readers at once) gives the same dict: the SDK's rules are idempotent.
            self._attributes = _cleaned(self._attributes)
            self._uncleaned = False
        return MappingProxyType(self._attributes)

    def to_json(self, indent: int | None = 4) -> str:
        self.attributes  # noqa: B018 - cleans them: the SDK's to_json reads the raw field
        return super().to_json(indent)

    def add_event(self, name: str, attributes: types.Attributes = None, timestamp: int | None = None) -> None:
        if self._end_time is None:
            self._events.append(Event(name, _cleaned(attributes), time.time_ns() if timestamp is None else timestamp))

    def add_link(self, context: SpanContext, attributes: types.Attributes = None) -> None:
        if self._end_time is None:
            self._links = (*self._links, *_valid_links([Link(context, attributes)]))

    def update_name(self, name: str) -> None:
        if self._end_time is None:
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        # As the SDK: OK is final, UNSET never overrides.
        if self._end_time is not None or self._status.status_code is StatusCode.OK:
            return
        if isinstance(status, StatusCode):
            status = Status(status, description)
        if status.status_code is not StatusCode.UNSET:
            self._status = status

    def record_exception(
        self,
        exception: BaseException,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        self.add_event("exception", exception_event(exception, attributes, escaped=escaped), timestamp)

    def end(self, end_time: int | None = None) -> None:
        with _ENDING:  # two threads ending one span: processors still see it once
            if self._end_time is not None:
                return
            self._end_time = time.time_ns() if end_time is None else end_time
        # Processors (and a batch exporter's thread) get attributes no late writer can change.
        self._attributes = dict(self._attributes)
        for processor in self._processors.ending:  # as SynchronousMultiSpanProcessor.on_end, one call less
            try:
                processor.on_end(self)
            except Exception as error:  # noqa: BLE001 - a processor's failure is not the traced code's
                _processor_failed(processor, "on_end", error)

    def _fail(self, error: BaseException, *, escaped: bool) -> None:
        """An exception left the span's block: record it and set ERROR, as the span was started
        to (``record_exception``, ``set_status_on_exception``)."""
        if self.is_recording():
            if self._record_exception:
                self.record_exception(error, escaped=escaped)
            if self._set_status_on_exception:
                self.set_status(error_status(error))

    def __exit__(self, exc_type: Any, exc_value: Any, tb: Any) -> None:
        if exc_value is not None:
            self._fail(exc_value, escaped=True)  # as the SDK span's own `with`
        self.end()


class LeanTracer(trace_api.Tracer):
    """Starts :class:`LeanSpan` s for one instrumentation scope (see :class:`LeanTracerProvider`)."""

    def __init__(self, provider: LeanTracerProvider, scope: InstrumentationScope):
        self._provider = provider
        self._scope = scope

    def start_span(
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: types.Attributes = None,
        links: Sequence[Link] | None = (),
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> trace_api.Span:
        provider = self._provider
        current = trace_api.get_current_span(context)
        parent: SpanContext | None = current.get_span_context()
        if parent is not None and parent.is_valid:
            if not provider.has_span_processors:
                # Nothing would record this span: hand on the parent's context, as the API does
                # without an SDK, so downstream spans, logs and exemplars name a span that may
                # be recorded (upstream) rather than one nobody records. Wrapped unless it is
                # a context already: ending the returned span must not end a recording parent.
                return current if current.__class__ is NonRecordingSpan else NonRecordingSpan(parent)
            trace_id = parent.trace_id
        else:
            parent = None
            trace_id = (provider.random_bits and random.getrandbits(128)) or provider.id_generator.generate_trace_id()
        links = links or ()
        decided = provider.parent_decision(parent, kind) if provider.parent_decision is not None else None
        if decided is not None:  # what the sampler would say, without asking it (see ParentDecided)
            recording, sampled = decided
            trace_state = parent.trace_state if parent is not None else None
            start_attributes = attributes
        else:
            result = provider.sampler.should_sample(context, trace_id, name, kind, attributes, links)
            recording, sampled = result.decision.is_recording(), result.decision.is_sampled()
            trace_state, start_attributes = result.trace_state, result.attributes
        # W3C level 2, as the SDK: say so when the trace id is random (ours, or the parent's says so).
        random_id = parent.trace_flags.random_trace_id if parent is not None else provider.random_trace_ids
        span_id = (provider.random_bits and random.getrandbits(64)) or provider.id_generator.generate_span_id()
        # Positional (trace id, span id, is_remote, flags, state): keywords cost a dict per span.
        span_context = SpanContext(trace_id, span_id, False, _FLAGS[sampled, random_id], trace_state)
        if not recording or not provider.has_span_processors:
            # A root no processor receives, or a span the sampler drops: its context is all
            # anyone can use (a root's fresh trace id is what downstream services continue).
            return NonRecordingSpan(span_context)
        span = LeanSpan(name, span_context, parent, kind, start_attributes, _valid_links(links),
                        self._scope, provider.resource, provider.processors,
                        time.time_ns() if start_time is None else start_time, record_exception,
                        set_status_on_exception)  # fmt: skip
        for processor in provider.processors.starting:
            try:
                processor.on_start(span, parent_context=context)
            except Exception as error:  # noqa: BLE001 - unlike the SDK's: the traced call goes on
                _processor_failed(processor, "on_start", error)
        return span

    def start_as_current_span(  # type: ignore[override]
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: types.Attributes = None,
        links: Sequence[Link] | None = (),
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> _CurrentSpan:
        return _CurrentSpan(self, (name, context, kind, attributes, links, start_time, record_exception,
                                   set_status_on_exception), end_on_exit)  # fmt: skip


class _CurrentSpan:
    """What ``start_as_current_span`` returns: a context manager, or a decorator, that starts the
    span on entry, makes it current, and on exit records an escaping exception and ends it, as
    ``trace.use_span`` does, without the generator-based context managers' cost per span."""

    __slots__ = ("_arguments", "_end_on_exit", "_span", "_token", "_tracer")

    def __init__(self, tracer: LeanTracer, arguments: tuple[Any, ...], end_on_exit: bool):
        self._tracer = tracer
        self._arguments = arguments
        self._end_on_exit = end_on_exit
        self._span: trace_api.Span | None = None

    def __enter__(self) -> trace_api.Span:
        if self._span is not None:
            raise RuntimeError("a start_as_current_span() context is entered once; call it again for another span")
        span = self._span = self._tracer.start_span(*self._arguments)
        self._token = attach(set_span_in_context(span))
        return span

    def __exit__(self, exc_type: Any, exc_value: Any, tb: Any) -> None:
        span = self._span
        if span is None:  # never entered
            return
        detach(self._token)
        if isinstance(exc_value, Exception) and isinstance(span, LeanSpan):  # as `trace.use_span`
            span._fail(exc_value, escaped=False)
        if self._end_on_exit:
            span.end()

    def __call__(self, function: Callable[..., Any]) -> Callable[..., Any]:
        """Used as a decorator: a new span for each call."""
        fresh = functools.partial(_CurrentSpan, self._tracer, self._arguments, self._end_on_exit)
        if inspect.iscoroutinefunction(function):

            @functools.wraps(function)
            async def traced_async(*args: Any, **kwargs: Any) -> Any:
                with fresh():
                    return await function(*args, **kwargs)

            return traced_async

        @functools.wraps(function)
        def traced(*args: Any, **kwargs: Any) -> Any:
            with fresh():
                return function(*args, **kwargs)

        return traced


class LeanTracerProvider(trace_api.TracerProvider):
    """A tracer provider of :class:`LeanTracer` s, with SDK span processors.

    Example::

        provider = LeanTracerProvider(sampler=ALWAYS_ON, resource=resource)
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
        trace.set_tracer_provider(provider)
    """

    def __init__(self, *, sampler: Sampler, resource: Resource, id_generator: IdGenerator | None = None):
        self.sampler = sampler
        #: The sampler's :meth:`ParentDecided.parent_decision`, if it has one.
        self.parent_decision: Callable[[SpanContext | None, SpanKind], tuple[bool, bool] | None] | None = getattr(
            sampler, "parent_decision", None
        )
        self.resource = resource
        self.id_generator = id_generator or RandomIdGenerator()
        self.random_trace_ids = self.id_generator.is_trace_id_random()
        #: The id generator is the SDK's default one exactly, which draws from `random`'s shared
        #: generator: ids are drawn here the same way, two calls less per span (a draw of 0,
        #: which is invalid, goes to the generator, which draws again).
        self.random_bits = type(self.id_generator) is RandomIdGenerator
        self.processors = _Processors()
        #: Whether any span processor receives spans (else spans are context-only).
        self.has_span_processors = False
        self._tracers: dict[tuple[str, str | None, str | None], LeanTracer] = {}

    def get_tracer(
        self,
        instrumenting_module_name: str,
        instrumenting_library_version: str | None = None,
        schema_url: str | None = None,
        attributes: types.Attributes = None,
    ) -> trace_api.Tracer:
        key = (instrumenting_module_name or "", instrumenting_library_version, schema_url)
        if attributes:  # scope attributes may be unhashable: such tracers are not shared
            return LeanTracer(self, InstrumentationScope(key[0], instrumenting_library_version, schema_url, attributes))
        tracer = self._tracers.get(key)
        if tracer is None:
            scope = InstrumentationScope(key[0], instrumenting_library_version, schema_url)
            tracer = self._tracers.setdefault(key, LeanTracer(self, scope))
        return tracer

    def add_span_processor(self, processor: SpanProcessor) -> None:
        """Every span that ends goes to ``processor`` too (in the order they were added). Spans
        started before the first processor was added are context-only: they record nothing."""
        self.processors.add(processor)
        self.has_span_processors = True

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self.processors.all.force_flush(timeout_millis)

    def shutdown(self) -> None:
        self.processors.all.shutdown()


_failed_processors: set[tuple[type, str]] = set()


def _processor_failed(processor: SpanProcessor, hook: str, error: Exception) -> None:
    """Log a span processor's failure once per processor type and hook: it would repeat on
    every span. The SDK lets it raise into the traced call; the lean tracer does not."""
    key = (type(processor), hook)
    if key not in _failed_processors:
        _failed_processors.add(key)
        _logger.warning("chatobs: span processor %s.%s failed: %r (further failures not logged)",
                        type(processor).__qualname__, hook, error)  # fmt: skip
