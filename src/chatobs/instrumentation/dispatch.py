"""Client calls measured always, and traced only when the span would be recorded.

Each client library chatobs instruments (asyncpg, redis, httpx, aiokafka) gets, over each
method the contrib instrumentation wraps, a *dispatcher*: it times the call and records the
client metrics (``{backend}_operation_seconds``, ``{backend}_errors_total``,
``http_client_request_duration_seconds``, ...) itself, and goes through the contrib
instrumentation's wrapper only when :class:`~chatobs.instrumentation.gate.SpanGate` says a
span would be recorded. Otherwise it calls the library directly, after doing itself the one
thing the contrib wrapper does that is not about the span: putting the trace context into
what is sent (HTTP headers, Kafka record headers), so the trace still continues downstream.

So metrics never depend on sampling or exporters (a dropped trace cannot hide a failure),
and a service that exports no spans does not build them. A library's metrics are described
by a :class:`ClientOperation`; :class:`Patch` puts a dispatcher in place and takes it away.

Example::

    patch = Patch(asyncpg.Connection, "fetch")
    patch.apply(dispatcher(SpanGate(tracer_provider), Statement(telemetry.clients)), traced=contrib_instrumented)
    ...
    patch.restore()
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from opentelemetry import trace
from opentelemetry.context import attach, detach, get_current, set_value
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor
from opentelemetry.instrumentation.utils import (
    is_http_instrumentation_enabled,
    is_instrumentation_enabled,
    suppress_http_instrumentation,
    suppress_instrumentation,
)
from opentelemetry.trace import SpanKind

from chatobs.instrumentation.gate import SAYS_IT_HAS_PROCESSORS, SpanGate

if TYPE_CHECKING:
    from chatobs.recorders.clients import Backend, BoundFailures, BoundOperation, ClientRecorder

__all__ = [
    "BackendOperation",
    "ClientInstrumentor",
    "ClientOperation",
    "FailuresOnly",
    "Patch",
    "PatchSpec",
    "Wiring",
    "dispatcher",
    "dispatching",
    "dispatching_sync",
    "http_instrumentation_enabled",
    "instrumentation_enabled",
    "instrumentation_enabled_unless",
    "spanned",
]

_logger = logging.getLogger("chatobs")

Args = tuple[Any, ...]
#: What a :class:`BackendOperation` describes a call as: the series it records into.
_Described = TypeVar("_Described", "BoundOperation", "BoundFailures")
Kwargs = dict[str, Any]


Suppressor = Callable[[], AbstractContextManager[None]]


def _keys_set_by(suppress: Suppressor) -> tuple[str, ...]:
    """The context keys ``suppress()`` (a contrib ``suppress_*`` context manager) sets, learned
    through it: suppression is a truthy value under each of them in the current context."""
    outside = get_current()
    with suppress():
        inside = get_current()
    return tuple(key for key, value in inside.items() if value and outside.get(key) is not value)


def _enabled_check(
    utility: Callable[[], bool], *suppressors: Suppressor, unless: ContextVar[bool] | None = None
) -> Callable[[], bool]:
    """A check of the current context that answers as ``utility`` (the contrib's
    ``is_*instrumentation_enabled``) does, with one read of the context, not one a key; and
    False while ``unless`` is set (a flag of chatobs's own, asked first, in the same frame).

    The utility reads the context once a key, a dozen Python calls on a service's cold
    caches, on every client call. Here the keys the ``suppressors`` set are learned once and
    the two answers compared (outside them, under each, under each key alone); should they
    disagree (a contrib release that suppresses some other way), the utility is asked itself.
    """
    keys = tuple(dict.fromkeys(key for suppress in suppressors for key in _keys_set_by(suppress)))
    flag = unless.get if unless is not None else None

    def enabled() -> bool:
        if flag is not None and flag():
            return False
        context = get_current()
        for key in keys:  # noqa: SIM110 - all() over a generator is a frame more, every client call
            if context.get(key):
                return False
        return True

    def agree() -> bool:
        return enabled() == utility()

    agreed = bool(keys) and agree()
    for suppress in suppressors:
        with suppress():
            agreed = agreed and agree() and not enabled()
    for key in keys:
        token = attach(set_value(key, True))
        try:
            agreed = agreed and agree()
        finally:
            detach(token)
    if agreed:
        return enabled
    return utility if flag is None else lambda: not flag() and utility()


def instrumentation_enabled_unless(flag: ContextVar[bool]) -> Callable[[], bool]:
    """:data:`instrumentation_enabled`, and False while ``flag`` is set: one check, one frame.

    Example::

        _RESETTING: ContextVar[bool] = ContextVar("resetting", default=False)
        statement_enabled = instrumentation_enabled_unless(_RESETTING)
    """
    return _enabled_check(is_instrumentation_enabled, suppress_instrumentation, unless=flag)


#: Whether instrumentation is on in the current context (``suppress_instrumentation`` says not).
instrumentation_enabled = _enabled_check(is_instrumentation_enabled, suppress_instrumentation)
#: The same for HTTP instrumentation (``suppress_http_instrumentation`` too).
http_instrumentation_enabled = _enabled_check(
    is_http_instrumentation_enabled, suppress_instrumentation, suppress_http_instrumentation
)


class ClientOperation:
    """How one kind of client call is measured: a subclass per library.

    The dispatcher calls :meth:`describe` before the call, :meth:`propagate` when the call goes
    to the library directly (no contrib span), and :meth:`record` after it. None of them may
    raise into the application: the dispatcher logs and swallows what they raise.
    """

    #: Exceptions of the call that are outcomes, not failures (``StopAsyncIteration``, ...).
    benign: tuple[type[BaseException], ...] = ()

    def enabled(self) -> bool:
        """Whether to measure at all (``suppress_instrumentation`` says not)."""
        return instrumentation_enabled()

    def describe(self, args: Args, kwargs: Kwargs) -> Any:
        """What :meth:`record` needs to know of the call (its operation, say); None: record nothing."""
        return None

    def propagate(self, args: Args, kwargs: Kwargs) -> tuple[Args, Kwargs]:
        """The arguments with the current trace context put where the peer reads it."""
        return args, kwargs

    def record(self, described: Any, seconds: float, result: Any, failed: bool) -> None:
        """The call took ``seconds`` and returned ``result`` (None if it raised)."""


class BackendOperation(ClientOperation):
    """A call measured into ``{backend}_operation_seconds`` and ``{backend}_errors_total``.

    A subclass's :meth:`describe` names the operation and returns it bound,
    ``self._bound.get(name) or self.bind(name)``; :meth:`record` then records into it
    directly. Each operation's series are bound once (:meth:`ClientRecorder.bound
    <chatobs.recorders.clients.ClientRecorder.bound>`): a statement's record is one call
    into its series, not the recorder's argument checks and lookups on every call. A
    subclass whose calls name their operation by a raw value the application passes again
    and again (a statement's text, a command's spelling) :meth:`keep` s what it described
    for that value in ``self._kept``, so the next such call is one lookup.
    """

    #: The backend of the catalogue's metrics: ``postgres``, ``redis``, ``kafka``.
    backend: Backend

    def __init__(self, clients: ClientRecorder):
        self._clients = clients
        self._bound: dict[str, BoundOperation] = {}
        self._kept: dict[Any, Any] = {}  # a BoundOperation or BoundFailures per key

    def bind(self, operation: str) -> BoundOperation:
        """``operation``'s series, bound now and kept (up to :data:`_BOUND_OPERATIONS` names)."""
        bound = self._clients.bound(self.backend, operation)
        if len(self._bound) < _BOUND_OPERATIONS:
            self._bound[operation] = bound
        return bound

    def keep(self, key: Any, described: _Described) -> _Described:
        """``described``, kept in ``self._kept`` as what a call with ``key`` records into (up to
        :data:`_BOUND_OPERATIONS` keys; past them, calls are named each time)."""
        if len(self._kept) < _BOUND_OPERATIONS:
            self._kept[key] = described
        return described

    def record(self, described: BoundOperation | BoundFailures, seconds: float, result: Any, failed: bool) -> None:
        # The dispatchers skip this frame on success when a subclass keeps it (`_records_bound`),
        # and call `described.succeeded` (the duration series' own `observe`) themselves: every
        # statement and command would pass here, and then through `described.record`; a failed
        # one still does.
        described.record(seconds, failed)


class FailuresOnly(ClientOperation):
    """A call whose duration measures no work of the backend's (a poll, a wait for messages to
    come): only its failures count, into the series ``bind()`` gives; ``benign`` exceptions are
    none. :func:`dispatcher` gives it a dispatcher of its own, which times nothing.

    The series is bound at the first call: it shows 0 from then on, and a service that never
    makes the call (a service that polls no Kafka topic) shows no series of it.

    Example::

        polls = FailuresOnly(lambda: clients.bound_failures("kafka", "consume"), (asyncio.CancelledError,))
    """

    def __init__(self, bind: Callable[[], BoundFailures], benign: tuple[type[BaseException], ...] = ()):
        self._bind = bind
        #: The bound error series; None until the first call.
        self.failures: BoundFailures | None = None
        self.benign = benign

    def show(self) -> BoundFailures:
        """The error series, bound now if no call has bound it yet."""
        failures = self.failures
        if failures is None:  # two threads may both bind: the same series, harmless
            failures = self.failures = self._bind()
        return failures


#: Most operation names a :class:`BackendOperation` keeps bound (statements' first words,
#: commands), and most raw keys it keeps (statement texts, command spellings).
_BOUND_OPERATIONS = 512


def _enabled_of(operation: ClientOperation) -> Callable[[], bool]:
    """``operation.enabled``, or what it calls when a subclass keeps it: one frame less a call."""
    return instrumentation_enabled if type(operation).enabled is ClientOperation.enabled else operation.enabled


def _records_bound(operation: ClientOperation) -> bool:
    """Whether ``operation.record(described, seconds, result, failed)`` is
    ``described.record(seconds, failed)`` (a :class:`BackendOperation` that keeps its record)."""
    return isinstance(operation, BackendOperation) and type(operation).record is BackendOperation.record


def _flagged_provider(gate: Callable[[], bool]) -> Any:
    """Whose ``has_span_processors`` ``gate`` reads first (a :class:`SpanGate`'s
    :attr:`~SpanGate.flagged`), for a dispatcher to read itself; for any other gate, a stand-in
    that always says yes, so that gate is always asked."""
    return gate.flagged if isinstance(gate, SpanGate) else SAYS_IT_HAS_PROCESSORS


def _fail_safe(operation: ClientOperation, step: str, error: Exception) -> None:
    _logger.debug("chatobs: %s.%s failed", type(operation).__name__, step, exc_info=error)


def _recording_failed(
    operation: ClientOperation, series: BoundOperation | BoundFailures | None, error: Exception
) -> None:
    """A call's recording raised: counted as the bound series' own failures are, if it was theirs."""
    if series is not None:
        series.report(error)
    else:
        _fail_safe(operation, "record", error)


def _failed(operation: ClientOperation, error: BaseException) -> bool:
    return _failed_for(operation.benign, error)


def _failed_for(benign: tuple[type[BaseException], ...], error: BaseException) -> bool:
    # A call that raised did not complete, whatever it raised: an error, a cancel (the caller's
    # timeout ran out, as in a hung backend, or it stopped waiting), a Ctrl-C or an exit in the
    # middle of it. Counted as a failure, as OpenTelemetry marks its span ERROR, never as an
    # operation that completed; only the operation's own `benign` ones are no failure.
    return not isinstance(error, benign)


# The two dispatchers run on every client call: their steps are inlined and the operation's
# methods bound once, rather than shared through helper functions (a call each, every call).


def dispatching(
    original: Callable[..., Any],
    traced: Callable[..., Any] | None,
    gate: Callable[[], bool],
    operation: ClientOperation,
) -> Callable[..., Any]:
    """An ``async`` dispatcher over ``original``: ``traced`` (same arguments, ``self`` first for
    a method) when the gate says a span would be recorded, else ``original``; measured either way."""
    enabled, describe, record = _enabled_of(operation), operation.describe, operation.record
    propagate = operation.propagate if type(operation).propagate is not ClientOperation.propagate else None
    bound = _records_bound(operation)
    flagged = _flagged_provider(gate)
    clock = time.perf_counter

    async def dispatch(*args: Any, **kwargs: Any) -> Any:
        if not enabled():
            return await original(*args, **kwargs)
        call = original
        try:
            described = describe(args, kwargs)
            if traced is not None and flagged.has_span_processors and gate():
                call = traced
            elif propagate is not None:
                args, kwargs = propagate(args, kwargs)
        except Exception as error:  # noqa: BLE001 - instrumentation never fails the call
            _fail_safe(operation, "describe", error)
            described = None
        started = clock()
        try:
            result = await call(*args, **kwargs)
        except BaseException as error:
            if described is not None:
                try:
                    record(described, clock() - started, None, _failed(operation, error))
                except Exception as failure:  # noqa: BLE001 - as above
                    _fail_safe(operation, "record", failure)
            raise
        if described is not None:
            try:
                if bound:
                    described.succeeded(clock() - started)
                else:
                    record(described, clock() - started, result, False)
            except Exception as failure:  # noqa: BLE001 - as above
                _recording_failed(operation, described if bound else None, failure)
        return result

    return dispatch


def dispatching_sync(
    original: Callable[..., Any],
    traced: Callable[..., Any] | None,
    gate: Callable[[], bool],
    operation: ClientOperation,
) -> Callable[..., Any]:
    """:func:`dispatching` for a synchronous method."""
    enabled, describe, record = _enabled_of(operation), operation.describe, operation.record
    propagate = operation.propagate if type(operation).propagate is not ClientOperation.propagate else None
    bound = _records_bound(operation)
    flagged = _flagged_provider(gate)
    clock = time.perf_counter

    def dispatch(*args: Any, **kwargs: Any) -> Any:
        if not enabled():
            return original(*args, **kwargs)
        call = original
        try:
            described = describe(args, kwargs)
            if traced is not None and flagged.has_span_processors and gate():
                call = traced
            elif propagate is not None:
                args, kwargs = propagate(args, kwargs)
        except Exception as error:  # noqa: BLE001 - instrumentation never fails the call
            _fail_safe(operation, "describe", error)
            described = None
        started = clock()
        try:
            result = call(*args, **kwargs)
        except BaseException as error:
            if described is not None:
                try:
                    record(described, clock() - started, None, _failed(operation, error))
                except Exception as failure:  # noqa: BLE001 - as above
                    _fail_safe(operation, "record", failure)
            raise
        if described is not None:
            try:
                if bound:
                    described.succeeded(clock() - started)
                else:
                    record(described, clock() - started, result, False)
            except Exception as failure:  # noqa: BLE001 - as above
                _recording_failed(operation, described if bound else None, failure)
        return result

    return dispatch


# A call measured by its failures alone (a poll, a pub/sub read) runs the most often of all, a
# Redis read per streamed token and a Kafka poll per fetch, mostly in a context nothing
# suppresses, and never fails: on success its dispatcher costs one frame (and two attribute
# reads: is the series bound yet, has the provider a span processor?), and only a failure asks
# whether instrumentation is on (the call was made anyway, and is not measured if not).


def _failures_steps(
    original: Callable[..., Any], traced: Callable[..., Any] | None, gate: Callable[[], bool], operation: FailuresOnly
) -> tuple[Callable[[], None], Callable[[], Callable[..., Any]], Callable[[BaseException], None]]:
    """A failures-only dispatcher's steps: binding its series at the first call; which call to
    make (through the contrib span when one would be recorded), asked only when there is a
    traced path; and counting a failure."""
    benign = operation.benign

    def first() -> None:
        try:
            operation.show()
        except Exception as error:  # noqa: BLE001 - instrumentation never fails the call
            _fail_safe(operation, "bind", error)

    def which() -> Callable[..., Any]:
        try:
            return traced if traced is not None and gate() and operation.enabled() else original
        except Exception as error:  # noqa: BLE001 - as above
            _fail_safe(operation, "describe", error)
            return original

    def count(error: BaseException) -> None:
        try:
            if _failed_for(benign, error) and operation.enabled():
                operation.show().record()
        except Exception as failure:  # noqa: BLE001 - as above
            _fail_safe(operation, "record", failure)

    return first, which, count


def _failures_dispatching(
    original: Callable[..., Any],
    traced: Callable[..., Any] | None,
    gate: Callable[[], bool],
    operation: FailuresOnly,
) -> Callable[..., Any]:
    """:func:`dispatching` for a :class:`FailuresOnly` call: nothing timed, only failures recorded."""
    first, which, count = _failures_steps(original, traced, gate, operation)
    flagged = _flagged_provider(gate)

    async def dispatch(*args: Any, **kwargs: Any) -> Any:
        if operation.failures is None:
            first()
        untraced = traced is None or not flagged.has_span_processors
        try:
            return await (original if untraced else which())(*args, **kwargs)
        except BaseException as error:
            count(error)
            raise

    return dispatch


def _failures_dispatching_sync(
    original: Callable[..., Any],
    traced: Callable[..., Any] | None,
    gate: Callable[[], bool],
    operation: FailuresOnly,
) -> Callable[..., Any]:
    """:func:`_failures_dispatching` for a synchronous method."""
    first, which, count = _failures_steps(original, traced, gate, operation)
    flagged = _flagged_provider(gate)

    def dispatch(*args: Any, **kwargs: Any) -> Any:
        if operation.failures is None:
            first()
        untraced = traced is None or not flagged.has_span_processors
        try:
            return (original if untraced else which())(*args, **kwargs)
        except BaseException as error:
            count(error)
            raise

    return dispatch


def spanned(
    call: Callable[..., Any], tracer: trace.Tracer, name: str, attributes: dict[str, str]
) -> Callable[..., Any]:
    """``call`` (a coroutine function) in a CLIENT span of chatobs's own: the traced path of a
    call the contrib instrumentation has no span for (a connection attempt, a consumer commit)."""

    async def traced(*args: Any, **kwargs: Any) -> Any:
        # Positional, in the API's order (name, context, kind, attributes): keywords cost a dict.
        with tracer.start_as_current_span(name, None, SpanKind.CLIENT, attributes):
            return await call(*args, **kwargs)

    return traced


Builder = Callable[[Callable[..., Any], "Callable[..., Any] | None"], Callable[..., Any]]
_MISSING = object()


def dispatcher(gate: Callable[[], bool], operation: ClientOperation, *, sync: bool = False) -> Builder:
    """A :class:`Patch` builder: ``original`` and the contrib ``traced`` path, dispatched by ``gate``."""
    if isinstance(operation, FailuresOnly):
        failures = _failures_dispatching_sync if sync else _failures_dispatching
        return lambda original, traced: failures(original, traced, gate, operation)
    dispatch = dispatching_sync if sync else dispatching
    return lambda original, traced: dispatch(original, traced, gate, operation)


class Patch:
    """One attribute (a method of a class, or a module's function) replaced by a dispatcher.

    :meth:`apply` reads what is there: with ``traced=True`` it is the contrib
    instrumentation's wrapper (wrapt's, whose ``__wrapped__`` is the library's own function),
    else the library's function itself (inherited, if the class does not define it).
    ``build(original, traced)`` gets both as callables taking the attribute's own arguments
    (``self`` first for a method); :meth:`restore` puts back what was there, so the contrib
    instrumentation can then be undone as usual.
    """

    __slots__ = ("_before", "_replacement", "name", "owner")

    def __init__(self, owner: Any, name: str):
        self.owner = owner
        self.name = name
        self._before: Any = _MISSING
        self._replacement: Any = None

    def apply(self, build: Builder, *, traced: bool) -> None:
        own = vars(self.owner).get(self.name, _MISSING)
        before = getattr(self.owner, self.name) if own is _MISSING else own
        original = before
        through_spans: Callable[..., Any] | None = None
        if traced and hasattr(before, "__wrapped__"):
            original = before.__wrapped__
            through_spans = _unbound(before) if isinstance(self.owner, type) else before
        replacement = functools.update_wrapper(build(original, through_spans), original, updated=())
        replacement.__wrapped__ = before  # what is beneath it: the contrib wrapper, if any
        self._before, self._replacement = own, replacement
        setattr(self.owner, self.name, replacement)

    def restore(self) -> None:
        if self._replacement is not None and vars(self.owner).get(self.name) is self._replacement:
            if self._before is _MISSING:
                delattr(self.owner, self.name)  # it was inherited: inherited again
            else:
                setattr(self.owner, self.name, self._before)
        self._before, self._replacement = _MISSING, None


def _unbound(wrapper: Any) -> Callable[..., Any]:
    """A method wrapper (wrapt's, as the class holds it) as a function taking ``self`` first."""

    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        return wrapper.__get__(self, type(self))(*args, **kwargs)

    return call


@dataclass(frozen=True)
class Wiring:
    """What a :class:`ClientInstrumentor` is instrumenting with: where metrics go, the tracer
    provider and its :class:`SpanGate`, and whether the contrib instrumentation of the library
    is in place beneath (``traced``)."""

    clients: ClientRecorder
    tracer_provider: Any
    gate: SpanGate
    traced: bool


#: (owner, attribute, builder, whether the contrib instrumentation wraps that attribute)
PatchSpec = tuple[Any, str, Builder, bool]


class ClientInstrumentor(BaseInstrumentor):
    """Base of chatobs's client instrumentors: the dispatchers a subclass names (:meth:`_specs`)
    are put in place by ``instrument(clients=..., tracer_provider=..., traced=...)``, all of
    them or, when one cannot be (a library version without a method named), none, and taken
    away by ``uninstrument()`` (to be called before the contrib instrumentation's own).

    ``traced`` says the contrib instrumentation of the library was instrumented just before,
    so its spans are there to go through. Idempotent, as every ``BaseInstrumentor``.
    """

    _patches: tuple[Patch, ...] = ()

    def _specs(self, wiring: Wiring) -> Iterable[PatchSpec]:
        raise NotImplementedError

    def _instrument(self, **kwargs: Any) -> None:
        provider = kwargs.get("tracer_provider") or trace.get_tracer_provider()
        wiring = Wiring(kwargs["clients"], provider, SpanGate(provider), bool(kwargs.get("traced", False)))
        patches = []
        try:
            for owner, name, build, through_contrib in self._specs(wiring):
                patch = Patch(owner, name)
                patch.apply(build, traced=through_contrib and wiring.traced)
                patches.append(patch)
        except BaseException:
            # All or nothing: BaseInstrumentor counts a failed instrument() as not done, so its
            # uninstrument() would never take away what was already in place.
            for patch in reversed(patches):
                patch.restore()
            raise
        self._patches = tuple(patches)

    def _uninstrument(self, **kwargs: Any) -> None:
        for patch in reversed(self._patches):
            patch.restore()
        self._patches = ()
